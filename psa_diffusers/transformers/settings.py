"""CausalPSASettings: when and how a transformers language model's prefill runs causal PSA; named presets."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ..config import PSAConfig
from ..ops.levels import RECENT_TOKENS, SINK_TOKENS, check_causal_rule
from ..ops.triton_support import BACKENDS


def _check_count(name: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"CausalPSASettings.{name}={value!r}: expected an integer >= {least}")
    return value


@dataclass(frozen=True)
class CausalPSASettings:
    """Causal PSA in the prefill of a decoder language model.

    config:       the level budget (``PSAConfig``, mode "quota" or "mass").
    min_seq_len:  prefills shorter than this run dense (SDPA).
    sink_tokens:  the first tokens (system and text prompt) every query sees at level 1.
    recent_tokens: the tokens before each query block that it sees at level 1.
    dense_tail_tokens: the last tokens of the prefill (the question after the video) attend densely
                  to everything before them.
    backend:      "auto", "reference" or "triton".
    """

    config: PSAConfig = PSAConfig(block_q=128, block_kv=128, mode="quota", budgets=(0.05, 0.05, 0.05, 0.10))
    min_seq_len: int = 8192
    sink_tokens: int = SINK_TOKENS
    recent_tokens: int = RECENT_TOKENS
    dense_tail_tokens: int = 256
    backend: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.config, PSAConfig):
            raise ValueError(f"CausalPSASettings.config={self.config!r}: expected a PSAConfig")
        _check_count("min_seq_len", self.min_seq_len, 1)
        _check_count("sink_tokens", self.sink_tokens, 0)
        _check_count("recent_tokens", self.recent_tokens, 0)
        _check_count("dense_tail_tokens", self.dense_tail_tokens, 0)
        if self.backend not in BACKENDS:
            raise ValueError(f"CausalPSASettings.backend={self.backend!r}: allowed values are {BACKENDS}")
        try:
            check_causal_rule(self.config, self.sink_tokens, self.recent_tokens)
        except ValueError as err:
            raise ValueError(f"CausalPSASettings: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (``config`` as its own dict)."""
        out = dataclasses.asdict(self)
        out["config"] = self.config.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CausalPSASettings:
        """The inverse of :meth:`to_dict`; unknown keys raise ValueError naming them."""
        if not isinstance(data, Mapping):
            raise ValueError(f"CausalPSASettings: expected a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"CausalPSASettings: unknown field(s) {unknown}; known fields are {sorted(known)}")
        kwargs = dict(data)
        if isinstance(kwargs.get("config"), Mapping):
            kwargs["config"] = PSAConfig.from_dict(kwargs["config"])
        return cls(**kwargs)


PRESETS: Mapping[str, CausalPSASettings] = MappingProxyType(
    {
        # Qwen2.5-VL long-video prefill: density about 0.17 of the causal work at 32k tokens (benchmarks/causal.py)
        "qwen2.5-vl": CausalPSASettings(),
        # the same rule with a larger budget, for quality-sensitive runs
        "qwen2.5-vl-quality": CausalPSASettings(
            config=PSAConfig(block_q=128, block_kv=128, mode="quota", budgets=(0.10, 0.10, 0.05, 0.15))
        ),
    }
)
"""Named settings for :func:`psa_diffusers.transformers.configure` (``preset="qwen2.5-vl"``)."""


def get_settings(preset: str) -> CausalPSASettings:
    """The settings of a named preset; ValueError listing the names for an unknown one."""
    if preset not in PRESETS:
        raise ValueError(f"unknown causal PSA preset {preset!r}; known presets are {sorted(PRESETS)}")
    return PRESETS[preset]
