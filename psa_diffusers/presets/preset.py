"""Preset: a published PSA recipe -- model family, dense-step schedule, PSAConfig and pipeline extras."""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import PSAConfig

FAMILIES = ("cogvideox", "wan")
"""Model families a preset can target."""

_REQUIRED = ("name", "family", "num_steps", "dense_steps", "config")
_CONFIG_INTS = ("block_q", "block_kv", "importance_stride")
_CONFIG_STRS = ("mode", "token_order")
_CONFIG_NUMBERS = ("min_full_share",)
_CONFIG_SEQS = ("budgets", "sim_thresholds")
_PSACONFIG_MSG = re.compile(r"^PSAConfig\.(\w+)=")
_NO_VALUE = object()

MAX_INT_BITS = 1024
"""Integers in preset data must stay below 2**1024 in magnitude (the float range); presets need far less."""


class HugeInt:
    """Stands in for an integer literal too long to convert (the loaders never call ``int`` on one: Python
    refuses beyond 4300 digits); ``Preset.from_dict`` refuses it naming the field, as any integer too large."""

    __slots__ = ("chars",)

    def __init__(self, chars: int) -> None:
        self.chars = chars

    def __repr__(self) -> str:
        return f"<integer literal of {self.chars} characters>"


class _FieldError(ValueError):
    """A bad preset field; ``detail`` is the message without a source prefix."""

    def __init__(self, field: str, reason: str = "", value: Any = _NO_VALUE, *, detail: str | None = None) -> None:
        self.field = field
        if detail is None:
            detail = f"field {field!r}: {reason}" if value is _NO_VALUE else f"field {field!r}={value!r}: {reason}"
        self.detail = detail
        super().__init__(f"Preset: {self.detail}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_numbers(value: Any, field: str) -> None:
    """Refuse a HugeInt or an integer of more than MAX_INT_BITS bits anywhere in ``value``, naming its field."""
    if isinstance(value, HugeInt) or (_is_int(value) and value.bit_length() > MAX_INT_BITS):
        raise _FieldError(field, f"integer too large (more than {MAX_INT_BITS} bits)")
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_numbers(item, f"{field}.{key}" if field else str(key))
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_numbers(item, field)


def _as_index(name: str, value: Any) -> int:
    """``value`` as a Python int (numpy ints accepted, bools and floats refused)."""
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: expected an integer")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name}={value!r}: expected an integer") from None


def _kwarg_value(key: str, value: Any) -> Any:
    """A scheduler kwarg value as an immutable JSON-like value (lists become tuples)."""
    if isinstance(value, (list, tuple)):
        return tuple(_kwarg_value(key, item) for item in value)
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    raise _FieldError(
        f"scheduler_kwargs.{key}", "values must be strings, finite numbers, booleans, null or lists of them", value
    )


def _freeze_kwargs(value: Any) -> tuple[tuple[str, Any], ...]:
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        items = [tuple(p) for p in value]
    else:
        raise _FieldError("scheduler_kwargs", "expected a mapping of keyword arguments", value)
    seen: set[str] = set()
    for key, _ in items:
        if not isinstance(key, str) or not key.isidentifier():
            raise _FieldError("scheduler_kwargs", f"key {key!r} is not a valid keyword argument name")
        if key in seen:
            raise _FieldError("scheduler_kwargs", f"key {key!r} given twice")
        seen.add(key)
    return tuple(sorted((key, _kwarg_value(key, v)) for key, v in items))


def _thaw(value: Any) -> Any:
    return [_thaw(v) for v in value] if isinstance(value, tuple) else value


@dataclass(frozen=True, kw_only=True)
class Preset:
    """A PSA recipe for one model family: when to run dense, which PSAConfig to use, and pipeline extras.

    name:        preset id, e.g. "wan2.1-1.3b".
    family:      "cogvideox" or "wan".
    description: one line for humans.
    models:      Hugging Face hub ids the preset is meant for.
    num_steps:   the published number of denoising steps.
    dense_steps: leading steps run with dense attention at ``num_steps`` steps.
    guidance_scale: recommended classifier-free guidance, None for the pipeline default.
    scheduler:   diffusers scheduler class name to swap in, None to keep the pipeline's.
    scheduler_kwargs: extra scheduler config, stored as sorted ``(key, value)`` pairs
                 (lists become tuples); ``scheduler_kwargs_dict()`` gives a fresh dict.
    config:      the PSAConfig used on the sparse steps.
    """

    name: str
    family: str
    description: str = ""
    models: tuple[str, ...] = ()
    num_steps: int
    dense_steps: int
    guidance_scale: float | None = None
    scheduler: str | None = None
    scheduler_kwargs: tuple[tuple[str, Any], ...] = ()
    config: PSAConfig

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or any(c.isspace() for c in self.name):
            raise _FieldError("name", "must be a non-empty string without whitespace", self.name)
        if self.family not in FAMILIES:
            raise _FieldError("family", f"allowed values are {FAMILIES}", self.family)
        if not isinstance(self.description, str):
            raise _FieldError("description", "must be a string", self.description)
        if isinstance(self.models, str) or not isinstance(self.models, (list, tuple)):
            raise _FieldError("models", "must be a list of hub ids", self.models)
        for model in self.models:
            if not isinstance(model, str) or not model or any(c.isspace() for c in model):
                raise _FieldError("models", f"entry {model!r} is not a hub id (non-empty, no whitespace)")
        object.__setattr__(self, "models", tuple(self.models))
        if not _is_int(self.num_steps) or self.num_steps < 1:
            raise _FieldError("num_steps", "must be an integer >= 1", self.num_steps)
        if not _is_int(self.dense_steps) or not 0 <= self.dense_steps <= self.num_steps:
            raise _FieldError("dense_steps", f"must be an integer in [0, num_steps={self.num_steps}]", self.dense_steps)
        if self.guidance_scale is not None:
            if not _is_number(self.guidance_scale) or not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
                raise _FieldError("guidance_scale", "must be null or a finite number >= 0", self.guidance_scale)
            object.__setattr__(self, "guidance_scale", float(self.guidance_scale))
        if self.scheduler is not None and not (isinstance(self.scheduler, str) and self.scheduler.isidentifier()):
            raise _FieldError("scheduler", "must be null or a diffusers scheduler class name", self.scheduler)
        object.__setattr__(self, "scheduler_kwargs", _freeze_kwargs(self.scheduler_kwargs))
        if not isinstance(self.config, PSAConfig):
            raise _FieldError("config", "must be a PSAConfig", self.config)

    # -- schedule ---------------------------------------------------------------------------------

    def dense_steps_for(self, num_steps: int) -> int:
        """Number of leading dense steps in a run of ``num_steps`` steps.

        ``dense_steps`` at the published ``self.num_steps``; otherwise the same fraction of the run,
        ``round(dense_steps * num_steps / self.num_steps)`` (Python ``round``: ties go to the even
        integer), e.g. 15 of 50 -> 8 of 25, 12 of 40 -> 15 of 50.
        """
        num_steps = _as_index("num_steps", num_steps)
        if num_steps < 1:
            raise ValueError(f"num_steps={num_steps}: must be >= 1")
        if num_steps == self.num_steps:
            return self.dense_steps
        return round(self.dense_steps * num_steps / self.num_steps)

    def config_for_step(self, step_index: int, num_steps: int) -> PSAConfig | None:
        """The PSAConfig for denoising step ``step_index`` (0-based) of ``num_steps``; None means dense.

        Dense while ``step_index < dense_steps_for(num_steps)`` (see there for runs whose length
        differs from the published ``num_steps``), ``self.config`` afterwards.
        """
        dense = self.dense_steps_for(num_steps)
        step_index = _as_index("step_index", step_index)
        if not 0 <= step_index < num_steps:
            raise ValueError(f"step_index={step_index}: must lie in [0, num_steps={num_steps})")
        return None if step_index < dense else self.config

    # -- conversions ------------------------------------------------------------------------------

    def scheduler_kwargs_dict(self) -> dict[str, Any]:
        """``scheduler_kwargs`` as a new plain dict (tuples become lists)."""
        return {key: _thaw(value) for key, value in self.scheduler_kwargs}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-ready data (lists, no tuples); ``from_dict`` reads it back."""
        return {
            "name": self.name,
            "family": self.family,
            "description": self.description,
            "models": list(self.models),
            "num_steps": self.num_steps,
            "dense_steps": self.dense_steps,
            "guidance_scale": self.guidance_scale,
            "scheduler": self.scheduler,
            "scheduler_kwargs": self.scheduler_kwargs_dict(),
            "config": {key: _thaw(value) for key, value in self.config.to_dict().items()},
        }

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<dict>") -> Preset:
        """Build from plain data; every ValueError starts with ``source`` and names the field.

        Required: name, family, num_steps, dense_steps, config. Config fields left out take
        PSAConfig's defaults; unknown fields at either level are errors, and so are integers anywhere
        of more than MAX_INT_BITS bits (or HugeInt literals from the file loaders).
        """
        try:
            return cls._from_dict(data)
        except _FieldError as err:
            raise ValueError(f"{source}: {err.detail}") from None

    @classmethod
    def _from_dict(cls, data: Any) -> Preset:
        if not isinstance(data, Mapping):
            raise _FieldError("", detail=f"expected a mapping of preset fields, got {type(data).__name__}")
        _check_numbers(data, "")
        known = [f.name for f in dataclasses.fields(cls)]
        _check_keys(data, known, prefix="")
        for name in _REQUIRED:
            if name not in data:
                raise _FieldError(name, "missing required field")
        kwargs = dict(data)
        kwargs["config"] = _config_from_dict(data["config"])
        if kwargs.get("scheduler_kwargs") is None:
            kwargs.pop("scheduler_kwargs", None)
        elif not isinstance(kwargs["scheduler_kwargs"], Mapping):
            raise _FieldError("scheduler_kwargs", "expected a mapping of keyword arguments", kwargs["scheduler_kwargs"])
        return cls(**kwargs)

    def with_config(self, **overrides: Any) -> Preset:
        """A copy whose config has the given PSAConfig fields replaced (validated again)."""
        known = {f.name for f in dataclasses.fields(PSAConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"Preset.with_config: unknown PSAConfig field(s) {unknown}; known are {sorted(known)}")
        return dataclasses.replace(self, config=self.config.replace(**overrides))


def _check_keys(data: Mapping, known: list[str], prefix: str) -> None:
    for key in data:
        if not isinstance(key, str):
            raise _FieldError(f"{prefix}{key}", "field names must be strings")
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise _FieldError(f"{prefix}{unknown[0]}", f"unknown field; known fields are {sorted(known)}")


def _config_from_dict(data: Any) -> PSAConfig:
    """PSAConfig from plain data, checking types first and naming fields as ``config.<name>``."""
    if not isinstance(data, Mapping):
        raise _FieldError("config", "expected a mapping of PSAConfig fields", data)
    _check_keys(data, [f.name for f in dataclasses.fields(PSAConfig)], prefix="config.")
    kwargs = dict(data)
    for key, value in data.items():
        field = f"config.{key}"
        if key in _CONFIG_INTS and not _is_int(value):
            raise _FieldError(field, "must be an integer", value)
        if key in _CONFIG_STRS and not isinstance(value, str):
            raise _FieldError(field, "must be a string", value)
        if key in _CONFIG_NUMBERS and not _is_number(value):
            raise _FieldError(field, "must be a number", value)
        if key in _CONFIG_SEQS:
            if value is None and key == "sim_thresholds":
                continue
            if not isinstance(value, (list, tuple)) or not all(_is_number(v) for v in value):
                raise _FieldError(field, "must be a list of numbers", value)
            kwargs[key] = tuple(value)
    try:
        return PSAConfig(**kwargs)
    except ValueError as err:
        # "PSAConfig.block_kv=96: allowed ..." -> field 'config.block_kv'=96: allowed ...
        msg = str(err)
        match = _PSACONFIG_MSG.match(msg)
        if match is None:
            raise _FieldError("config", msg) from None
        name = match.group(1)
        raise _FieldError(f"config.{name}", detail=f"field 'config.{name}'=" + msg[match.end() :]) from None
