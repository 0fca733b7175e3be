"""PSAConfig: one frozen, validated description of a pyramid-sparse-attention budget."""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

BLOCK_Q_SIZES = (64, 128)
BLOCK_KV_SIZES = (32, 64, 128)
MODES = ("density", "quota", "mass", "budget")
TARGET_MODES = ("density", "budget")
"""The modes whose knob is ``target_density`` (the others use ``budgets``)."""
TOKEN_ORDERS = ("gilbert", "none")
LEVELS = (1, 2, 4, 8)
"""Pooling factors of the pyramid, finest first. Level 0 (skip) is not listed."""
POOLED_LEVELS = LEVELS[1:]
"""The factors that pool (2, 4, 8): pooled buffers, similarity caps and logit variances are kept for these."""


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_int(name: str, value: Any) -> int:
    """``value`` as an int; a ValueError naming the field for a bool, a float (even 64.0) or anything else."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise ValueError(f"PSAConfig.{name}={value!r}: expected an int, got {type(value).__name__}") from None


def _check_tuple(name: str, value: Any, length: int) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"PSAConfig.{name}={value!r}: expected a sequence of {length} numbers")
    raw = tuple(value)
    if not all(_is_number(x) for x in raw):
        raise ValueError(f"PSAConfig.{name}={value!r}: expected a sequence of {length} numbers (no booleans)")
    try:
        items = tuple(float(x) for x in raw)
    except OverflowError:
        raise ValueError(f"PSAConfig.{name}={value!r}: every value must be finite") from None
    if len(items) != length:
        raise ValueError(f"PSAConfig.{name}={value!r}: expected {length} numbers, got {len(items)}")
    if not all(math.isfinite(x) for x in items):
        raise ValueError(f"PSAConfig.{name}={value!r}: every value must be finite")
    return items


@dataclass(frozen=True)
class PSAConfig:
    """How one attention call chooses its level map.

    block_q:  query block size, 64 or 128.
    block_kv: key/value block size, 32, 64 or 128.
    mode:     "quota" -- ``budgets`` are the shares of each row's blocks kept at
              levels 1, 2, 4, 8 (rest skipped); "mass" -- ``budgets`` are the
              cumulative importance-mass thresholds for levels 1, 2, 4, 8 (the two
              published rules); "density" -- each row gets ``target_density`` of the
              dense work and spends it where the estimated output error drops most,
              with statistics as cheap as the published estimate (sampled block mass and
              squared mass with each head's sink keys, key scatter; docs/benchmarks.md,
              section 2); "budget" -- the same allocation with the costlier refined
              statistics (``psa_diffusers.budget``; docs/allocation.md). ``budgets`` and
              ``min_full_share`` are not used by "density" and "budget".
    budgets:  four numbers for the pooling factors 1, 2, 4, 8 (see ``mode``).
    min_full_share: the least share of each row's blocks kept at level 1 (quota and mass modes).
    sim_thresholds: optional cosine-similarity thresholds (tau_2, tau_4, tau_8)
              of the similarity cap; None disables the cap.
    token_order: "gilbert" reorders video tokens along a 3D Gilbert curve;
              "none" keeps raster order.
    importance_stride: the importance estimate samples every n-th query and
              key of each block (deterministic; see ``ops/importance``); quota and mass modes.
              The "density" statistics sample every n-th query and every (n/2)-th key.
    target_density: the FLOP density (docs/design.md, section 1) each row is allocated in
              modes "density" and "budget", in (0, 1]; required there, must be None otherwise.
    """

    block_q: int = 128
    block_kv: int = 128
    mode: str = "quota"
    budgets: tuple[float, float, float, float] = (0.10, 0.05, 0.0, 0.20)
    min_full_share: float = 0.06
    sim_thresholds: tuple[float, float, float] | None = None
    token_order: str = "none"
    importance_stride: int = 8
    target_density: float | None = None

    def __post_init__(self) -> None:
        for name in ("block_q", "block_kv", "importance_stride"):
            object.__setattr__(self, name, _check_int(name, getattr(self, name)))
        for name in ("mode", "token_order"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"PSAConfig.{name}={getattr(self, name)!r}: expected a string")
        if self.block_q not in BLOCK_Q_SIZES:
            raise ValueError(f"PSAConfig.block_q={self.block_q!r}: allowed values are {BLOCK_Q_SIZES}")
        if self.block_kv not in BLOCK_KV_SIZES:
            raise ValueError(f"PSAConfig.block_kv={self.block_kv!r}: allowed values are {BLOCK_KV_SIZES}")
        if self.mode not in MODES:
            raise ValueError(f"PSAConfig.mode={self.mode!r}: allowed values are {MODES}")
        if self.token_order not in TOKEN_ORDERS:
            raise ValueError(f"PSAConfig.token_order={self.token_order!r}: allowed values are {TOKEN_ORDERS}")
        budgets = _check_tuple("budgets", self.budgets, 4)
        if any(b < 0 for b in budgets):
            raise ValueError(f"PSAConfig.budgets={budgets}: values must be >= 0")
        if self.mode == "quota":
            if sum(budgets) > 1.0 + 1e-9:
                raise ValueError(
                    f"PSAConfig.budgets={budgets}: quota shares sum to {sum(budgets):.4g}, must be at most 1"
                )
        elif self.mode == "mass":
            if any(b > 1 for b in budgets):
                raise ValueError(f"PSAConfig.budgets={budgets}: mass thresholds must lie in [0, 1]")
            if any(b2 < b1 for b1, b2 in zip(budgets, budgets[1:])):
                raise ValueError(f"PSAConfig.budgets={budgets}: mass thresholds must not decrease")
        object.__setattr__(self, "budgets", budgets)
        if not (_is_number(self.min_full_share) and 0.0 <= self.min_full_share <= 1.0):
            raise ValueError(f"PSAConfig.min_full_share={self.min_full_share!r}: must be a number in [0, 1]")
        object.__setattr__(self, "min_full_share", float(self.min_full_share))
        if self.sim_thresholds is not None:
            sims = _check_tuple("sim_thresholds", self.sim_thresholds, 3)
            if any(not -1.0 <= s <= 1.0 for s in sims):
                raise ValueError(f"PSAConfig.sim_thresholds={sims}: cosine thresholds must lie in [-1, 1]")
            object.__setattr__(self, "sim_thresholds", sims)
        if self.importance_stride < 1:
            raise ValueError(f"PSAConfig.importance_stride={self.importance_stride!r}: must be an integer >= 1")
        if self.block_q % self.importance_stride or self.block_kv % self.importance_stride:
            raise ValueError(
                f"PSAConfig.importance_stride={self.importance_stride}: must divide block_q={self.block_q} "
                f"and block_kv={self.block_kv}"
            )
        if self.mode in TARGET_MODES:
            td = self.target_density
            if td is None:
                raise ValueError(f"PSAConfig.target_density=None: mode={self.mode!r} needs a target density in (0, 1]")
            if not _is_number(td) or not (math.isfinite(td) and 0.0 < td <= 1.0):
                raise ValueError(f"PSAConfig.target_density={td!r}: must be a number in (0, 1]")
            object.__setattr__(self, "target_density", float(td))
        elif self.target_density is not None:
            raise ValueError(
                f"PSAConfig.target_density={self.target_density!r}: only used with mode in {TARGET_MODES} "
                f"(mode={self.mode!r})"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PSAConfig:
        """Build from a plain mapping (JSON/YAML); unknown keys raise ValueError naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"PSAConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
        kwargs = dict(data)
        for name in ("budgets", "sim_thresholds"):
            if isinstance(kwargs.get(name), list):
                kwargs[name] = tuple(kwargs[name])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> PSAConfig:
        """A copy with some fields changed, validated again."""
        return dataclasses.replace(self, **changes)
