"""Level allocation at a target density: each block's level chosen by the output error it would cause."""

from __future__ import annotations

import torch

from ...ops.triton_support import resolve_table_backend
from ..stats import PyramidStats, finite_stats
from .kernel import allocate_levels_triton
from .reference import (
    COST_UNIT,
    OPTIONS,
    allocate_levels_reference,
    detail_loss,
    error_tables,
    knapsack_options,
    mass_loss,
    option_costs,
    row_budget,
)

__all__ = [
    "COST_UNIT",
    "OPTIONS",
    "allocate_levels",
    "allocate_levels_reference",
    "allocate_levels_triton",
    "detail_loss",
    "error_tables",
    "knapsack_options",
    "mass_loss",
    "option_costs",
    "row_budget",
]


def allocate_levels(
    stats: PyramidStats,
    budget: torch.Tensor | int,
    block_tokens: torch.Tensor,
    *,
    num_blocks: int | None = None,
    caps: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Level map ``[B, H, Nq, Nk]`` int64 that spends ``budget`` (1/8 tokens per row) where it removes most error.

    Non-finite statistics are sanitised first (``finite_stats``), so every row keeps its best block.
    """
    kwargs = dict(num_blocks=num_blocks, caps=caps)
    stats = finite_stats(stats)
    if resolve_table_backend(backend, stats.mass) == "triton":
        return allocate_levels_triton(stats, budget, block_tokens, **kwargs)
    return allocate_levels_reference(stats, budget, block_tokens, **kwargs)
