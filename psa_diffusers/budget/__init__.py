"""The opt-in "budget" mode: levels allocated at a target density by estimated output error.

One entry point, :func:`build_budget_mask`, which ``mask_builder.build_block_mask`` calls for
``PSAConfig(mode="budget")``. The default quota and mass path imports nothing from here.
The method and its measurements are in docs/allocation.md. Parts, each an op folder like
``psa_diffusers.ops``: ``variance`` (within-group logit variance), ``statistics`` (block mass,
squared mass), ``allocation`` (the per-row knapsack); ``stats`` holds their shared result type.
"""

from __future__ import annotations

import torch

from ..config import PSAConfig
from ..mask import PyramidBlockMask, block_sizes, ceil_div
from ..ops.caps import similarity_caps
from ..ops.levels import compact_levels
from .allocation import allocate_levels, row_budget
from .statistics import estimate_pyramid_statistics
from .stats import PyramidStats

__all__ = ["PyramidStats", "build_budget_mask", "estimate_pyramid_statistics"]


def build_budget_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    config: PSAConfig,
    *,
    num_kv_blocks: int,
    num_q_blocks: int,
    scale: float | None = None,
    stats: PyramidStats | None = None,
    backend: str = "auto",
) -> PyramidBlockMask:
    """Block statistics -> levels at ``config.target_density`` -> caps -> forced text -> the compact mask.

    q ``[B, H, Lq, D]``, k ``[B, H, Lkv, D]``; the first ``num_kv_blocks`` KV blocks compete (the
    rest hold text and are level 1 in every row), query rows from ``num_q_blocks`` on are dense.
    ``stats`` may pass precomputed :class:`PyramidStats` (benchmarks).
    """
    lkv = k.shape[2]
    nq, nk = ceil_div(q.shape[2], config.block_q), ceil_div(lkv, config.block_kv)
    kwargs = dict(block_q=config.block_q, block_kv=config.block_kv)
    if stats is None:
        stats = estimate_pyramid_statistics(q, k, scale=scale, backend=backend, **kwargs)
    elif tuple(stats.mass.shape) != tuple(q.shape[:2]) + (nq, nk):
        raise ValueError(f"stats of shape {tuple(stats.mass.shape)} do not match {nq}x{nk} blocks")
    tokens = block_sizes(lkv, config.block_kv, nk, q.device).to(torch.int64)
    forced = max(0, lkv - num_kv_blocks * config.block_kv)  # text KV tokens: level 1 in every row
    budget = row_budget(config.target_density, lkv, forced)
    caps = None
    if config.sim_thresholds is not None:
        caps = similarity_caps(k, block_kv=config.block_kv, thresholds=config.sim_thresholds, backend=backend)
    level_map = allocate_levels(stats, budget, tokens, num_blocks=num_kv_blocks, caps=caps, backend=backend)
    return compact_levels(level_map, num_kv_blocks=num_kv_blocks, num_q_blocks=num_q_blocks, backend=backend, **kwargs)
