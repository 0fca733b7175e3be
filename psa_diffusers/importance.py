"""Block importance and key smoothness estimates (plain PyTorch references).

Estimator (``estimate_block_importance``): a *sampled block mass*. Every
``stride``-th token of each block (offsets 0, stride, 2*stride, ... inside the
block, so every non-empty block has a sample) serves as a sampled query or key.
Each sampled query runs a full softmax over all sampled keys; the importance of
KV block ``j`` for query block ``i`` is the probability mass that the sampled
queries of block ``i`` put on the sampled keys of block ``j``, averaged over
those queries. Each row of ``S`` sums to 1, so the same numbers serve the quota
mode (ranking) and the mass mode (cumulative mass).

Why this one: it estimates the quantity that decides the error of a sparse
approximation -- the attention mass a block carries -- rather than a maximum
probability, it is deterministic (fixed strided samples), and it costs
``1/stride**2`` of dense ``QK^T`` (1/64 at stride 8). Block means of q and k
(one token per block) are cheaper but cannot see a peaked kernel whose width is
smaller than a block; see ``benchmarks/estimators.py`` for the comparison
against the exact block mass.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .config import LEVELS
from .mask import block_sizes


def sample_positions(seq_len: int, block: int, stride: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Strided sample positions and the block each belongs to: two int64 tensors ``[n_samples]``."""
    pos = torch.arange(0, seq_len, device=device)
    pos = pos[(pos % block) % stride == 0]
    return pos, torch.div(pos, block, rounding_mode="floor")


def estimate_block_importance(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_q: int,
    block_kv: int,
    stride: int = 8,
    scale: float | None = None,
) -> torch.Tensor:
    """Sampled block attention mass ``S`` ``[B, H, Nq, Nk]`` float32, each row summing to 1.

    q: ``[B, H, Lq, D]``, k: ``[B, H, Lkv, D]``.
    """
    b, h, lq, d = q.shape
    lkv = k.shape[2]
    scale = d**-0.5 if scale is None else float(scale)
    nq, nk = -(-lq // block_q), -(-lkv // block_kv)
    qpos, qblk = sample_positions(lq, block_q, stride, q.device)
    kpos, kblk = sample_positions(lkv, block_kv, stride, q.device)
    qs = q[:, :, qpos].float()
    ks = k[:, :, kpos].float()
    out = torch.zeros(b, h, nq, nk, dtype=torch.float32, device=q.device)
    rows = max(1, (1 << 24) // max(1, b * h * ks.shape[2]))
    for start in range(0, qs.shape[2], rows):
        p = torch.softmax((qs[:, :, start : start + rows] * scale) @ ks.transpose(-1, -2), dim=-1)
        per_block = torch.zeros(b, h, p.shape[2], nk, dtype=torch.float32, device=q.device)
        per_block.index_add_(3, kblk, p)  # [B, H, rows, Nk]
        out.index_add_(2, qblk[start : start + rows], per_block)
    counts = torch.bincount(qblk, minlength=nq).clamp(min=1).to(torch.float32)
    return out / counts.view(1, 1, nq, 1)


def exact_block_mass(q: torch.Tensor, k: torch.Tensor, *, block_q: int, block_kv: int, scale=None) -> torch.Tensor:
    """The exact attention mass of each block, ``[B, H, Nq, Nk]`` float32 (the oracle; costs dense attention)."""
    return estimate_block_importance(q, k, block_q=block_q, block_kv=block_kv, stride=1, scale=scale)


def block_smoothness(k: torch.Tensor, *, block_kv: int) -> torch.Tensor:
    """Key smoothness per KV block and pooling factor, ``[B, H, Nk, 3]`` float32 for factors 2, 4, 8.

    For factor ``s``: the mean, over the block's groups of ``s`` keys, of the
    cosine similarity between the first and the last key of the group (a group
    with one real token counts as 1).
    """
    b, h, lkv, d = k.shape
    nk = -(-lkv // block_kv)
    kf = k.float()
    out = []
    for s in (2, 4, 8):
        first = torch.arange(0, lkv, s, device=k.device)
        last = (first + s - 1).clamp(max=lkv - 1)
        cos = torch.nn.functional.cosine_similarity(kf[:, :, first], kf[:, :, last], dim=-1, eps=1e-6)
        cos = torch.where(first == last, torch.ones_like(cos), cos)
        blk = torch.div(first, block_kv, rounding_mode="floor")
        sums = torch.zeros(b, h, nk, device=k.device).index_add_(2, blk, cos)
        out.append(sums / torch.bincount(blk, minlength=nk).to(torch.float32))
    return torch.stack(out, dim=-1)


# --------------------------------------------------------------------------- pyramid statistics
# Used by the "budget" mode (see ``allocation.py`` and docs/allocation.md). Everything below
# is deterministic: no atomics (reductions over contiguous groups use reshape + sum, scatters
# write unique positions), stable sorts for every selection.

POOLED_LEVELS = LEVELS[1:]
"""Pooling factors whose within-group logit variance ``pooled_logit_variance`` reports."""


class PyramidStats(NamedTuple):
    """What the budget allocation needs to know about each (query block, KV block) pair.

    mass:      ``[B, H, Nq, Nk]`` float32, the attention mass of KV block ``j`` averaged over
               the queries of block ``i`` (rows sum to 1).
    sq_mass:   ``[B, H, Nq, Nk]`` float32, ``sum_{r in i} sum_{t in j} p_rt**2`` (the size of the
               output error when the block's detail is lost; only its relative size in a row matters).
    logit_var: ``[B, H, Nq, Nk, 3]`` float32, the mean over the queries of block ``i`` and the keys
               of block ``j`` of ``(scale * q_r . (k_t - kbar_g(t)))**2``, where ``kbar_g`` is the mean
               of the key's pooling group at factor 2, 4, 8: how much pooling block ``j`` blurs the
               logits of block ``i``.
    """

    mass: torch.Tensor
    sq_mass: torch.Tensor
    logit_var: torch.Tensor


def _pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    """``x`` ``[B, H, L, D]`` zero-padded along L to ``length``."""
    pad = length - x.shape[2]
    return torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x


def pooled_logit_variance(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_q: int,
    block_kv: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Within-group logit variance ``[B, H, Nq, Nk, 3]`` float32 for pooling factors 2, 4, 8.

    Exact, not sampled: with ``S_i = sum_{r in i} q_r q_r^T`` (``D x D``) and
    ``C_j^s = sum_{t in j} (k_t - kbar_g(t)) (k_t - kbar_g(t))^T`` the within-group scatter of
    block ``j``'s keys at factor ``s``, the value is ``scale**2 * tr(S_i C_j^s) / (n_i n_j)``.
    Cost: ``3 * Nq * Nk * D**2`` multiply-adds, i.e. ``3 L**2 D / 128`` for 128x128 blocks at
    ``D = 128`` (1.2% of dense attention), plus ``O(L D**2)`` for the moments.
    """
    b, h, lq, d = q.shape
    lkv = k.shape[2]
    scale = d**-0.5 if scale is None else float(scale)
    nq, nk = -(-lq // block_q), -(-lkv // block_kv)
    for s in POOLED_LEVELS:
        if block_kv % s:
            raise ValueError(f"block_kv={block_kv} must be a multiple of the pooling factor {s}")
    qf = _pad_tokens(q.float(), nq * block_q).reshape(b * h, nq, block_q, d)
    kf = _pad_tokens(k.float(), nk * block_kv).reshape(b * h, nk * block_kv, d)
    n_q = block_sizes(lq, block_q, nq, q.device).float()
    n_k = block_sizes(lkv, block_kv, nk, q.device).float()
    valid = (torch.arange(nk * block_kv, device=q.device) < lkv).float()
    norm = scale**2 / (n_q.view(nq, 1) * n_k.view(1, nk))
    out = torch.empty(b * h, nq, nk, len(POOLED_LEVELS), dtype=torch.float32, device=q.device)
    step = max(1, (1 << 26) // ((nq + nk) * d * d))  # heads per chunk: moments of ~256 MiB at most
    for c0 in range(0, b * h, step):
        c1 = min(b * h, c0 + step)
        qs = qf[c0:c1]
        sq = (qs.transpose(-1, -2) @ qs).reshape(c1 - c0, nq, d * d)  # [c, Nq, D*D]
        for li, s in enumerate(POOLED_LEVELS):
            g = kf[c0:c1].view(c1 - c0, -1, s, d)
            w = valid.view(-1, s, 1)
            mean = (g * w).sum(2, keepdim=True) / w.sum(1, keepdim=True).clamp(min=1)
            dev = ((g - mean) * w).view(c1 - c0, nk, block_kv, d)
            ck = (dev.transpose(-1, -2) @ dev).reshape(c1 - c0, nk, d * d)  # [c, Nk, D*D]
            out[c0:c1, ..., li] = (sq @ ck.transpose(-1, -2)) * norm
    return out.view(b, h, nq, nk, len(POOLED_LEVELS))


def group_logit_variance(var: torch.Tensor, group: int) -> torch.Tensor:
    """The ``[B, H, Nq, Nk]`` slice of a ``pooled_logit_variance`` result for groups of ``group`` keys.

    Factor 8, the coarsest computed, stands in for larger groups.
    """
    li = POOLED_LEVELS.index(group) if group in POOLED_LEVELS else len(POOLED_LEVELS) - 1
    return var[..., li]


def estimate_pyramid_statistics(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_q: int,
    block_kv: int,
    scale: float | None = None,
    group: int = 8,
    refine_blocks: int = 16,
    refine_groups: int = 16,
    var: torch.Tensor | None = None,
) -> PyramidStats:
    """Block mass, squared mass and pooling blur of every (query block, KV block) pair.

    Two stages, both deterministic:

    1. *Pooled estimate.* Queries and keys are pooled in groups of ``group`` consecutive
       tokens (the pyramid's level-8 keys). Each pooled query runs a softmax over all
       pooled keys with logits ``scale * qbar . kbar + ln(c) + V/2``, where ``V`` is the
       within-group logit variance at factor ``group`` (``pooled_logit_variance``): the
       log-normal correction for the mass that the mean logit underestimates. Cost
       ``(L/group)**2 * D``, i.e. ``L**2 D / 64``.
    2. *Refinement of the peaks.* Each row ranks its KV blocks by the pooled mass and keeps
       the best ``refine_blocks``; each query group takes, among the key groups of those
       blocks, the ``refine_groups`` with the largest pooled logit, and computes the exact
       logits of its ``group`` queries against their ``group`` keys. Those replace the pooled
       values, per query, in the softmax normaliser, the mass and the squared mass. Cost
       ``L * refine_groups * group * D`` (a quarter of stage 1 at 32k tokens). Sampled or
       pooled estimates alone miss the sharp peaks of each query's own neighbourhood, and
       the squared mass is made of those peaks.

    ``sq_mass`` of groups that are not refined uses the log-normal second moment
    ``c * exp(2 zbar + 2 V)``. ``var`` may pass the ``pooled_logit_variance`` result (e.g. from
    its Triton kernel) instead of computing it here. Returns :class:`PyramidStats` (float32).
    """
    b, h, lq, d = q.shape
    lkv = k.shape[2]
    scale = d**-0.5 if scale is None else float(scale)
    if block_q % group or block_kv % group:
        raise ValueError(f"group={group} must divide block_q={block_q} and block_kv={block_kv}")
    nq, nk = -(-lq // block_q), -(-lkv // block_kv)
    dev_ = q.device
    if var is None:
        var = pooled_logit_variance(q, k, block_q=block_q, block_kv=block_kv, scale=scale)
    var_g = group_logit_variance(var, group).reshape(b * h, nq, nk)
    gpq, gpk = block_q // group, block_kv // group  # groups per query block / per KV block
    n_qg, n_kg = nq * gpq, nk * gpk  # padded group counts (whole blocks)
    # pooled queries and keys on the padded grid; counts of real tokens per group (0 for padding)
    qf = _pad_tokens(q.float(), n_qg * group).reshape(b * h, n_qg, group, d)
    kf = _pad_tokens(k.float(), n_kg * group).reshape(b * h, n_kg, group, d)
    q_cnt = block_sizes(lq, group, n_qg, dev_).float()
    k_cnt = block_sizes(lkv, group, n_kg, dev_).float()
    q_valid = torch.arange(n_qg * group, device=dev_).view(n_qg, group) < lq
    k_valid = torch.arange(n_kg * group, device=dev_).view(n_kg, group) < lkv
    qbar = qf.sum(2) / q_cnt.clamp(min=1).view(1, n_qg, 1)
    kbar = kf.sum(2) / k_cnt.clamp(min=1).view(1, n_kg, 1)
    log_kc = torch.where(k_cnt > 0, k_cnt.clamp(min=1).log(), torch.full_like(k_cnt, -math.inf))
    m = min(refine_blocks, nk)
    t_sel = min(refine_groups, m * gpk)
    n_q = block_sizes(lq, block_q, nq, dev_).float()
    mass = torch.empty(b * h, nq, nk, dtype=torch.float32, device=dev_)
    sq_mass = torch.empty_like(mass)
    per_row = gpq * (n_kg + t_sel * group * (d + group))
    rows = max(1, (1 << 26) // max(1, b * h * per_row))  # query-block rows per chunk (~256 MiB tensors)
    for i0 in range(0, nq, rows):
        i1 = min(nq, i0 + rows)
        r = i1 - i0
        g0, g1 = i0 * gpq, i1 * gpq
        ng = g1 - g0
        zbar = (qbar[:, g0:g1] * scale) @ kbar.transpose(-1, -2)  # [BH, ng, Gk]
        vg = var_g[:, i0:i1].repeat_interleave(gpq, 1).repeat_interleave(gpk, 2)  # [BH, ng, Gk]
        bulk = zbar + log_kc + 0.5 * vg  # log of each key group's mass (per query of the group)
        # stage 1 ranking: pooled block mass of each row
        pg = torch.softmax(bulk, dim=-1) * q_cnt[g0:g1].view(1, ng, 1)
        row_mass = pg.view(b * h, r, gpq, nk, gpk).sum((2, 4))  # [BH, r, Nk]
        top_blocks = torch.sort(row_mass, dim=-1, descending=True, stable=True).indices[..., :m]
        cand = (top_blocks.unsqueeze(-1) * gpk + torch.arange(gpk, device=dev_)).flatten(-2)  # [BH, r, m*gpk]
        cand = cand.repeat_interleave(gpq, 1)  # [BH, ng, m*gpk]
        zc = zbar.gather(-1, cand).masked_fill(k_cnt[cand] == 0, -math.inf)
        pick = torch.sort(zc, dim=-1, descending=True, stable=True).indices[..., :t_sel]
        sel = cand.gather(-1, pick)  # [BH, ng, T] distinct key groups
        # stage 2: exact logits of each query group against its selected key groups
        kt = kf.gather(1, sel.reshape(b * h, ng * t_sel, 1, 1).expand(-1, -1, group, d))
        kt = kt.view(b * h, ng, t_sel * group, d)
        z = (qf[:, g0:g1] * scale) @ kt.transpose(-1, -2)  # [BH, ng, group(q), T*group(k)]
        kv_ok = k_valid[sel].view(b * h, ng, 1, t_sel * group)
        z = z.masked_fill(~kv_ok, -math.inf)
        selected = torch.zeros(b * h, ng, n_kg, dtype=torch.bool, device=dev_).scatter_(-1, sel, True)
        rest = torch.logsumexp(bulk.masked_fill(selected, -math.inf), dim=-1)  # [BH, ng]
        log_z = torch.logaddexp(rest.unsqueeze(-1), torch.logsumexp(z, dim=-1))  # [BH, ng, group(q)]
        qv = q_valid[g0:g1].view(1, ng, group)
        log_z = log_z.masked_fill(~qv, math.inf)  # padded queries contribute nothing
        p = torch.exp(z - log_z.unsqueeze(-1)).view(b * h, ng, group, t_sel, group)
        top_mass = p.sum((2, 4))  # [BH, ng, T], summed over the group's queries
        top_sq = p.square().sum((2, 4))
        inv_z = torch.logsumexp(-log_z, dim=-1, keepdim=True)  # log sum_r 1/Z_r
        inv_z2 = torch.logsumexp(-2 * log_z, dim=-1, keepdim=True)
        bulk_mass = torch.exp(bulk + inv_z).masked_fill(selected, 0.0)
        bulk_sq = torch.exp(2 * bulk - log_kc + vg + inv_z2).masked_fill(selected | (k_cnt == 0), 0.0)
        bulk_mass = bulk_mass.scatter(-1, sel, top_mass)
        bulk_sq = bulk_sq.scatter(-1, sel, top_sq)
        mass[:, i0:i1] = bulk_mass.view(b * h, r, gpq, nk, gpk).sum((2, 4)) / n_q[i0:i1].view(1, r, 1)
        sq_mass[:, i0:i1] = bulk_sq.view(b * h, r, gpq, nk, gpk).sum((2, 4))
    shape = (b, h, nq, nk)
    return PyramidStats(mass.view(shape), sq_mass.view(shape), var)
