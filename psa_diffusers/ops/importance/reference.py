"""The sampled importance estimate and the exact block mass (plain PyTorch reference).

Estimator (``estimate_block_importance_reference``): a *sampled block mass*. Every
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
``1/stride**2`` of dense ``QK^T`` (1/64 at stride 8). docs/design.md ("How the
level map is chosen") compares it with cheaper and dearer estimates.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


def sample_positions(seq_len: int, block: int, stride: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Strided sample positions and the block each belongs to: two int64 tensors ``[n_samples]``."""
    pos = torch.arange(0, seq_len, device=device)
    pos = pos[(pos % block) % stride == 0]
    return pos, torch.div(pos, block, rounding_mode="floor")


def estimate_block_importance_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_q: int,
    block_kv: int,
    stride: int = 8,
    scale: float | None = None,
    past_only: bool = False,
) -> torch.Tensor:
    """Sampled block attention mass ``S`` ``[B, H, Nq, Nk]`` float32, each row summing to 1.

    q: ``[B, H, Lq, D]``, k: ``[B, H, Lkv, D]``. ``past_only`` (for causal rules): entries of KV blocks not
    wholly before their query block (``(j + 1) * block_kv > i * block_q``) set to 0.
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
    out = out / counts.view(1, 1, nq, 1)
    if past_only:
        first_row = torch.arange(nq, device=q.device).unsqueeze(1) * block_q
        key_end = (torch.arange(nk, device=q.device).unsqueeze(0) + 1) * block_kv
        out = out.masked_fill(key_end > first_row, 0.0)
    return out


def exact_block_mass(q: torch.Tensor, k: torch.Tensor, *, block_q: int, block_kv: int, scale=None) -> torch.Tensor:
    """The exact attention mass of each block, ``[B, H, Nq, Nk]`` float32 (the oracle; costs dense attention)."""
    return estimate_block_importance_reference(q, k, block_q=block_q, block_kv=block_kv, stride=1, scale=scale)


class BlockStatistics(NamedTuple):
    """What the default "density" rule knows about each (query block, KV block) pair (docs/benchmarks.md, s. 2).

    mass:      ``[B, H, Nq, Nk]`` float32, the sampled block mass (rows sum to 1).
    sq_mass:   ``[B, H, Nq, Nk]`` float32, the sampled ``sum_{r in i} sum_{t in j} p_rt**2`` (up to a
               factor common to the row: only its relative size in a row matters).
    spike:     ``[B, H, Nq, Nk]`` bool, blocks whose sampled mass comes mostly from sink keys (a lone
               key every query attends to): pooling would dilute it, so they are never pooled.
    q_sq_norm: ``[B, H, Nq]`` float32, the mean squared norm of the sampled queries of each block.
    """

    mass: torch.Tensor
    sq_mass: torch.Tensor
    spike: torch.Tensor
    q_sq_norm: torch.Tensor


SPIKE_SHARE = 0.5
"""A block is a spike block for a row when more than this share of its sampled mass sits on sink keys."""


def key_sample_stride(stride: int) -> int:
    """The key stride of the block statistics for a query stride ``stride``: half of it (at least 1)."""
    return max(1, stride // 2)


def estimate_block_statistics_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_q: int,
    block_kv: int,
    stride: int = 8,
    sinks: torch.Tensor | None = None,
    scale: float | None = None,
) -> BlockStatistics:
    """Sampled block mass, squared mass and spike blocks (the default "density" rule's estimate).

    q: ``[B, H, Lq, D]``, k: ``[B, H, Lkv, D]``; ``sinks``: optional ``[B, H, m]`` int64 key
    positions (``ops.caps.sink_keys``). Deterministic: fixed samples, no randomness.

    * Queries at offsets 0, ``stride``, ... of every query block are sampled, as in
      :func:`estimate_block_importance_reference`.
    * Keys at offsets 0, ``s``, 2 ``s``, ... of every KV block with ``s = key_sample_stride(stride)``
      (twice the keys of the published estimate: at stride 8 a query sees every 4th key, so a
      head narrow along the token order is not aliased away), each standing for ``s`` keys (log
      weight ``ln s``), plus the sink keys (distinct positions; -1 for none), each standing for
      itself (log weight 0); a sampled key that is also a sink counts once, as the sink.
    * Each sampled query takes one softmax over all of them. ``mass[i, j]`` is the probability its
      sampled queries put on the samples of block ``j``, averaged; ``sq_mass[i, j]`` the sum over
      them of ``p**2 / w`` (a sample of weight ``w`` stands for ``w`` keys of probability ``p / w``);
      ``spike[i, j]`` whether more than ``SPIKE_SHARE`` of ``mass[i, j]`` sits on sink keys.

    Non-finite entries of q and k count as 0. Costs about ``2 / (stride * s)`` of dense ``QK^T``.
    """
    q = torch.nan_to_num(q.float(), nan=0.0, posinf=0.0, neginf=0.0)
    k = torch.nan_to_num(k.float(), nan=0.0, posinf=0.0, neginf=0.0)
    b, h, lq, d = q.shape
    lkv = k.shape[2]
    scale = d**-0.5 if scale is None else float(scale)
    nq, nk = -(-lq // block_q), -(-lkv // block_kv)
    ks = key_sample_stride(stride)
    qpos, qblk = sample_positions(lq, block_q, stride, q.device)
    kpos, kblk = sample_positions(lkv, block_kv, ks, q.device)
    keys = k[:, :, kpos]
    bias = torch.full((b, h, kpos.numel()), math.log(ks), device=q.device)
    owner = kblk.expand(b, h, -1)
    n_sinks = 0
    if sinks is not None:
        sinks = sinks.to(device=q.device, dtype=torch.int64)
        n_sinks = sinks.shape[-1]
        real = (sinks >= 0) & (sinks < lkv)
        # a sampled key that is a sink is counted as the sink (weight 1), not as a sample (weight s)
        is_sink = (kpos.view(1, 1, -1, 1) == torch.where(real, sinks, -1).unsqueeze(2)).any(-1)
        bias = bias.masked_fill(is_sink, -math.inf)
        keys = torch.cat([keys, k.gather(2, sinks.clamp(0, lkv - 1).unsqueeze(-1).expand(-1, -1, -1, d))], 2)
        bias = torch.cat([bias, torch.where(real, 0.0, -math.inf)], -1)
        owner = torch.cat([owner, sinks.clamp(0, lkv - 1) // block_kv], -1)
    qs = q[:, :, qpos]
    p = torch.softmax(scale * qs @ keys.transpose(-1, -2) + bias.unsqueeze(2), dim=-1)  # [B, H, Sq, Sk]
    idx = owner.unsqueeze(2).expand_as(p)
    zeros = torch.zeros(b, h, p.shape[2], nk, device=q.device)
    per_q = zeros.scatter_add(3, idx, p)
    per_q_sq = zeros.scatter_add(3, idx, p.square() * torch.exp(-bias.clamp(min=-30.0)).unsqueeze(2))
    sink_part = zeros.scatter_add(3, idx[..., kpos.numel() :], p[..., kpos.numel() :]) if n_sinks else zeros
    counts = torch.bincount(qblk, minlength=nq).clamp(min=1).to(torch.float32).view(1, 1, nq, 1)
    per_block = torch.zeros(b, h, nq, nk, device=q.device)
    mass = per_block.index_add(2, qblk, per_q) / counts
    sq_mass = per_block.index_add(2, qblk, per_q_sq)
    sink_mass = per_block.index_add(2, qblk, sink_part) / counts
    q_sq = torch.zeros(b, h, nq, device=q.device).index_add(2, qblk, qs.square().sum(-1)) / counts[..., 0]
    return BlockStatistics(mass, sq_mass, sink_mass > SPIKE_SHARE * mass, q_sq)
