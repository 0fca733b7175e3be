"""build_block_mask: the recipe of a level map, over the ops.

Mode "density" (levels at a target density from cheap statistics; docs/benchmarks.md, section 2):

    key statistics and sink keys (ops.caps) -> sampled block statistics (ops.importance)
        -> levels at the target density by estimated error (the budget mode's allocation)
        -> similarity cap -> forced text levels -> the compact mask

Modes "quota" and "mass" (the published rules):

    importance (ops.importance) -> levels (ops.levels: quota or mass rule)
        -> similarity cap (ops.caps) -> forced text levels -> the compact mask

``build_causal_block_mask`` is the causal recipe (importance of the past blocks -> the causal rule of
``ops.levels.causal`` with caps; one Triton launch each on CUDA).

Mode "budget" hands over to :func:`psa_diffusers.budget.build_budget_mask` (statistics ->
allocation at a target density). Every step runs on the inputs' device with sort/cumsum over
``[B, H, Nq, Nk]`` and no host synchronisation, so the result is the same for the same inputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .config import PSAConfig
from .mask import PyramidBlockMask, ceil_div
from .ops.caps import SINK_COUNT, SINK_SEGMENT, key_block_statistics, similarity_caps, sink_keys
from .ops.importance import estimate_block_importance, estimate_block_statistics
from .ops.levels import causal_levels, check_causal_rule, choose_levels
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
    (:class:`~psa_diffusers.budget.PyramidStats`) likewise for the density and budget modes.
    ``backend``: "auto", "reference" or "triton", for every op of the recipe.
    """
    lq, lkv = q.shape[2], k.shape[2]
    nq, nk = ceil_div(lq, config.block_q), ceil_div(lkv, config.block_kv)
    video_q_blocks, video_kv_blocks = text_blocks(lq, lkv, text_len, config)
    if video_kv_blocks == 0 or video_q_blocks == 0:
        level_map = torch.ones(q.shape[:2] + (nq, nk), dtype=torch.int64, device=q.device)
        return PyramidBlockMask.from_valid_level_map(level_map, block_q=config.block_q, block_kv=config.block_kv)
    backend = resolve_backend(backend, q, k, names=("q", "k"))
    if config.mode == "density" and stats is None:
        stats = density_statistics(
            q, k, config, num_kv_blocks=video_kv_blocks, text_len=text_len, scale=scale, backend=backend
        )  # fmt: skip
    if config.mode in ("density", "budget"):
        from .budget import build_budget_mask  # the allocation both modes share (quota and mass do not load it)

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


def build_causal_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    config: PSAConfig,
    *,
    sink_tokens: int,
    recent_tokens: int,
    text_len: int = 0,
    scale: float | None = None,
    importance: torch.Tensor | None = None,
    backend: str = "auto",
) -> PyramidBlockMask:
    """Levels that never look ahead for causal self-attention of q, k ``[B, H, L, D]`` (quota or mass mode).

    importance (``ops.importance``, or ``importance`` ``[B, H, Nq, Nk]``) -> the causal rule
    (``ops.levels.causal``: diagonal blocks level 1, later blocks skipped, the first ``sink_tokens``
    and the ``recent_tokens`` before each query block level 1, query rows of the last ``text_len``
    tokens dense over the past) -> similarity cap on the competing blocks -> the compact mask. With the
    Triton backend: the estimate (``past_only``), the caps and the levels are one launch each, no host sync.
    """
    check_causal_rule(config, sink_tokens, recent_tokens)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"causal masks need Lq == Lkv, got Lq={q.shape[2]}, Lkv={k.shape[2]}")
    backend = resolve_backend(backend, q, k, names=("q", "k"))
    if importance is None:  # the rule reads only the competing blocks, all wholly in the past
        importance = estimate_block_importance(
            q, k, block_q=config.block_q, block_kv=config.block_kv, stride=config.importance_stride, scale=scale,
            past_only=True, backend=backend,
        )  # fmt: skip
    caps = None
    if config.sim_thresholds is not None:
        caps = similarity_caps(k, block_kv=config.block_kv, thresholds=config.sim_thresholds, backend=backend)
    return causal_levels(
        importance, config, length=q.shape[2], sink_tokens=sink_tokens, recent_tokens=recent_tokens,
        text_len=text_len, caps=caps, backend=backend,
    )  # fmt: skip


def density_statistics(
    q: torch.Tensor,
    k: torch.Tensor,
    config: PSAConfig,
    *,
    num_kv_blocks: int,
    text_len: int = 0,
    scale: float | None = None,
    backend: str = "auto",
) -> PyramidStats:
    """The "density" rule's block statistics, in the budget mode's form (``PyramidStats``).

    1. The mean of the sampled video queries; per KV block its within-group key scatter, and per run
       of ``SINK_SEGMENT`` keys the key the mean query favours most (``ops.caps.key_block_statistics``);
       the ``SINK_COUNT`` most favoured of those, among the video keys, are the head's sink candidates.
    2. The sampled block mass and squared mass with the sinks among the samples, and the blocks
       whose mass sits on sinks (``ops.importance.estimate_block_statistics``).
    3. The within-group logit variance, for queries spread evenly over all directions:
       ``scale**2 * m2_i * scatter_j(s) / D`` (``m2_i`` the mean squared norm of block ``i``'s sampled
       queries); spike blocks get ``VAR_LIMIT``, so they are never pooled.

    All of it is a few ``O(L D)`` passes plus the sampled estimate; the allocation then runs on
    ``[B, H, Nq, Nk]`` tensors (docs/benchmarks.md, section 2).
    """
    from .budget.stats import VAR_LIMIT, PyramidStats

    d = q.shape[-1]
    scale = d**-0.5 if scale is None else float(scale)
    stride = config.importance_stride
    video = q[:, :, : q.shape[2] - text_len : stride]
    q_mean = torch.nan_to_num(video.float(), nan=0.0, posinf=0.0, neginf=0.0).mean(2)
    scatter, top_logit, top_index = key_block_statistics(k, q_mean, block_kv=config.block_kv, backend=backend)
    video_runs = num_kv_blocks * config.block_kv // SINK_SEGMENT  # sink candidates among the video keys
    sinks = sink_keys(top_logit[..., :video_runs], top_index[..., :video_runs], SINK_COUNT)
    est = estimate_block_statistics(
        q, k, block_q=config.block_q, block_kv=config.block_kv, stride=stride, sinks=sinks, scale=scale,
        backend=backend,
    )  # fmt: skip
    var = (scale * scale / d) * est.q_sq_norm[..., None, None] * scatter.unsqueeze(2)  # [B, H, Nq, Nk, 3]
    var = torch.where(est.spike.unsqueeze(-1), torch.full_like(var, VAR_LIMIT), var)
    return PyramidStats(est.mass, est.sq_mass, var)
