"""enable_psa / disable_psa: install PSA on a CogVideoX or Wan pipeline (or transformer) in one line,
take it off in one line, and read what it did.

``enable_psa`` replaces the processor of every self-attention layer (``attn1``; Wan's cross-attention
``attn2`` keeps its own) with a ``PSAProcessor``, keeps the original processor objects, and registers
a step hook on each transformer (``transformer`` and, for Wan2.2, ``transformer_2``) through diffusers'
``HookRegistry``, plus the token-order hooks for a Gilbert budget (``hooks.py``). A ``torch.compile``d
transformer is served through the module it wraps. A layer whose processor a stock one replaced
meanwhile (``fuse_qkv_projections()``) gets PSA back at the next forward (``PSAHandle.reclaim``).
``disable_psa`` / ``PSAHandle.disable`` / leaving the handle's ``with`` block removes the hooks and
puts the very same original processor objects back, with the attention backend set meanwhile.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from diffusers.utils.torch_utils import unwrap_module

from ..attention import BACKENDS
from ..config import PSAConfig
from .families import family_of_transformer
from .hooks import PSAStepHook, find_step_hook, register_order_hooks, register_step_hook, remove_step_hook
from .logs import get_logger
from .processor import PSAProcessor, resolve_schedule
from .state import DENSE_FALLBACK_DENSITY, LayerStats, PSAState, mean_density

logger = get_logger(__name__)

TRANSFORMER_ATTRS = ("transformer", "transformer_2")
"""Pipeline attributes that may hold a denoising transformer (``transformer_2``: Wan2.2's low-noise expert)."""


def _transformers(pipe_or_transformer: Any) -> tuple[Any, dict[str, torch.nn.Module]]:
    """``(pipeline or None, {attribute: transformer})``; a ``torch.compile``d transformer is taken by
    the module it wraps (hooks and processors live there; the compiled wrapper sees them)."""
    if isinstance(pipe_or_transformer, torch.nn.Module):
        return None, {"transformer": unwrap_module(pipe_or_transformer)}
    models = {
        attr: unwrap_module(getattr(pipe_or_transformer, attr))
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
        self._at_enable = {attr: dict(layers) for attr, layers in originals.items()}
        self._installed: dict[str, dict[str, PSAProcessor]] = {}
        self._modules: dict[str, dict[str, torch.nn.Module]] = {}
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
        """Remove the hooks and restore the original processor objects (a no-op when disabled)."""
        if not self.enabled:
            return
        self.state.flush()
        self._uninstall()
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

    def reclaim(self, attr: str) -> None:
        """Put PSA back on the self-attention layers of ``transformer`` ``attr`` whose processor was
        replaced since ``enable_psa`` by one that PSA reproduces (``fuse_qkv_projections()`` on CogVideoX
        swaps in ``FusedCogVideoXAttnProcessor2_0``; ``set_attn_processor`` with a stock processor):
        the replacement becomes what ``disable`` restores. Other processors are left alone (and left in
        place by ``disable``). Called by the step hook before every forward; host-side, cheap."""
        modules, installed, kinds = self._modules.get(attr, {}), self._installed.get(attr, {}), _reclaimable()
        reclaimed = [
            name
            for name, processor in installed.items()
            if modules[name].processor is not processor and type(modules[name].processor) in kinds
        ]
        if reclaimed:
            self._forget_in_saved_processors(attr)
        for name in reclaimed:
            processor, module = installed[name], modules[name]
            current = self._originals[attr][name] = module.processor
            for key in ("_attention_backend", "_parallel_config"):
                if hasattr(current, key):
                    setattr(processor, key, getattr(current, key))
            module.set_processor(processor)
        if reclaimed:
            self.state.note(
                f"reclaimed {attr}",
                f"{len(reclaimed)} self-attention layer(s) of {attr} had their processor replaced by "
                f"{type(self._originals[attr][reclaimed[0]]).__name__} (e.g. fuse_qkv_projections()): PSA "
                "stays on them, and disable_psa restores the replacement",
            )

    def _forget_in_saved_processors(self, attr: str) -> None:
        """``fuse_qkv_projections()`` keeps the processors it replaced in ``original_attn_processors`` for
        ``unfuse_qkv_projections()``: there, PSA's processors become the ones PSA replaced, so that an
        unfuse after ``disable`` does not bring PSA back."""
        saved = getattr(self.transformers[attr], "original_attn_processors", None)
        if not isinstance(saved, dict):
            return
        names = {id(p): name for name, p in self._installed.get(attr, {}).items()}
        for key, processor in list(saved.items()):
            name = names.get(id(processor))
            if name is not None:
                saved[key] = self._at_enable[attr][name]

    def _install(self, backend: str) -> None:
        """Install processors and hooks on every transformer; on any failure undo what was done."""
        reorder = self.config.token_order == "gilbert"
        try:
            for attr, model in self.transformers.items():
                self._installed[attr] = {}
                self._modules[attr] = self_attention_layers(model)
                for name, module in self._modules[attr].items():
                    original = self._originals[attr][name]
                    processor = PSAProcessor(self.schedule, backend=backend)
                    processor._state = self.state
                    processor._layer = f"{attr}.{name}"
                    processor.control = torch.zeros(1 + module.heads, dtype=torch.int32)
                    for key in ("_attention_backend", "_parallel_config"):
                        if getattr(original, key, None) is not None:
                            setattr(processor, key, getattr(original, key))
                    module.set_processor(processor)
                    self._installed[attr][name] = processor
                self.state.register(attr, [(p._layer, p) for p in self._installed[attr].values()])
                register_step_hook(model, PSAStepHook(self.state, attr, self.family, handle=self, reorder=reorder))
                if reorder:
                    register_order_hooks(model, self.state, self.family)
        except BaseException:
            self._uninstall(quiet=True)
            raise
        self.enabled = True

    def _uninstall(self, *, quiet: bool = False) -> None:
        """Remove the hooks; give every layer that still has PSA's processor its original back, with the
        attention backend and parallel config set on PSA's processor meanwhile
        (``set_attention_backend``, ``enable_parallelism``)."""
        for attr, model in self.transformers.items():
            remove_step_hook(model)
            self._forget_in_saved_processors(attr)
            for name, processor in self._installed.get(attr, {}).items():
                module = self._modules[attr][name]
                original = self._originals[attr][name]
                if module.processor is processor:
                    for key in ("_attention_backend", "_parallel_config"):
                        value = getattr(processor, key, None)
                        if hasattr(original, key) and getattr(original, key) is not value:
                            setattr(original, key, value)
                    module.set_processor(original)
                elif not quiet:
                    known = type(module.processor) in _reclaimable()
                    logger.log(
                        logging.INFO if known else logging.WARNING,
                        "disable_psa: %s.%s has had its processor replaced since enable_psa (%s); left as is",
                        attr,
                        name,
                        type(module.processor).__name__,
                    )


def _reclaimable() -> tuple[type, ...]:
    """The stock processor classes whose computation ``PSAProcessor`` reproduces exactly."""
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    return (CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0, WanAttnProcessor)


def enable_psa(
    pipe_or_transformer: Any,
    preset: Any = None,
    config: PSAConfig | None = None,
    *,
    backend: str = "auto",
    dense_fallback: float | None = DENSE_FALLBACK_DENSITY,
    **overrides: Any,
) -> PSAHandle:
    """Install pyramid sparse attention on a CogVideoX or Wan pipeline (or a bare transformer).

    preset:    a preset or preset name; its family must match the model. None picks the published
               preset closest to the model (``default_preset_name``) unless ``config`` is given.
    config:    a PSAConfig: alone, sparse at every step; with a preset, replaces the preset's config
               and keeps its dense-step schedule.
    backend:   ``psa_attention`` backend ("auto", "reference", "triton").
    dense_fallback: a head whose mask, measured two forwards earlier, had a FLOP density above this
               runs dense attention (never slower than dense; docs/design.md, section 5); None: never.
    overrides: PSAConfig fields to replace, e.g. ``block_q=64``.

    The step index comes from the host, never from a device tensor: the pipeline's cache context
    (Wan passes ``step_index``), else the timestep's place in the scheduler's ``timesteps`` tensor that
    the pipeline iterates (CogVideoX). A forward that matches neither (a transformer called with its own
    timestep tensor) logs a warning and counts steps from timestep values (a host read); the run length
    is then the preset's ``num_steps``. A ``torch.compile``d transformer (``torch.compile(model)`` or
    ``model.compile()``, before or after this call) works as is. Raises ValueError for an unsupported
    model, a preset of another family, a bad ``dense_fallback``, or PSA already enabled -- before changing
    anything. Returns a ``PSAHandle``; ``with enable_psa(pipe) as handle: ...`` disables on exit.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: allowed values are {BACKENDS}")
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

    if dense_fallback is not None and (
        isinstance(dense_fallback, bool)
        or not isinstance(dense_fallback, (int, float))
        or not 0.0 < dense_fallback <= 1.0
    ):
        raise ValueError(f"dense_fallback={dense_fallback!r}: expected a FLOP density in (0, 1], or None")
    state = PSAState(schedule, dense_fallback=dense_fallback)
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
