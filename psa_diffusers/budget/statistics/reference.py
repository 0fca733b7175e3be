"""Block mass, squared mass and pooling blur of every block pair (plain PyTorch reference)."""

from __future__ import annotations

import math

import torch

from ...mask import block_sizes
from ..stats import PyramidStats, finite_tokens, group_logit_variance, lognormal_shift
from ..variance.reference import pad_tokens, pooled_logit_variance_reference


def estimate_pyramid_statistics_reference(
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
       within-group logit variance at factor ``group`` (``pooled_logit_variance_reference``): the
       log-normal correction for the mass that the mean logit underestimates, capped at
       ``sqrt((group - 1) V)`` (``lognormal_shift``), the most that ``group`` logits of that
       variance can add (beyond it, from ``V = 4 (group - 1)`` on, the log-normal correction grew
       without bound and the pooled masses overflowed the refined normaliser). Cost
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
    ``c * exp(2 zbar + 2 V)`` with ``V`` capped at ``ln(group)``: a group's squared mass is at most its
    mass squared (all of it on one key), which the uncapped moment exceeds once ``V > ln c``, and
    overflows float32 for large logits. Non-finite entries of q and k (NaN, inf) count as 0, so one
    bad value costs its own token, not its whole block. ``var`` may pass the
    ``pooled_logit_variance_reference`` result (e.g. from its Triton kernel) instead of computing it
    here. Returns :class:`PyramidStats` (float32).
    """
    b, h, lq, d = q.shape
    lkv = k.shape[2]
    scale = d**-0.5 if scale is None else float(scale)
    q, k = finite_tokens(q), finite_tokens(k)
    if block_q % group or block_kv % group:
        raise ValueError(f"group={group} must divide block_q={block_q} and block_kv={block_kv}")
    nq, nk = -(-lq // block_q), -(-lkv // block_kv)
    dev_ = q.device
    if var is None:
        var = pooled_logit_variance_reference(q, k, block_q=block_q, block_kv=block_kv, scale=scale)
    var_g = group_logit_variance(var, group).reshape(b * h, nq, nk)
    gpq, gpk = block_q // group, block_kv // group  # groups per query block / per KV block
    n_qg, n_kg = nq * gpq, nk * gpk  # padded group counts (whole blocks)
    # pooled queries and keys on the padded grid; counts of real tokens per group (0 for padding)
    qf = pad_tokens(q.float(), n_qg * group).reshape(b * h, n_qg, group, d)
    kf = pad_tokens(k.float(), n_kg * group).reshape(b * h, n_kg, group, d)
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
        bulk = zbar + log_kc + lognormal_shift(vg, group)  # log of each key group's mass (per query of the group)
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
        sq_log = 2 * bulk - log_kc + vg.clamp(max=math.log(group)) + inv_z2  # capped: at most the mass squared
        bulk_sq = torch.exp(sq_log).masked_fill(selected | (k_cnt == 0), 0.0)
        bulk_mass = bulk_mass.scatter(-1, sel, top_mass)
        bulk_sq = bulk_sq.scatter(-1, sel, top_sq)
        mass[:, i0:i1] = bulk_mass.view(b * h, r, gpq, nk, gpk).sum((2, 4)) / n_q[i0:i1].view(1, r, 1)
        sq_mass[:, i0:i1] = bulk_sq.view(b * h, r, gpq, nk, gpk).sum((2, 4))
    shape = (b, h, nq, nk)
    return PyramidStats(mass.view(shape), sq_mass.view(shape), var)
