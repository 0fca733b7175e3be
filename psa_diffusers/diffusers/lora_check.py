"""Check a LoRA file against a transformer before anything is loaded: ``check_lora_file``.

Pure: it reads the file (key names, shapes, dtypes, metadata, then the values to check they are
finite) and the transformer's module tree, and changes nothing. LoRA files come from users and the
hub, so everything in them is untrusted: whatever diffusers would load only in part, or reject half
way with an unrelated error, is refused here with a ``ValueError`` that names the file.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .families import family_of_transformer

METADATA_KEY = "lora_adapter_metadata"
"""The safetensors metadata entry where diffusers stores the adapter's peft config (JSON)."""

_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_magnitude_vector)$")
_PREFIX = "transformer."
# Optional parts, each with the metadata field that tells diffusers to create it on every module.
_OPTIONAL_PARTS = (("lora_B.bias", "lora_bias"), ("lora_magnitude_vector", "use_dora"))
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


@dataclass(frozen=True)
class LoraFileInfo:
    """What ``check_lora_file`` found: the adapted modules (transformer-relative names) and their ranks.

    metadata: the file's ``transformer.`` metadata entries without that prefix (peft config fields such
              as ``r``, ``rank_pattern``), or None when the file has no metadata.
    """

    path: Path
    ranks: dict[str, int]
    metadata: dict[str, Any] | None


def check_lora_file(path: str | os.PathLike[str], transformer: torch.nn.Module) -> LoraFileInfo:
    """Check that the LoRA file fits ``transformer`` exactly; a ``ValueError`` naming the file and the
    reason otherwise. Reads key names, shapes and metadata, and checks the values are finite.

    Refused: a file that is not safetensors; keys that are not diffusers/peft LoRA keys
    (``transformer.<module>.lora_A.weight`` / ``.lora_B.weight``); keys for another model family or
    for modules the transformer lacks, even some of them (diffusers would load the rest and only
    warn); unpaired ``lora_A``/``lora_B``; ``lora_B.bias`` or ``lora_magnitude_vector`` (DoRA) on
    some modules but not all (diffusers would give every module one and load the rest partially);
    ranks that disagree between A and B or with the file's metadata; shapes that do not fit the
    target module; non-finite values; ``lora_adapter_metadata`` that is not a JSON object of
    ``transformer.`` entries, or whose ``r``, ``rank_pattern``, ``lora_bias`` or ``use_dora`` are
    malformed (not the types peft takes, a regex that does not compile) or disagree with the tensors.
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
    family = family_of_transformer(transformer)
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
    _check_optional_parts(name, parsed, meta)
    ranks: dict[str, int] = {}
    for module_name, parts in sorted(parsed.items()):
        ranks[module_name] = _check_module(name, module_name, parts, modules[module_name], meta)
    _check_finite(name, lora_keys)
    return LoraFileInfo(path=path, ranks=ranks, metadata=meta)


def _check_optional_parts(name: str, parsed: dict[str, dict[str, tuple[int, ...]]], meta) -> None:
    """Every module or none has ``lora_B.bias`` / ``lora_magnitude_vector``, and the metadata agrees.

    diffusers creates the part on *every* module when any key has it (or, with metadata, when
    ``lora_bias`` / ``use_dora`` says so), so a file where only some modules carry it, or whose
    metadata says otherwise, would load partially with nothing but a warning.
    """
    for part, field in _OPTIONAL_PARTS:
        having = sorted(m for m, parts in parsed.items() if part in parts)
        if having and len(having) < len(parsed):
            lacking = sorted(m for m, parts in parsed.items() if part not in parts)
            raise ValueError(
                f"{name}: module {lacking[0]!r} has no {part}, but {len(having)} of {len(parsed)} modules have "
                f"one (e.g. {having[0]!r}); diffusers would give every module a {part} and load the others "
                "only partially, so the file is refused"
            )
        if meta is not None and bool(meta.get(field, False)) != bool(having):
            said = meta.get(field, False)
            held = f"every module has {part}" if having else f"no module has {part}"
            raise ValueError(
                f"{name}: the '{METADATA_KEY}' entry says {field}={said}, but {held}; diffusers follows the "
                "metadata and would load the file only partially, so the file is refused"
            )


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


# ----------------------------------------------------------------------------------------------- metadata


def _lora_metadata(raw: dict[str, str], name: str) -> dict[str, Any] | None:
    """The ``transformer.`` entries of the file's ``lora_adapter_metadata``, without the prefix, checked
    (``_check_metadata``); None when the file has no such entry."""
    text = raw.get(METADATA_KEY)
    if text is None:
        return None
    where = f"{name}: the '{METADATA_KEY}' entry"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{where} is a JSON {type(data).__name__}, not an object of 'transformer.<field>' entries "
            "(as diffusers writes it)"
        )
    # diffusers stores one entry per component, e.g. {"transformer.r": 4, ...}, and reads only its own
    meta = {k[len(_PREFIX) :]: v for k, v in data.items() if k.startswith(_PREFIX)}
    if not meta:
        raise ValueError(
            f"{where} has no 'transformer.' entries (e.g. 'transformer.r'); diffusers would build the "
            "adapter's config from none of it and fail"
        )
    _check_metadata(meta, where)
    return meta


def _check_metadata(meta: dict[str, Any], where: str) -> None:
    """The fields the check reads have the types peft takes; every ``rank_pattern`` key compiles."""
    if "r" in meta and not _is_rank(meta["r"]):
        raise ValueError(f"{where}: 'transformer.r' is {meta['r']!r}, not a positive integer")
    for field in ("lora_bias", "use_dora"):
        if field in meta and not isinstance(meta[field], bool):
            raise ValueError(f"{where}: 'transformer.{field}' is {meta[field]!r}, not true or false")
    patterns = meta.get("rank_pattern")
    if patterns is None:
        return
    if not isinstance(patterns, dict):
        raise ValueError(
            f"{where}: 'transformer.rank_pattern' is a {type(patterns).__name__}, not an object {{module regex: rank}}"
        )
    for pattern, rank in patterns.items():
        try:
            _rank_pattern_regex(pattern)
        except re.error as err:
            raise ValueError(
                f"{where}: rank_pattern key {pattern!r} is not a valid regular expression: {err}"
            ) from None
        if not _is_rank(rank):
            raise ValueError(f"{where}: rank_pattern {pattern!r} gives rank {rank!r}, not a positive integer")


def _rank_pattern_regex(pattern: str) -> re.Pattern:
    """peft's rule: a ``rank_pattern`` key matches a module path or a ``.``-separated tail of it."""
    return re.compile(rf"(.*\.)?({pattern})$")


def _metadata_rank(meta: dict[str, Any], module_name: str) -> int | None:
    for pattern, rank in (meta.get("rank_pattern") or {}).items():
        if _rank_pattern_regex(pattern).match(module_name):
            return rank
    return meta.get("r")


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# ----------------------------------------------------------------------------------------------- helpers


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
