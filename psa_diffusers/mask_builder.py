"""build_block_mask: importance -> levels -> similarity cap -> forced text levels.

All steps run on the inputs' device with sort/cumsum over ``[B, H, Nq, Nk]``
(no host synchronisation), so the result is bit-identical for the same inputs.

Modes "quota" and "mass" rank blocks by the sampled importance; mode "budget"
estimates block statistics (``estimate_pyramid_statistics``) and allocates
levels at a target density by estimated error (``allocation.py``).
"""

from __future__ import annotations

import logging
import math

import torch

from .allocation import allocate_levels, row_budget
from .config import LEVELS, PSAConfig
from .importance import PyramidStats, block_smoothness, estimate_block_importance, estimate_pyramid_statistics
from .mask import PyramidBlockMask, block_sizes

logger = logging.getLogger(__name__)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def estimate_importance(q: torch.Tensor, k: torch.Tensor, config: PSAConfig, scale: float | None) -> torch.Tensor:
    """Sampled block mass ``[B, H, Nq, Nk]``: the Triton kernel where it can run, else the PyTorch reference."""
    return _importance(q, k, config, scale, _on_triton(q, k, "importance estimate"))


def _importance(q: torch.Tensor, k: torch.Tensor, config: PSAConfig, scale: float | None, on_gpu: bool):
    kwargs = dict(block_q=config.block_q, block_kv=config.block_kv, stride=config.importance_stride, scale=scale)
    if on_gpu:
        from .kernels import estimate_block_importance_triton

        return estimate_block_importance_triton(q, k, **kwargs)
    return estimate_block_importance(q, k, **kwargs)


def quota_bounds(config: PSAConfig, n: int) -> list[int]:
    """Cumulative rank bounds of levels 1, 2, 4, 8 for a row of ``n`` blocks (quota mode)."""
    shares = config.budgets
    n_full = max(round(shares[0] * n), math.ceil(config.min_full_share * n), 1)
    bounds, total = [], 0
    for i, share in enumerate(shares):
        total += n_full if i == 0 else round(share * n)
        bounds.append(min(total, n))
    return bounds


def levels_from_importance(
    importance: torch.Tensor, config: PSAConfig, *, num_blocks: int | None = None
) -> torch.Tensor:
    """Level map ``[B, H, Nq, Nk]`` int64 from importance ``[B, H, Nq, Nk]`` (DESIGN section 2, steps 1-2).

    Only the first ``num_blocks`` columns (default: all) compete; the others get level 0
    here (the caller forces them). Every row's best block is level 1.
    """
    nk_all = importance.shape[-1]
    n = nk_all if num_blocks is None else num_blocks
    s = importance[..., :n].float()
    vals, order = torch.sort(s, dim=-1, descending=True, stable=True)
    rank = torch.arange(n, device=s.device)
    n_min_full = max(1, math.ceil(config.min_full_share * n))
    if config.mode == "quota":
        bounds = torch.tensor(quota_bounds(config, n), device=s.device)
        group = (rank.unsqueeze(-1) >= bounds).sum(-1)  # [n]: 0..4
        group = group.expand_as(vals)
    else:
        mass = vals / vals.sum(-1, keepdim=True).clamp(min=1e-30)
        before = torch.cumsum(mass, dim=-1) - mass  # mass of the predecessors
        thresholds = torch.tensor(config.budgets, device=s.device, dtype=mass.dtype)
        group = (before.unsqueeze(-1) >= thresholds).sum(-1)
        group = torch.where(rank < n_min_full, torch.zeros_like(group), group)
    level_of_group = torch.tensor(LEVELS + (0,), device=s.device, dtype=torch.int64)
    sorted_levels = level_of_group[group]
    sorted_levels[..., 0] = 1
    out = torch.zeros(importance.shape, dtype=torch.int64, device=s.device)
    out[..., :n].scatter_(-1, order, sorted_levels)
    return out


def similarity_caps(k: torch.Tensor, config: PSAConfig) -> torch.Tensor:
    """Largest allowed pooling factor per KV block ``[B, H, Nk]`` int64 (1 where none is allowed)."""
    smooth = block_smoothness(k, block_kv=config.block_kv)  # [B, H, Nk, 3] for factors 2, 4, 8
    tau = torch.tensor(config.sim_thresholds, device=k.device, dtype=smooth.dtype)
    allowed = smooth >= tau
    factors = torch.tensor((2, 4, 8), device=k.device, dtype=torch.int64)
    return torch.where(allowed, factors, torch.ones_like(factors)).amax(-1)


def _caps(k: torch.Tensor, config: PSAConfig, on_gpu: bool) -> torch.Tensor | None:
    """The similarity caps ``[B, H, Nk]`` (Triton kernel on the GPU), or None when the config has none."""
    if config.sim_thresholds is None:
        return None
    if on_gpu:
        from .kernels import similarity_caps_triton

        return similarity_caps_triton(k, block_kv=config.block_kv, thresholds=config.sim_thresholds)
    return similarity_caps(k, config)


def _force_text_and_compact(level_map: torch.Tensor, config: PSAConfig, video_kv_blocks: int, video_q_blocks: int):
    """Text KV blocks and text query rows at level 1 (in place), then the compact mask."""
    level_map[..., video_kv_blocks:] = 1
    level_map[..., video_q_blocks:, :] = 1
    return PyramidBlockMask._compact(level_map, block_q=config.block_q, block_kv=config.block_kv)


def build_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    config: PSAConfig,
    *,
    text_len: int = 0,
    scale: float | None = None,
    importance: torch.Tensor | None = None,
    stats: PyramidStats | None = None,
) -> PyramidBlockMask:
    """Choose every block's level for ``q`` ``[B, H, Lq, D]`` against ``k`` ``[B, H, Lkv, D]``.

    Text tokens are the last ``text_len`` tokens of both sequences: every query sees
    the text KV blocks at level 1 and text query blocks see everything at level 1.
    ``importance`` ``[B, H, Nq, Nk]`` may be passed to skip the estimate (quota and mass
    modes); ``stats`` (``estimate_pyramid_statistics``) likewise for the budget mode.
    """
    lq, lkv = q.shape[2], k.shape[2]
    nq, nk = _ceil_div(lq, config.block_q), _ceil_div(lkv, config.block_kv)
    if config.mode != "budget" and importance is not None and importance.shape[-2:] != (nq, nk):
        raise ValueError(f"importance of shape {tuple(importance.shape)} does not match {nq}x{nk} blocks")
    # KV blocks holding any text token, and query blocks holding any text token, are forced to level 1.
    video_kv_blocks = (lkv - text_len) // config.block_kv if text_len else nk
    video_q_blocks = (lq - text_len) // config.block_q if text_len else nq
    if video_kv_blocks == 0 or video_q_blocks == 0:
        level_map = torch.ones(q.shape[:2] + (nq, nk), dtype=torch.int64, device=q.device)
        return PyramidBlockMask._compact(level_map, block_q=config.block_q, block_kv=config.block_kv)
    on_gpu = _on_triton(q, k, f"{config.mode}-mode mask")
    if config.mode == "budget":
        return _build_budget_mask(q, k, config, text_len, scale, stats, on_gpu, video_kv_blocks, video_q_blocks)
    if importance is None:
        importance = _importance(q, k, config, scale, on_gpu)
    caps = _caps(k, config, on_gpu)
    if on_gpu:
        from .kernels import build_mask_triton

        return build_mask_triton(
            importance, config, num_kv_blocks=video_kv_blocks, num_q_blocks=video_q_blocks, caps=caps
        )
    level_map = levels_from_importance(importance, config, num_blocks=video_kv_blocks)
    if caps is not None:
        level_map = torch.where(level_map > 0, torch.minimum(level_map, caps.unsqueeze(2)), level_map)
    return _force_text_and_compact(level_map, config, video_kv_blocks, video_q_blocks)


def _build_budget_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    config: PSAConfig,
    text_len: int,
    scale: float | None,
    stats: PyramidStats | None,
    on_gpu: bool,
    video_kv_blocks: int,
    video_q_blocks: int,
) -> PyramidBlockMask:
    """Budget mode: block statistics -> error-driven levels at ``config.target_density`` -> forced text."""
    lkv = k.shape[2]
    nq, nk = _ceil_div(q.shape[2], config.block_q), _ceil_div(lkv, config.block_kv)
    if stats is None:
        stats = _statistics(q, k, config, scale, on_gpu)
    elif tuple(stats.mass.shape) != tuple(q.shape[:2]) + (nq, nk):
        raise ValueError(f"stats of shape {tuple(stats.mass.shape)} do not match {nq}x{nk} blocks")
    tokens = block_sizes(lkv, config.block_kv, nk, q.device).to(torch.int64)
    forced = lkv - video_kv_blocks * config.block_kv if text_len else 0  # text KV tokens: level 1 in every row
    budget = row_budget(config.target_density, lkv, forced)
    caps = _caps(k, config, on_gpu)
    if on_gpu:
        from .kernels import allocate_levels_triton, compact_levels_triton

        level_map = allocate_levels_triton(stats, budget, tokens, num_blocks=video_kv_blocks, caps=caps)
        return compact_levels_triton(
            level_map,
            block_q=config.block_q,
            block_kv=config.block_kv,
            num_kv_blocks=video_kv_blocks,
            num_q_blocks=video_q_blocks,
        )
    level_map = allocate_levels(stats, budget, tokens, num_blocks=video_kv_blocks, caps=caps)
    return _force_text_and_compact(level_map, config, video_kv_blocks, video_q_blocks)


def _on_triton(q: torch.Tensor, k: torch.Tensor, what: str) -> bool:
    """True when the Triton kernels can run on ``q``, ``k`` (CUDA only); logs why not at DEBUG level."""
    if not q.is_cuda:
        return False
    from .kernels import triton_unsupported_reason

    reason = triton_unsupported_reason(q, k, k)
    if reason is not None:
        logger.debug("%s on the PyTorch reference: %s", what, reason)
    return reason is None


def estimate_statistics(q: torch.Tensor, k: torch.Tensor, config: PSAConfig, scale: float | None) -> PyramidStats:
    """Budget-mode block statistics (``PyramidStats``): the Triton kernels where they can run, else PyTorch."""
    return _statistics(q, k, config, scale, _on_triton(q, k, "budget-mode statistics"))


def _statistics(q: torch.Tensor, k: torch.Tensor, config: PSAConfig, scale: float | None, on_gpu: bool) -> PyramidStats:
    kwargs = dict(block_q=config.block_q, block_kv=config.block_kv, scale=scale)
    if on_gpu:
        from .kernels import estimate_pyramid_statistics_triton, pooled_logit_variance_triton

        var = pooled_logit_variance_triton(q, k, **kwargs)
        return estimate_pyramid_statistics_triton(q, k, var=var, **kwargs)
    return estimate_pyramid_statistics(q, k, **kwargs)
