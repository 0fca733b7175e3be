"""Arithmetic of the level rules shared by the reference and the kernel (no tensors)."""

from __future__ import annotations

import math

from ...config import PSAConfig


def quota_bounds(config: PSAConfig, n: int) -> list[int]:
    """Cumulative rank bounds of levels 1, 2, 4, 8 for a row of ``n`` blocks (quota mode).

    Ranks ``[0, b[0])`` are level 1, ``[b[0], b[1])`` level 2, and so on; ranks from ``b[3]`` on are
    skipped. Level 1 gets at least ``ceil(min_full_share * n)`` blocks and at least one.
    """
    shares = config.budgets
    n_full = max(round(shares[0] * n), math.ceil(config.min_full_share * n), 1)
    bounds, total = [], 0
    for i, share in enumerate(shares):
        total += n_full if i == 0 else round(share * n)
        bounds.append(min(total, n))
    return bounds


def min_full_blocks(config: PSAConfig, n: int) -> int:
    """The least number of level-1 blocks of a row of ``n`` competing blocks (mass mode)."""
    return max(1, math.ceil(config.min_full_share * n))
