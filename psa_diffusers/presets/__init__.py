"""Published PSA presets (JSON package data) and loading of user preset files (.json, .yaml, .yml)."""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .preset import FAMILIES, HugeInt, Preset

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

# Preset files are untrusted and tiny: bound what the parsers are given before they run.
MAX_FILE_BYTES = 1 << 20
"""Largest preset file read, in bytes."""
MAX_DEPTH = 32
"""Deepest nesting of lists/mappings in a preset file (the presets use 3)."""
_MAX_INT_CHARS = 400  # a longer integer literal exceeds 2**1024 (309 digits); it becomes a HugeInt, never an int
_TOO_DEEP = f"lists/mappings nested deeper than {MAX_DEPTH} levels"


def list_presets() -> list[str]:
    """Names of the built-in presets (in the order of the table in docs/design.md, section 4)."""
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
    e.g. ``my.yaml: field 'config.block_kv'=96: allowed values are (32, 64, 128)``. The file is untrusted:
    more than MAX_FILE_BYTES, nesting deeper than MAX_DEPTH lists/mappings and YAML aliases are refused
    before they can cost time or memory.
    """
    source = os.fspath(path)
    suffix = Path(source).suffix.lower()
    if suffix not in _EXTENSIONS:
        raise ValueError(f"{source}: unknown preset file extension {suffix!r}; expected one of {_EXTENSIONS}")
    try:
        with open(source, "rb") as file:
            raw = file.read(MAX_FILE_BYTES + 1)
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ValueError(f"{source}: cannot read preset file: {reason}") from err
    if len(raw) > MAX_FILE_BYTES:
        raise ValueError(f"{source}: preset file larger than {MAX_FILE_BYTES} bytes")
    data = _parse_json(text, source) if suffix == ".json" else _parse_yaml(text, source)
    return Preset.from_dict(data, source=source)


def _int(literal: str) -> int | HugeInt:
    return HugeInt(len(literal)) if len(literal) > _MAX_INT_CHARS else int(literal)


# Strings (whose brackets do not count), runs of other characters, and a stray quote; brackets are left over.
_JSON_NON_BRACKETS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[^\[\]{}"]+|"', re.DOTALL)
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _parse_json(text: str, source: str) -> Any:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ValueError(f"{source}: field {key!r} given twice")
            out[key] = value
        return out

    brackets = _JSON_NON_BRACKETS.sub("", text)  # json.loads recurses per level: check the depth first
    if max(itertools.accumulate(map(_BRACKET_STEP.get, brackets)), default=0) > MAX_DEPTH:
        raise ValueError(f"{source}: invalid JSON: {_TOO_DEEP}")
    try:
        return json.loads(text, object_pairs_hook=no_duplicates, parse_int=_int)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source}: invalid JSON: {err}") from None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys, aliases (no "billion laughs" expansion) and nesting
    deeper than MAX_DEPTH (checked while composing, before the recursive constructor runs)."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in presets", event.start_mark
            )
        if not isinstance(event, yaml.CollectionStartEvent):
            return super().compose_node(parent, index)
        if self._depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, _TOO_DEEP, event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

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

    def construct_int(self, node: yaml.ScalarNode) -> int | HugeInt:
        return HugeInt(len(node.value)) if len(node.value) > _MAX_INT_CHARS else self.construct_yaml_int(node)


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_int)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as err:
        raise ValueError(f"{source}: invalid YAML: {err}") from None
