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
    return estimate_block_importance_reference(q, k, block_q=block_q, block_kv=block_kv, stride=1, scale=scale)
