"""Published PSA presets (JSON package data) and loading of user preset files (.json, .yaml, .yml)."""

from __future__ import annotations

import functools
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .preset import FAMILIES, Preset

__all__ = ["FAMILIES", "Preset", "get_preset", "list_presets", "load_preset"]

_PRESET_NAMES = (
    "cogvideox-5b",
    "cogvideox-5b-4step",
    "cogvideox1.5-5b",
    "wan2.1-1.3b",
    "wan2.1-14b",
    "wan2.2-a14b",
    "wan2.2-5b",
)
_EXTENSIONS = (".json", ".yaml", ".yml")


def list_presets() -> list[str]:
    """Names of the built-in presets (DESIGN section 4 order)."""
    return list(_PRESET_NAMES)


def get_preset(name: str) -> Preset:
    """The built-in preset ``name``; an unknown name raises ValueError listing the known ones."""
    if name not in _PRESET_NAMES:
        raise ValueError(f"unknown preset {name!r}; known presets are {', '.join(_PRESET_NAMES)}")
    return _builtin(name)


@functools.lru_cache(maxsize=len(_PRESET_NAMES))
def _builtin(name: str) -> Preset:
    source = f"psa_diffusers/presets/{name}.json"
    text = resources.files(__name__).joinpath(f"{name}.json").read_text(encoding="utf-8")
    preset = Preset.from_dict(_parse_json(text, source), source=source)
    if preset.name != name:
        raise ValueError(f"{source}: field 'name'={preset.name!r}: must match the file name {name!r}")
    return preset


def load_preset(path: str | os.PathLike[str]) -> Preset:
    """Read and validate a user preset file (.json, .yaml or .yml).

    Every error is a ValueError starting with the file name, and naming the field where one applies,
    e.g. ``my.yaml: field 'config.block_kv'=96: allowed values are (32, 64, 128)``.
    """
    source = os.fspath(path)
    suffix = Path(source).suffix.lower()
    if suffix not in _EXTENSIONS:
        raise ValueError(f"{source}: unknown preset file extension {suffix!r}; expected one of {_EXTENSIONS}")
    try:
        text = Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ValueError(f"{source}: cannot read preset file: {reason}") from err
    data = _parse_json(text, source) if suffix == ".json" else _parse_yaml(text, source)
    return Preset.from_dict(data, source=source)


def _parse_json(text: str, source: str) -> Any:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ValueError(f"{source}: field {key!r} given twice")
            out[key] = value
        return out

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source}: invalid JSON: {err}") from None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"field {key_node.value!r} given twice", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as err:
        raise ValueError(f"{source}: invalid YAML: {err}") from None
