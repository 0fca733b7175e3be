"""The 4-step CogVideoX-5B recipe: a PSA-distilled LoRA, the trailing DPM scheduler and PSA in one call.

    pipe = CogVideoXPipeline.from_pretrained("THUDM/CogVideoX-5b", torch_dtype=torch.bfloat16).to("cuda")
    lora = load_psa_lora(pipe)                      # GYP666/BLADE, preset "cogvideox-5b-4step"
    video = pipe(prompt, **lora.call_kwargs).frames[0]   # 4 steps, guidance 1.0
    lora.remove()                                   # back to the pipeline as it was

``load_psa_lora`` checks the LoRA file against the pipeline's transformer *before* it changes anything
(diffusers only warns about keys that match no module and would load a partial LoRA), then loads it
through diffusers and peft, swaps in the preset's scheduler, enables PSA with the preset and optionally
fuses the LoRA. If any of that fails, everything done so far is undone: the pipeline is left as it was.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..presets import Preset, get_preset

logger = logging.getLogger(__name__)

DEFAULT_REPO = "GYP666/BLADE"
DEFAULT_WEIGHT_NAME = "cogvideox-5b-psa-lora/pytorch_lora_weights.safetensors"
DEFAULT_PRESET = "cogvideox-5b-4step"

_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_magnitude_vector)$")
_PREFIX = "transformer."
# Key layouts of LoRA files, to say what a file that does not fit looks like.
_LAYOUT_HINTS = (
    (
        "transformer.transformer_blocks.",
        "a diffusers LoRA for CogVideoX-style blocks ('transformer.transformer_blocks.N...')",
    ),
    ("transformer.blocks.", "a diffusers LoRA for Wan ('transformer.blocks.N...')"),
    ("diffusion_model.", "an original-format (non-diffusers) checkpoint ('diffusion_model....')"),
    ("lora_unet_", "a kohya/musubi-format LoRA ('lora_unet_...')"),
    ("unet.", "a UNet LoRA (Stable Diffusion style, 'unet....')"),
    ("text_encoder", "a text-encoder LoRA"),
)
_FAMILY_LAYOUT = {"cogvideox": "transformer.transformer_blocks.", "wan": "transformer.blocks."}
_EXAMPLES = 3


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


# ----------------------------------------------------------------------------------------------- files


def resolve_lora_file(repo_or_path: str | os.PathLike[str], weight_name: str | None = None) -> Path:
    """The local ``.safetensors`` file for a hub repo id, a local directory or a local file.

    A local file is used as is (``weight_name`` ignored); for a directory, ``weight_name`` is the file
    inside it; anything else is taken as a hub repo id and ``weight_name`` is downloaded (or taken from
    the local cache). A missing local file raises ``FileNotFoundError``; a hub that cannot be reached,
    or a repo/file that does not exist there, raises ``OSError`` saying so, with what to do instead.
    """
    source = os.fspath(repo_or_path)
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if not weight_name:
            raise FileNotFoundError(f"{path}: is a directory; pass weight_name, the LoRA file inside it")
        file = path / weight_name
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no such LoRA file (directory {path}, weight_name {weight_name!r})")
        return file
    if _looks_like_path(source):
        raise FileNotFoundError(f"{source}: no such LoRA file or directory")
    if not weight_name:
        raise ValueError(f"{source}: a hub repo id needs weight_name, the LoRA file's path in the repo")
    return _hub_download(source, weight_name)


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith((".", "/", "~", "\\"))
        or source.count("/") > 1
        or (os.sep != "/" and os.sep in source)
        or source.endswith((".safetensors", ".bin", ".pt", ".pth"))
    )


def _hub_download(repo_id: str, weight_name: str) -> Path:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    where = f"hub repo {repo_id!r}, file {weight_name!r}"
    try:
        return Path(hf_hub_download(repo_id, weight_name))
    except LocalEntryNotFoundError as err:
        why = (
            "HF_HUB_OFFLINE is set"
            if constants.HF_HUB_OFFLINE
            else "the Hugging Face hub cannot be reached (no network?)"
        )
        raise OSError(
            f"{where}: not in the local cache and {why}. Download it where there is a network "
            f"(`huggingface-cli download {repo_id} {weight_name}`) and set HF_HUB_OFFLINE=1, "
            f"or pass a local path to the .safetensors file"
        ) from err
    except RepositoryNotFoundError as err:
        raise OSError(f"{where}: no such repository on the hub (or it is private: log in first)") from err
    except EntryNotFoundError as err:
        raise OSError(f"{where}: the repository has no such file") from err
    except HFValidationError as err:
        raise FileNotFoundError(f"{repo_id}: neither a local file or directory nor a valid hub repo id") from err


# ----------------------------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class LoraFileInfo:
    """What ``check_lora_file`` found: the adapted modules (transformer-relative names) and their ranks."""

    path: Path
    ranks: dict[str, int]
    metadata: dict[str, Any] | None


def check_lora_file(path: str | os.PathLike[str], transformer: torch.nn.Module) -> LoraFileInfo:
    """Check that the LoRA file fits ``transformer`` exactly; a ``ValueError`` naming the file and the
    reason otherwise. Reads key names, shapes and metadata, and checks the values are finite.

    Refused: a file that is not safetensors; keys that are not diffusers/peft LoRA keys
    (``transformer.<module>.lora_A.weight`` / ``.lora_B.weight``); keys for another model family or
    for modules the transformer lacks, even some of them (diffusers would load the rest and only
    warn); unpaired ``lora_A``/``lora_B``; ranks that disagree between A and B or with the file's
    metadata; shapes that do not fit the target module; non-finite values.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    name = str(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{name}: only .safetensors LoRA files are supported (got {path.suffix or 'no suffix'!r})")
    try:
        with safe_open(name, framework="pt") as f:
            metadata_raw = f.metadata() or {}
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
            dtypes = {key: f.get_slice(key).get_dtype() for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{name}: not a readable safetensors file: {err}") from err

    if not shapes:
        raise ValueError(f"{name}: the file holds no tensors")
    lora_keys = [k for k in shapes if "lora" in k]
    if not lora_keys:
        raise ValueError(f"{name}: no LoRA keys (no key contains 'lora'; e.g. {_some(shapes)}): not a LoRA file")
    other = [k for k in shapes if "lora" not in k]
    if other:
        if any(k.endswith(".alpha") or "dora_scale" in k for k in other):
            raise ValueError(
                f"{name}: keys {_some(other)} are not diffusers/peft LoRA keys (kohya-style alpha or DoRA scale); "
                "convert the file to the diffusers layout first"
            )
        raise ValueError(f"{name}: keys without 'lora' ({_some(other)}): not a diffusers LoRA file")
    family = _family_of(transformer)
    layout = _layout_hint(lora_keys)
    no_prefix = [k for k in lora_keys if not k.startswith(_PREFIX)]
    if no_prefix:
        raise ValueError(
            f"{name}: keys {_some(no_prefix)} are not for the pipeline's transformer (expected keys starting "
            f"with {_PREFIX!r}){_looks_like(layout)}"
        )
    parsed: dict[str, dict[str, tuple[int, ...]]] = defaultdict(dict)
    for key in lora_keys:
        match = _LORA_KEY.match(key[len(_PREFIX) :])
        if match is None:
            raise ValueError(
                f"{name}: key {key!r} is not a diffusers/peft LoRA key "
                "('transformer.<module>.lora_A.weight' / '.lora_B.weight')"
            )
        parsed[match["module"]][match["part"]] = shapes[key]
    bad_dtype = [k for k, d in dtypes.items() if not _is_float_dtype(d)]
    if bad_dtype:
        raise ValueError(f"{name}: tensors {_some(bad_dtype)} are not floating point ({dtypes[bad_dtype[0]]})")

    modules = dict(transformer.named_modules())
    missing = sorted(m for m in parsed if m not in modules)
    if missing:
        cls = type(transformer).__name__
        expected = _FAMILY_LAYOUT.get(family or "")
        wrong_family = expected is not None and layout is not None and not layout[0].startswith(expected)
        if wrong_family:
            raise ValueError(
                f"{name}: keys for another model family: the file looks like {layout[1]}, the pipeline's "
                f"transformer is {cls} (keys '{expected}N...'); no module matches e.g. {_some(missing)}"
            )
        if len(missing) == len(parsed):
            raise ValueError(f"{name}: no LoRA module matches a module of {cls} (e.g. {_some(missing)})")
        raise ValueError(
            f"{name}: partial match: {len(missing)} of {len(parsed)} LoRA modules match no module of {cls} "
            f"(e.g. {_some(missing)}); diffusers would load the rest and only warn, so the file is refused"
        )

    meta = _lora_metadata(metadata_raw, name)
    ranks: dict[str, int] = {}
    for module_name, parts in sorted(parsed.items()):
        ranks[module_name] = _check_module(name, module_name, parts, modules[module_name], meta)
    _check_finite(name, lora_keys)
    return LoraFileInfo(path=path, ranks=ranks, metadata=meta)


def _check_module(name: str, module_name: str, parts: dict[str, tuple[int, ...]], module, meta) -> int:
    where = f"{name}: module {module_name!r}"
    for part in ("lora_A.weight", "lora_B.weight"):
        if part not in parts:
            other = "lora_B.weight" if part == "lora_A.weight" else "lora_A.weight"
            raise ValueError(f"{where} has {other} but no {part}: every LoRA module needs both")
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    a, b = parts["lora_A.weight"], parts["lora_B.weight"]
    if isinstance(base, torch.nn.Linear):
        in_dim, out_dim, kernel = base.in_features, base.out_features, ()
        ones = ()
    elif isinstance(base, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        in_dim, out_dim, kernel = base.in_channels // base.groups, base.out_channels, tuple(base.kernel_size)
        ones = (1,) * len(kernel)
    else:
        raise ValueError(f"{where} is a {type(base).__name__}; only Linear and Conv LoRA layers are supported")
    rank = a[0] if a else -1
    expect_a = "[" + ", ".join(str(x) for x in ("r", in_dim, *kernel)) + "]"
    expect_b = "[" + ", ".join(str(x) for x in (out_dim, "r", *ones)) + "]"
    if len(a) != 2 + len(kernel) or len(b) != 2 + len(ones) or b[1] != rank:
        raise ValueError(
            f"{where}: rank mismatch: lora_A {list(a)} and lora_B {list(b)} do not share one rank "
            f"(expected lora_A {expect_a}, lora_B {expect_b})"
        )
    if a[1:] != (in_dim, *kernel) or b[0] != out_dim or b[2:] != ones:
        raise ValueError(
            f"{where}: shape mismatch: lora_A {list(a)}, lora_B {list(b)} do not fit {type(base).__name__} "
            f"with {in_dim} inputs and {out_dim} outputs (expected lora_A {expect_a}, lora_B {expect_b}, r={rank})"
        )
    if "lora_B.bias" in parts and parts["lora_B.bias"] != (out_dim,):
        raise ValueError(f"{where}: lora_B.bias has shape {list(parts['lora_B.bias'])}, expected [{out_dim}]")
    if "lora_magnitude_vector" in parts and parts["lora_magnitude_vector"] != (out_dim,):
        raise ValueError(
            f"{where}: lora_magnitude_vector has shape {list(parts['lora_magnitude_vector'])}, expected [{out_dim}]"
        )
    if meta is not None:
        expected = _metadata_rank(meta, module_name)
        if expected is not None and expected != rank:
            raise ValueError(
                f"{where}: rank mismatch: the tensors have rank {rank}, the file's metadata says r={expected}"
            )
    return rank


def _lora_metadata(raw: dict[str, str], name: str) -> dict[str, Any] | None:
    text = raw.get("lora_adapter_metadata")
    if text is None:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{name}: the 'lora_adapter_metadata' entry is not valid JSON: {err}") from None
    # diffusers stores one entry per component, e.g. {"transformer.r": 4, ...}
    meta = {k[len(_PREFIX) :]: v for k, v in data.items() if k.startswith(_PREFIX)} or data
    return meta if isinstance(meta, dict) else None


def _metadata_rank(meta: dict[str, Any], module_name: str) -> int | None:
    for pattern, rank in (meta.get("rank_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return int(rank)
    r = meta.get("r")
    return int(r) if isinstance(r, int) else None


def _check_finite(name: str, keys: list[str]) -> None:
    from safetensors import safe_open

    with safe_open(name, framework="pt") as f:
        for key in keys:
            if not torch.isfinite(f.get_tensor(key)).all():
                raise ValueError(f"{name}: tensor {key!r} holds NaN or infinite values")


def _is_float_dtype(dtype: str) -> bool:
    return dtype.upper() in {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def _layout_hint(keys: list[str]) -> tuple[str, str] | None:
    for prefix, text in _LAYOUT_HINTS:
        if sum(k.startswith(prefix) for k in keys) * 2 > len(keys):
            return prefix, text
    return None


def _looks_like(layout: tuple[str, str] | None) -> str:
    return f"; the file looks like {layout[1]}" if layout else ""


def _some(items) -> str:
    items = sorted(items)
    shown = ", ".join(repr(k) for k in items[:_EXAMPLES])
    return shown + (f" and {len(items) - _EXAMPLES} more" if len(items) > _EXAMPLES else "")


def _family_of(transformer: torch.nn.Module) -> str | None:
    from .enable import model_family

    return model_family(transformer)


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
            self.pipe.set_adapters(self.active_before)
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

    Returns a ``PSALora``: ``pipe(prompt, **result.call_kwargs)`` runs the recipe (4 steps, guidance 1.0
    by default); ``result.handle`` is the PSA handle; ``result.remove()`` undoes everything.

    Raises, with the pipeline untouched: ``FileNotFoundError`` (no such local file) or ``OSError`` (hub
    unreachable, offline without a cached copy, no such repo/file); ``ValueError`` for a file that does
    not fit the transformer (see ``check_lora_file``), a preset of another family, an adapter name in
    use, or PSA already enabled. An error after loading began is re-raised after undoing every change.
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
    family = _family_of(transformer)
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
