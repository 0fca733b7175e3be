"""Within-group logit variance of every block pair at pooling factors 2, 4, 8 (plain PyTorch reference)."""

from __future__ import annotations

import torch

from ...config import POOLED_LEVELS
from ...mask import block_sizes


def pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    """``x`` ``[B, H, L, D]`` zero-padded along L to ``length``."""
    pad = length - x.shape[2]
    return torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x


def pooled_logit_variance_reference(
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
    qf = pad_tokens(q.float(), nq * block_q).reshape(b * h, nq, block_q, d)
    kf = pad_tokens(k.float(), nk * block_kv).reshape(b * h, nk * block_kv, d)
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
