"""The 4-step CogVideoX-5B recipe: a PSA-distilled LoRA, the trailing DPM scheduler and PSA in one call.

    pipe = CogVideoXPipeline.from_pretrained("THUDM/CogVideoX-5b", torch_dtype=torch.bfloat16).to("cuda")
    lora = load_psa_lora(pipe)                      # GYP666/BLADE, preset "cogvideox-5b-4step"
    video = pipe(prompt, **lora.call_kwargs).frames[0]   # 4 steps, guidance 1.0
    lora.remove()                                   # back to the pipeline as it was

``load_psa_lora`` finds the file (``lora_source.resolve_lora_file``) and checks it against the
pipeline's transformer (``lora_check.check_lora_file``) *before* it changes anything (diffusers only
warns about keys that match no module and would load a partial LoRA), then loads it through diffusers
and peft, swaps in the preset's scheduler, enables PSA with the preset and optionally fuses the LoRA.
All of that is one transaction (``_Undo``): if any of it fails, everything done so far is undone and
the pipeline is left as it was; ``PSALora.remove`` runs the same undo later.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..presets import Preset, get_preset
from .families import family_of_transformer
from .logs import get_logger
from .lora_check import check_lora_file
from .lora_source import resolve_lora_file

logger = get_logger(__name__)

DEFAULT_REPO = "GYP666/BLADE"
DEFAULT_WEIGHT_NAME = "cogvideox-5b-psa-lora/pytorch_lora_weights.safetensors"
DEFAULT_PRESET = "cogvideox-5b-4step"

__all__ = ["DEFAULT_PRESET", "DEFAULT_REPO", "DEFAULT_WEIGHT_NAME", "PSALora", "load_psa_lora"]


# ----------------------------------------------------------------------------------------------- result


@dataclass
class PSALora:
    """What ``load_psa_lora`` did, and how to run and undo it.

    call_kwargs:  keyword arguments for the pipeline call the recipe needs, e.g.
                  ``{"num_inference_steps": 4, "guidance_scale": 1.0}``: ``pipe(prompt, **lora.call_kwargs)``.
    handle:       the ``PSAHandle`` of ``enable_psa`` (``handle.stats()``: density per step and layer).
    preset:       the preset used.
    adapter_name: the peft adapter holding the LoRA.
    weight_file:  the local ``.safetensors`` file that was loaded.
    fused:        whether the LoRA was fused into the base weights (the adapter is kept, so ``remove``
                  can unfuse it).
    modules:      number of transformer modules the LoRA adapts.
    """

    call_kwargs: dict[str, Any]
    handle: Any
    preset: Preset = field(repr=False)
    adapter_name: str
    weight_file: str
    fused: bool
    modules: int
    _undo: _Undo = field(repr=False)

    def remove(self) -> None:
        """Undo ``load_psa_lora``: disable PSA, unfuse and remove the adapter, restore the old scheduler."""
        self._undo.run()


# ----------------------------------------------------------------------------------------------- scheduler


def _scheduler_class(preset: Preset):
    if preset.scheduler is None:
        return None
    import diffusers
    from diffusers import SchedulerMixin

    cls = getattr(diffusers, preset.scheduler, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(f"preset {preset.name!r}: scheduler {preset.scheduler!r} is not a diffusers scheduler class")
    return cls


# ----------------------------------------------------------------------------------------------- undo


class _Undo:
    """Remembers the pipeline's state before ``load_psa_lora`` and restores it."""

    _PEFT_ATTRS = ("peft_config", "_hf_peft_config_loaded")

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.scheduler = pipe.scheduler
        self.adapters_before = set(getattr(self.transformer, "peft_config", None) or {})
        self.active_before = list(pipe.get_active_adapters()) if self.adapters_before else []
        self.attrs = {a: self.transformer.__dict__[a] for a in self._PEFT_ATTRS if a in self.transformer.__dict__}
        self.adapter_name: str | None = None
        self.handle = None
        self.fused = False
        self.base_weights: dict[str, torch.Tensor] = {}
        self.done = False

    def backup_base_weights(self, module_names) -> None:
        """CPU copies of the adapted layers' base weights, so unfusing restores them bit for bit
        (subtracting the LoRA product again leaves rounding residue)."""
        for name in module_names:
            module = self.transformer.get_submodule(name)
            base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            for pname, param in base.named_parameters(recurse=False):
                self.base_weights[f"{name}.{pname}"] = param.detach().to("cpu", copy=True)

    def run(self) -> None:
        if self.done:
            return
        errors = []
        for step in (self._disable_psa, self._unfuse, self._remove_adapter, self._restore_scheduler):
            try:
                step()
            except Exception as err:  # keep undoing the rest; report the first failure afterwards
                logger.exception("load_psa_lora: undo step %s failed", step.__name__)
                errors.append(err)
        self.done = True
        if errors:
            raise RuntimeError(f"load_psa_lora: could not fully restore the pipeline: {errors[0]}") from errors[0]

    def _disable_psa(self) -> None:
        if self.handle is not None:
            from .enable import disable_psa

            disable_psa(self.handle)
            self.handle = None

    def _unfuse(self) -> None:
        if self.fused:
            if any(getattr(m, "merged", False) for m in self.transformer.modules()):
                self.pipe.unfuse_lora(components=["transformer"])
            with torch.no_grad():
                for key, saved in self.base_weights.items():
                    module_name, pname = key.rsplit(".", 1)
                    module = self.transformer.get_submodule(module_name)
                    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
                    getattr(base, pname).copy_(saved)
            self.base_weights.clear()
            self.fused = False

    def _remove_adapter(self) -> None:
        name = self.adapter_name
        if name is None or name not in (getattr(self.transformer, "peft_config", None) or {}):
            return
        if self.adapters_before:
            self.pipe.delete_adapters(name)
            if self.active_before:  # set_adapter, not set_adapters: keeps the adapters' weights
                self.transformer.set_adapter(self.active_before)
            return
        self.pipe.unload_lora_weights()
        for attr in self._PEFT_ATTRS:  # peft leaves markers behind: put back exactly what was there
            if attr in self.attrs:
                self.transformer.__dict__[attr] = self.attrs[attr]
            else:
                self.transformer.__dict__.pop(attr, None)

    def _restore_scheduler(self) -> None:
        if self.pipe.scheduler is not self.scheduler:
            self.pipe.scheduler = self.scheduler


# ----------------------------------------------------------------------------------------------- load


def load_psa_lora(
    pipe,
    repo_or_path: str | os.PathLike[str] = DEFAULT_REPO,
    weight_name: str | None = DEFAULT_WEIGHT_NAME,
    *,
    adapter_name: str = "psa",
    preset: str | Preset = DEFAULT_PRESET,
    fuse: bool = False,
) -> PSALora:
    """Load a PSA-distilled LoRA into ``pipe``, switch to the preset's scheduler and enable PSA.

    pipe:         a diffusers pipeline with a LoRA loader (``CogVideoXPipeline`` for the default recipe).
    repo_or_path: a hub repo id (default ``GYP666/BLADE``), a local directory holding ``weight_name``,
                  or a local ``.safetensors`` file (``weight_name`` is then ignored).
    weight_name:  the file inside the repo or directory.
    adapter_name: the peft adapter name; it must not exist yet.
    preset:       a preset name or ``Preset`` of the pipeline's family (default ``cogvideox-5b-4step``);
                  its ``scheduler``/``scheduler_kwargs`` replace the pipeline's scheduler
                  (``CogVideoXDPMScheduler`` with ``timestep_spacing="trailing"`` for the default), built
                  ``from_config`` of the current one; its schedule and budget drive PSA.
    fuse:         fuse the LoRA into the base weights (no LoRA cost per call). A CPU copy of the adapted
                  layers' base weights is kept so that ``PSALora.remove`` restores them bit for bit.

    Adapters the transformer already had stay loaded, and those active stay active with their weights,
    beside the new one.

    Returns a ``PSALora``: ``pipe(prompt, **result.call_kwargs)`` runs the recipe (4 steps, guidance 1.0
    by default); ``result.handle`` is the PSA handle; ``result.remove()`` undoes everything.

    Raises, with the pipeline untouched: ``FileNotFoundError`` (no such local file) or ``OSError`` (hub
    unreachable, offline without a cached copy, no such repo/file); ``ValueError`` for a ``weight_name``
    that leads outside the directory or repo, a file that does not fit the transformer (see
    ``check_lora_file``), a preset of another family, an adapter name in use, or PSA already enabled.
    An error after loading began is re-raised after undoing every change.
    """
    from .hooks import find_step_hook

    transformer = getattr(pipe, "transformer", None)
    if transformer is None or not hasattr(pipe, "load_lora_weights"):
        raise ValueError(
            f"{type(pipe).__name__}: load_psa_lora needs a diffusers pipeline with a transformer and LoRA support"
        )
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if not isinstance(preset, Preset):
        raise TypeError(f"preset must be a preset name or a Preset, got {type(preset).__name__}")
    family = family_of_transformer(transformer)
    if family != preset.family:
        raise ValueError(
            f"preset {preset.name!r} is for {preset.family} models; the pipeline's transformer is "
            f"{type(transformer).__name__}"
        )
    scheduler_cls = _scheduler_class(preset)
    if adapter_name in (getattr(transformer, "peft_config", None) or {}):
        raise ValueError(f"adapter_name={adapter_name!r} is already loaded in the pipeline; pick another name")
    if any(find_step_hook(m) is not None for m in _transformers(pipe)):
        raise ValueError("PSA is already enabled on this pipeline; disable it first (disable_psa)")

    file = resolve_lora_file(repo_or_path, weight_name)
    info = check_lora_file(file, transformer)
    logger.info("LoRA %s: %d modules, ranks %s", file, len(info.ranks), sorted(set(info.ranks.values())))

    undo = _Undo(pipe)
    try:
        undo.adapter_name = adapter_name
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=adapter_name)
        if undo.active_before:  # loading activates only the new adapter: the user's stay active, weights kept
            transformer.set_adapter([*undo.active_before, adapter_name])
        loaded = _count_adapted(transformer, adapter_name)
        if loaded != len(info.ranks):
            raise ValueError(f"{file}: diffusers adapted {loaded} modules, the file holds {len(info.ranks)}")
        if scheduler_cls is not None:
            pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **preset.scheduler_kwargs_dict())
        from .enable import enable_psa

        undo.handle = enable_psa(pipe, preset=preset)
        if fuse:
            undo.backup_base_weights(info.ranks)
            undo.fused = True  # set first: a fuse that fails half-way is unfused by the undo
            pipe.fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=[adapter_name])
    except BaseException:
        undo.run()
        raise
    call_kwargs: dict[str, Any] = {"num_inference_steps": preset.num_steps}
    if preset.guidance_scale is not None:
        call_kwargs["guidance_scale"] = preset.guidance_scale
    return PSALora(
        call_kwargs=call_kwargs,
        handle=undo.handle,
        preset=preset,
        adapter_name=adapter_name,
        weight_file=str(file),
        fused=fuse,
        modules=len(info.ranks),
        _undo=undo,
    )


def _transformers(pipe) -> list[torch.nn.Module]:
    return [m for m in (getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None)) if m is not None]


def _count_adapted(transformer: torch.nn.Module, adapter_name: str) -> int:
    return sum(
        1
        for m in transformer.modules()
        if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict) and adapter_name in m.lora_A
    )
