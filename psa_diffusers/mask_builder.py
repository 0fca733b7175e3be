"""build_block_mask: the recipe of a level map, over the ops.

    importance (ops.importance) -> levels (ops.levels: quota or mass rule)
        -> similarity cap (ops.caps) -> forced text levels -> the compact mask

Mode "budget" hands over to :func:`psa_diffusers.budget.build_budget_mask` (statistics ->
allocation at a target density). Every step runs on the inputs' device with sort/cumsum over
``[B, H, Nq, Nk]`` and no host synchronisation, so the result is the same for the same inputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .config import PSAConfig
from .mask import PyramidBlockMask, ceil_div
from .ops.caps import similarity_caps
from .ops.importance import estimate_block_importance
from .ops.levels import choose_levels
from .ops.triton_support import resolve_backend

if TYPE_CHECKING:
    from .budget import PyramidStats


def text_blocks(lq: int, lkv: int, text_len: int, config: PSAConfig) -> tuple[int, int]:
    """``(video_q_blocks, video_kv_blocks)``: the blocks before the first that holds a text token.

    Text tokens are the last ``text_len`` of both sequences; blocks holding any are level 1.
    """
    nq, nk = ceil_div(lq, config.block_q), ceil_div(lkv, config.block_kv)
    if not text_len:
        return nq, nk
    return (lq - text_len) // config.block_q, (lkv - text_len) // config.block_kv


def build_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    config: PSAConfig,
    *,
    text_len: int = 0,
    scale: float | None = None,
    importance: torch.Tensor | None = None,
    stats: PyramidStats | None = None,
    backend: str = "auto",
) -> PyramidBlockMask:
    """Choose every block's level for ``q`` ``[B, H, Lq, D]`` against ``k`` ``[B, H, Lkv, D]``.

    Text tokens are the last ``text_len`` tokens of both sequences: every query sees the text
    KV blocks at level 1 and text query blocks see everything at level 1. ``importance``
    ``[B, H, Nq, Nk]`` may be passed to skip the estimate (quota and mass modes), ``stats``
    (:class:`~psa_diffusers.budget.PyramidStats`) likewise for the budget mode. ``backend``: "auto", "reference" or
    "triton", for every op of the recipe.
    """
    lq, lkv = q.shape[2], k.shape[2]
    nq, nk = ceil_div(lq, config.block_q), ceil_div(lkv, config.block_kv)
    video_q_blocks, video_kv_blocks = text_blocks(lq, lkv, text_len, config)
    if video_kv_blocks == 0 or video_q_blocks == 0:
        level_map = torch.ones(q.shape[:2] + (nq, nk), dtype=torch.int64, device=q.device)
        return PyramidBlockMask.from_valid_level_map(level_map, block_q=config.block_q, block_kv=config.block_kv)
    backend = resolve_backend(backend, q, k, names=("q", "k"))
    if config.mode == "budget":
        from .budget import build_budget_mask  # the opt-in mode: the default path does not load it

        return build_budget_mask(
            q, k, config, num_kv_blocks=video_kv_blocks, num_q_blocks=video_q_blocks, scale=scale,
            stats=stats, backend=backend,
        )  # fmt: skip
    if importance is None:
        importance = estimate_block_importance(
            q, k, block_q=config.block_q, block_kv=config.block_kv, stride=config.importance_stride, scale=scale,
            backend=backend,
        )  # fmt: skip
    elif importance.shape[-2:] != (nq, nk):
        raise ValueError(f"importance of shape {tuple(importance.shape)} does not match {nq}x{nk} blocks")
    caps = None
    if config.sim_thresholds is not None:
        caps = similarity_caps(k, block_kv=config.block_kv, thresholds=config.sim_thresholds, backend=backend)
    return choose_levels(
        importance, config, num_kv_blocks=video_kv_blocks, num_q_blocks=video_q_blocks, caps=caps, backend=backend
    )
