"""enable_psa / disable_psa: install PSA on a CogVideoX or Wan pipeline (or transformer) in one line,
take it off in one line, and read what it did.

``enable_psa`` replaces the processor of every self-attention layer (``attn1``; Wan's cross-attention
``attn2`` keeps its own) with a ``PSAProcessor``, keeps the original processor objects, and registers
a step hook on each transformer (``transformer`` and, for Wan2.2, ``transformer_2``) through diffusers'
``HookRegistry``. ``disable_psa`` / ``PSAHandle.disable`` / leaving the handle's ``with`` block
removes the hooks and puts the very same original processor objects back.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Any

import torch

from ..config import PSAConfig
from .families import family_of_transformer
from .hooks import PSAStepHook, find_step_hook, register_step_hook, remove_step_hook
from .processor import PSAProcessor, resolve_schedule
from .state import LayerStats, PSAState, mean_density

logger = logging.getLogger(__name__)

TRANSFORMER_ATTRS = ("transformer", "transformer_2")
"""Pipeline attributes that may hold a denoising transformer (``transformer_2``: Wan2.2's low-noise expert)."""


def _transformers(pipe_or_transformer: Any) -> tuple[Any, dict[str, torch.nn.Module]]:
    """``(pipeline or None, {attribute: transformer})``."""
    if isinstance(pipe_or_transformer, torch.nn.Module):
        return None, {"transformer": pipe_or_transformer}
    models = {
        attr: getattr(pipe_or_transformer, attr)
        for attr in TRANSFORMER_ATTRS
        if isinstance(getattr(pipe_or_transformer, attr, None), torch.nn.Module)
    }
    if not models:
        raise ValueError(
            f"{type(pipe_or_transformer).__name__} is neither a transformer nor a pipeline with a 'transformer'"
        )
    return pipe_or_transformer, models


def self_attention_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """``{name: module}`` of the self-attention layers PSA serves: every block's ``attn1``."""
    return {
        name: module
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] == "attn1" and hasattr(module, "set_processor")
    }


def default_preset_name(family: str, pipe: Any, models: dict[str, torch.nn.Module]) -> str:
    """The published preset closest to this model when none is given.

    CogVideoX: "cogvideox1.5-5b" with a temporal patch (``patch_size_t``), else "cogvideox-5b".
    Wan: "wan2.2-a14b" with two experts, "wan2.2-5b" for a pipeline with ``expand_timesteps``,
    "wan2.1-14b" for a 40-layer transformer, else "wan2.1-1.3b".
    """
    first = next(iter(models.values()))
    if family == "cogvideox":
        return "cogvideox1.5-5b" if getattr(first.config, "patch_size_t", None) else "cogvideox-5b"
    if len(models) > 1:
        return "wan2.2-a14b"
    if pipe is not None and getattr(getattr(pipe, "config", None), "expand_timesteps", False):
        return "wan2.2-5b"
    return "wan2.1-14b" if getattr(first.config, "num_layers", None) == 40 else "wan2.1-1.3b"


def _schedule(family: str, pipe: Any, models: dict, preset: Any, config: PSAConfig | None, overrides: dict) -> Any:
    if config is not None and not isinstance(config, PSAConfig):
        raise TypeError(f"config must be a PSAConfig, got {type(config).__name__}")
    if preset is None and config is not None:
        return config.replace(**overrides) if overrides else config
    if preset is None:
        preset = default_preset_name(family, pipe, models)
    schedule = resolve_schedule(preset)
    if isinstance(schedule, PSAConfig):
        raise TypeError("preset must be a preset or a preset name; pass a PSAConfig as config=")
    if schedule.family != family:
        raise ValueError(f"preset {schedule.name!r} is for {schedule.family}, but the model is {family}")
    if config is not None:
        schedule = dataclasses.replace(schedule, config=config)
    return schedule.with_config(**overrides) if overrides else schedule


class PSAHandle:
    """What ``enable_psa`` installed; ``disable()`` (or leaving a ``with`` block) takes it off.

    family:       "cogvideox" or "wan".
    schedule:     the preset (or PSAConfig) in use.
    transformers: ``{attribute: transformer}`` with PSA installed.
    """

    def __init__(
        self,
        *,
        family: str,
        state: PSAState,
        transformers: dict[str, torch.nn.Module],
        originals: dict[str, dict[str, Any]],
    ) -> None:
        self.family = family
        self.state = state
        self.transformers = transformers
        self._originals = originals
        self._installed: dict[str, dict[str, PSAProcessor]] = {}
        self.enabled = False

    @property
    def schedule(self) -> Any:
        return self.state.schedule

    @property
    def config(self) -> PSAConfig:
        """The sparse-step budget."""
        return self.state.steady_config

    def stats(self) -> dict[int, dict[str, LayerStats]]:
        """``{step: {layer: LayerStats}}`` of the pipeline call in progress, or else of the last one.

        Layers are named ``"<transformer attribute>.<module path>"``, e.g.
        ``"transformer.blocks.0.attn1"``; a ``LayerStats`` holds the density used (mean over the
        step's calls), whether the layer ran dense and why.
        """
        return self.state.stats()

    def mean_density(self) -> float:
        """Mean attention density over the steps and layers of ``stats()`` (NaN before any call)."""
        return mean_density(self.stats())

    def disable(self) -> None:
        """Remove the step hooks and restore the original processor objects (a no-op when disabled)."""
        if not self.enabled:
            return
        self.state.flush()
        for attr, model in self.transformers.items():
            remove_step_hook(model)
            layers = self_attention_layers(model)
            for name, original in self._originals[attr].items():
                module = layers.get(name)
                if module is None:
                    continue
                if module.processor is self._installed[attr][name]:
                    module.set_processor(original)
                else:
                    logger.warning(
                        "disable_psa: %s.%s has had its processor replaced since enable_psa (%s); left as is",
                        attr,
                        name,
                        type(module.processor).__name__,
                    )
        self.enabled = False

    def __enter__(self) -> PSAHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.disable()

    def __repr__(self) -> str:
        name = getattr(self.schedule, "name", None) or self.config
        layers = sum(len(v) for v in self._originals.values())
        state = "enabled" if self.enabled else "disabled"
        return f"PSAHandle({self.family}, {name!r}, {layers} self-attention layers, {state})"

    def _install(self, backend: str) -> None:
        for attr, model in self.transformers.items():
            self._installed[attr] = {}
            for name, module in self_attention_layers(model).items():
                original = self._originals[attr][name]
                processor = PSAProcessor(self.schedule, backend=backend)
                processor._state = self.state
                processor._layer = f"{attr}.{name}"
                for key in ("_attention_backend", "_parallel_config"):
                    if getattr(original, key, None) is not None:
                        setattr(processor, key, getattr(original, key))
                module.set_processor(processor)
                self._installed[attr][name] = processor
            register_step_hook(model, PSAStepHook(self.state, attr, self.family, handle=self))
        self.enabled = True


def enable_psa(
    pipe_or_transformer: Any,
    preset: Any = None,
    config: PSAConfig | None = None,
    *,
    backend: str = "auto",
    **overrides: Any,
) -> PSAHandle:
    """Install pyramid sparse attention on a CogVideoX or Wan pipeline (or a bare transformer).

    preset:    a preset or preset name; its family must match the model. None picks the published
               preset closest to the model (``default_preset_name``) unless ``config`` is given.
    config:    a PSAConfig: alone, sparse at every step; with a preset, replaces the preset's config
               and keeps its dense-step schedule.
    backend:   ``psa_attention`` backend ("auto", "reference", "triton").
    overrides: PSAConfig fields to replace, e.g. ``block_q=64``.

    The step index comes from the pipeline's scheduler timesteps (with a bare transformer, from the
    sequence of timesteps; the run length is then the preset's ``num_steps``). Raises ValueError for
    an unsupported model, a preset of another family, or PSA already enabled -- before changing
    anything. Returns a ``PSAHandle``; ``with enable_psa(pipe) as handle: ...`` disables on exit.
    """
    pipe, models = _transformers(pipe_or_transformer)
    families = {attr: family_of_transformer(model) for attr, model in models.items()}
    for attr, family in families.items():
        if family is None:
            raise ValueError(
                f"{attr} is a {type(models[attr]).__name__}; PSA supports CogVideoXTransformer3DModel "
                "and WanTransformer3DModel"
            )
    family = families[next(iter(models))]
    schedule = _schedule(family, pipe, models, preset, config, overrides)
    originals: dict[str, dict[str, Any]] = {}
    for attr, model in models.items():
        if find_step_hook(model) is not None:
            raise ValueError(f"PSA is already enabled on {attr}; disable it first (handle.disable() or disable_psa)")
        layers = self_attention_layers(model)
        if not layers:
            raise ValueError(f"{attr} has no self-attention layers (attn1) to serve")
        taken = [name for name, module in layers.items() if isinstance(module.processor, PSAProcessor)]
        if taken:
            raise ValueError(
                f"{attr}.{taken[0]} already has a PSAProcessor (set_attn_processor); restore the stock processors "
                "before enable_psa"
            )
        originals[attr] = {name: module.processor for name, module in layers.items()}

    timesteps = None
    if pipe is not None:
        pipe_ref = weakref.ref(pipe)

        def timesteps():
            scheduler = getattr(pipe_ref(), "scheduler", None)
            return getattr(scheduler, "timesteps", None)

    state = PSAState(schedule, timesteps=timesteps)
    handle = PSAHandle(family=family, state=state, transformers=models, originals=originals)
    handle._install(backend)
    logger.info("PSA enabled: %r", handle)
    return handle


def disable_psa(pipe_transformer_or_handle: Any) -> None:
    """Take PSA off: a ``PSAHandle``, or a pipeline/transformer that ``enable_psa`` was called on.

    Raises ValueError when PSA is not enabled there.
    """
    if isinstance(pipe_transformer_or_handle, PSAHandle):
        pipe_transformer_or_handle.disable()
        return
    _, models = _transformers(pipe_transformer_or_handle)
    handles = []
    for model in models.values():
        hook = find_step_hook(model)
        if hook is not None and hook.handle is not None and hook.handle not in handles:
            handles.append(hook.handle)
    if not handles:
        raise ValueError(f"PSA is not enabled on this {type(pipe_transformer_or_handle).__name__}")
    for handle in handles:
        handle.disable()
