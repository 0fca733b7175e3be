"""Pyramid sparse attention in plain PyTorch: the reference every kernel is tested against.

Exactly docs/design.md, section 1: for query block ``i`` and KV block ``j`` at level ``s``,
the queries see the pooled keys/values of block ``j`` at factor ``s``; a pooled
token standing for ``c`` real tokens gets the logit bias ``ln(c)``. One softmax
runs over the union of all levels of a row. Query blocks are processed in chunks,
so no ``[L, L]`` matrix is ever built.
"""

from __future__ import annotations

import math

import torch

from ...config import LEVELS
from ...mask import PyramidBlockMask
from ..pooling.reference import pool_tokens

_CHUNK_ELEMENTS = 1 << 25  # logits per chunk: 32M floats (128 MiB in fp32)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def psa_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: PyramidBlockMask,
    scale: float | None = None,
) -> torch.Tensor:
    """Pyramid sparse attention, the obvious way: pool explicitly, mask, softmax.

    q: ``[B, H, Lq, D]``, k and v: ``[B, H, Lkv, D]``; ``mask`` of shape
    ``[B, H, ceil(Lq/block_q), ceil(Lkv/block_kv)]``. Computes in float32
    (float64 for float64 inputs) and returns ``[B, H, Lq, D]`` in q's dtype.
    """
    b, h, lq, d = q.shape
    lkv = k.shape[2]
    mask.check_fits(lq, lkv)
    if mask.shape[:2] != (b, h):
        raise ValueError(f"mask batch/heads {mask.shape[:2]} do not match q {tuple(q.shape)}")
    scale = d**-0.5 if scale is None else float(scale)
    cdt = _compute_dtype(q.dtype)
    level_map = mask.to_level_map().to(q.device)  # [B, H, Nq, Nk]
    bq, bkv = mask.block_q, mask.block_kv

    levels = []  # per factor: pooled k, pooled v, log-count bias, owning KV block of each pooled token
    for s in LEVELS:
        kp, counts = pool_tokens(k.to(cdt), s)
        vp, _ = pool_tokens(v.to(cdt), s)
        owner = torch.div(torch.arange(kp.shape[2], device=q.device) * s, bkv, rounding_mode="floor")
        levels.append((s, kp, vp, counts.to(cdt).log(), owner))
    pooled_len = sum(kp.shape[2] for _, kp, _, _, _ in levels)

    rows_per_chunk = max(bq, (_CHUNK_ELEMENTS // max(1, b * h * pooled_len)) // bq * bq)
    out = torch.empty(b, h, lq, d, dtype=cdt, device=q.device)
    for start in range(0, lq, rows_per_chunk):
        stop = min(lq, start + rows_per_chunk)
        qc = q[:, :, start:stop].to(cdt) * scale
        qblock = torch.div(torch.arange(start, stop, device=q.device), bq, rounding_mode="floor")
        rows_map = level_map[:, :, qblock]  # [B, H, rows, Nk]
        logits, values = [], []
        for s, kp, vp, bias, owner in levels:
            z = qc @ kp.transpose(-1, -2) + bias
            seen = rows_map[..., owner] == s  # [B, H, rows, Ls]
            logits.append(z.masked_fill(~seen, -math.inf))
            values.append(vp)
        p = torch.softmax(torch.cat(logits, dim=-1), dim=-1)
        out[:, :, start:stop] = p @ torch.cat(values, dim=2)
    return out.to(q.dtype)


def psa_attention_backward_reference(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: PyramidBlockMask,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of :func:`psa_attention_reference` for ``grad_out`` ``[B, H, Lq, D]``.

    The mask is a constant. With ``P = softmax(Z)`` over a row's pooled tokens and ``O = P Vbar``:
    ``dVbar = P^T dO``, ``dZ = P * (dO Vbar^T - rowsum(dO * O))``, ``dQ = scale * dZ Kbar``,
    ``dKbar = scale * dZ^T Q``; a pooled token standing for ``c`` real tokens hands ``1/c`` of its
    gradient to each of them. Computed in float32 (float64 for float64 inputs), returned in the
    inputs' dtypes.
    """
    b, h, lq, d = q.shape
    lkv = k.shape[2]
    mask.check_fits(lq, lkv)
    scale = d**-0.5 if scale is None else float(scale)
    cdt = _compute_dtype(q.dtype)
    level_map = mask.to_level_map().to(q.device)
    bq, bkv = mask.block_q, mask.block_kv
    levels = []
    for s in LEVELS:
        kp, counts = pool_tokens(k.to(cdt), s)
        vp, _ = pool_tokens(v.to(cdt), s)
        owner = torch.div(torch.arange(kp.shape[2], device=q.device) * s, bkv, rounding_mode="floor")
        levels.append((s, kp, vp, counts.to(cdt), owner))
    kcat = torch.cat([kp for _, kp, _, _, _ in levels], dim=2)
    vcat = torch.cat([vp for _, _, vp, _, _ in levels], dim=2)
    bias = torch.cat([c.log() for _, _, _, c, _ in levels])
    pooled_len = kcat.shape[2]

    dq = torch.empty(b, h, lq, d, dtype=cdt, device=q.device)
    dkcat = torch.zeros_like(kcat)
    dvcat = torch.zeros_like(vcat)
    rows_per_chunk = max(bq, (_CHUNK_ELEMENTS // max(1, b * h * pooled_len)) // bq * bq)
    for start in range(0, lq, rows_per_chunk):
        stop = min(lq, start + rows_per_chunk)
        qc = q[:, :, start:stop].to(cdt) * scale
        qblock = torch.div(torch.arange(start, stop, device=q.device), bq, rounding_mode="floor")
        rows_map = level_map[:, :, qblock]
        seen = torch.cat([rows_map[..., owner] == s for s, _, _, _, owner in levels], dim=-1)
        z = (qc @ kcat.transpose(-1, -2) + bias).masked_fill(~seen, -math.inf)
        p = torch.softmax(z, dim=-1)
        go = grad_out[:, :, start:stop].to(cdt)
        o = p @ vcat
        dz = p * (go @ vcat.transpose(-1, -2) - (go * o).sum(-1, keepdim=True))
        dq[:, :, start:stop] = (dz @ kcat) * scale
        dkcat += dz.transpose(-1, -2) @ qc
        dvcat += p.transpose(-1, -2) @ go

    dk = torch.zeros(b, h, lkv, d, dtype=cdt, device=q.device)
    dv = torch.zeros_like(dk)
    row = 0
    for s, kp, _, counts, _ in levels:
        n = kp.shape[2]
        share = (1.0 / counts).view(1, 1, n, 1)  # each real token of a group gets 1/c of its gradient
        dk += (dkcat[:, :, row : row + n] * share).repeat_interleave(s, dim=2)[:, :, :lkv]
        dv += (dvcat[:, :, row : row + n] * share).repeat_interleave(s, dim=2)[:, :, :lkv]
        row += n
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
