"""Levels from importance, forced text levels and compaction (plain PyTorch reference).

Per query-block row, blocks sorted by importance (descending, ties to the lower block id):

* quota mode: fixed shares of the row's competing blocks at levels 1, 2, 4, 8 (``rules.quota_bounds``);
* mass mode: a block takes the finest level whose cumulative-mass threshold its predecessors have not
  reached; the first ``min_full_share`` of the row is level 1;
* the best block of every row is level 1; a similarity cap lowers a kept level to ``min(level, cap)``;
* text: KV blocks from ``num_kv_blocks`` on, and every block of query rows from ``num_q_blocks`` on,
  are level 1.
"""

from __future__ import annotations

import torch

from ...config import LEVELS, PSAConfig
from ...mask import PyramidBlockMask
from .rules import min_full_blocks, quota_bounds


def levels_from_importance(
    importance: torch.Tensor, config: PSAConfig, *, num_blocks: int | None = None
) -> torch.Tensor:
    """Level map ``[B, H, Nq, Nk]`` int64 from importance ``[B, H, Nq, Nk]`` under the quota or mass rule.

    Only the first ``num_blocks`` columns (default: all) compete; the others get level 0
    here (the caller forces them). Every row's best block is level 1.
    """
    n = importance.shape[-1] if num_blocks is None else num_blocks
    s = importance[..., :n].float()
    vals, order = torch.sort(s, dim=-1, descending=True, stable=True)
    rank = torch.arange(n, device=s.device)
    if config.mode == "quota":
        bounds = torch.tensor(quota_bounds(config, n), device=s.device)
        group = (rank.unsqueeze(-1) >= bounds).sum(-1).expand_as(vals)  # 0..4
    else:
        mass = vals / vals.sum(-1, keepdim=True).clamp(min=1e-30)
        before = torch.cumsum(mass, dim=-1) - mass  # mass of the predecessors
        thresholds = torch.tensor(config.budgets, device=s.device, dtype=mass.dtype)
        group = (before.unsqueeze(-1) >= thresholds).sum(-1)
        group = torch.where(rank < min_full_blocks(config, n), torch.zeros_like(group), group)
    level_of_group = torch.tensor(LEVELS + (0,), device=s.device, dtype=torch.int64)
    sorted_levels = level_of_group[group]
    sorted_levels[..., 0] = 1
    out = torch.zeros(importance.shape, dtype=torch.int64, device=s.device)
    out[..., :n].scatter_(-1, order, sorted_levels)
    return out


def apply_caps(level_map: torch.Tensor, caps: torch.Tensor | None) -> torch.Tensor:
    """Every kept level of ``level_map`` ``[B, H, Nq, Nk]`` lowered to ``min(level, caps[b, h, j])``."""
    if caps is None:
        return level_map
    return torch.where(level_map > 0, torch.minimum(level_map, caps.to(level_map.dtype).unsqueeze(2)), level_map)


def force_text_levels(level_map: torch.Tensor, num_kv_blocks: int, num_q_blocks: int) -> torch.Tensor:
    """A copy of ``level_map`` with KV blocks from ``num_kv_blocks`` on and query rows from ``num_q_blocks`` on at 1."""
    out = level_map.clone()
    out[..., num_kv_blocks:] = 1
    out[..., num_q_blocks:, :] = 1
    return out


def compact_levels_reference(
    level_map: torch.Tensor,
    *,
    block_q: int,
    block_kv: int,
    num_kv_blocks: int | None = None,
    num_q_blocks: int | None = None,
) -> PyramidBlockMask:
    """The compact mask of a valid ``level_map`` after forcing the text levels."""
    nq, nk = level_map.shape[-2:]
    forced = force_text_levels(level_map, nk if num_kv_blocks is None else num_kv_blocks,
                               nq if num_q_blocks is None else num_q_blocks)  # fmt: skip
    return PyramidBlockMask.from_valid_level_map(forced, block_q=block_q, block_kv=block_kv)


def choose_levels_reference(
    importance: torch.Tensor,
    config: PSAConfig,
    *,
    num_kv_blocks: int | None = None,
    num_q_blocks: int | None = None,
    caps: torch.Tensor | None = None,
) -> PyramidBlockMask:
    """Importance ``[B, H, Nq, Nk]`` -> levels -> caps -> forced text -> the compact mask."""
    level_map = apply_caps(levels_from_importance(importance, config, num_blocks=num_kv_blocks), caps)
    return compact_levels_reference(
        level_map, block_q=config.block_q, block_kv=config.block_kv, num_kv_blocks=num_kv_blocks,
        num_q_blocks=num_q_blocks,
    )  # fmt: skip
