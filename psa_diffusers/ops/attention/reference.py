"""Pyramid sparse attention in plain PyTorch: the reference every kernel is tested against.

Exactly docs/design.md, section 1: for query block ``i`` and KV block ``j`` at level ``s``,
the queries see the pooled keys/values of block ``j`` at factor ``s``; a pooled
token standing for ``c`` real tokens gets the logit bias ``ln(c)``. One softmax
runs over the union of all levels of a row. Query blocks are processed in chunks,
so no ``[L, L]`` matrix is ever built.

Causal (``causal=True``, self-attention, ``Lq == Lkv``): query row ``r`` sees a pooled token only
if the last real key it stands for is at most ``r``; at level 1 that is the usual causal mask.
Level maps made by the causal rule keep the diagonal blocks at level 1 and skip those above it,
so a pooled group never holds a future token (docs/design.md, section 8).
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


def check_causal_lengths(causal: bool, lq: int, lkv: int) -> None:
    """Raise ValueError if ``causal`` is set for ``Lq != Lkv`` (causal PSA is self-attention over one sequence)."""
    if causal and lq != lkv:
        raise ValueError(f"causal=True needs Lq == Lkv (self-attention of one sequence), got Lq={lq}, Lkv={lkv}")


def last_keys(groups: int, factor: int, lkv: int, device=None) -> torch.Tensor:
    """Index of the last real key of each of ``groups`` pooled tokens at ``factor``: ``[groups]`` int64."""
    return ((torch.arange(groups, device=device) + 1) * factor).clamp(max=lkv) - 1


def psa_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: PyramidBlockMask,
    scale: float | None = None,
    causal: bool = False,
    *,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Pyramid sparse attention, the obvious way: pool explicitly, mask, softmax.

    q: ``[B, H, Lq, D]``, k and v: ``[B, H, Lkv, D]``; ``mask`` of shape
    ``[B, H, ceil(Lq/block_q), ceil(Lkv/block_kv)]``. ``causal``: no query sees a pooled token
    holding a later key (module docstring). Computes in float32
    (float64 for float64 inputs) and returns ``[B, H, Lq, D]`` in q's dtype; with ``return_lse``
    ``(out, lse)``, ``lse`` ``[B, H, Lq]`` float32: each row's natural log-sum-exp of its logits
    (scaled, with the ``ln(c)`` biases) -- what the Triton forward saves for its backward.
    """
    b, h, lq, d = q.shape
    lkv = k.shape[2]
    mask.check_fits(lq, lkv)
    check_causal_lengths(causal, lq, lkv)
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
        levels.append((s, kp, vp, counts.to(cdt).log(), owner, last_keys(kp.shape[2], s, lkv, q.device)))
    pooled_len = sum(kp.shape[2] for _, kp, _, _, _, _ in levels)

    rows_per_chunk = max(bq, (_CHUNK_ELEMENTS // max(1, b * h * pooled_len)) // bq * bq)
    out = torch.empty(b, h, lq, d, dtype=cdt, device=q.device)
    lse = torch.empty(b, h, lq, dtype=cdt, device=q.device) if return_lse else None
    for start in range(0, lq, rows_per_chunk):
        stop = min(lq, start + rows_per_chunk)
        qc = q[:, :, start:stop].to(cdt) * scale
        qblock = torch.div(torch.arange(start, stop, device=q.device), bq, rounding_mode="floor")
        rows_map = level_map[:, :, qblock]  # [B, H, rows, Nk]
        logits, values = [], []
        rows = torch.arange(start, stop, device=q.device).unsqueeze(-1)
        for s, kp, vp, bias, owner, last in levels:
            z = qc @ kp.transpose(-1, -2) + bias
            seen = rows_map[..., owner] == s  # [B, H, rows, Ls]
            if causal:
                seen = seen & (last <= rows)
            logits.append(z.masked_fill(~seen, -math.inf))
            values.append(vp)
        row_logits = torch.cat(logits, dim=-1)
        if lse is not None:
            lse[:, :, start:stop] = torch.logsumexp(row_logits, dim=-1)
        out[:, :, start:stop] = torch.softmax(row_logits, dim=-1) @ torch.cat(values, dim=2)
    if lse is not None:
        return out.to(q.dtype), lse.float()
    return out.to(q.dtype)


def psa_attention_backward_reference(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: PyramidBlockMask,
    scale: float | None = None,
    causal: bool = False,
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
    check_causal_lengths(causal, lq, lkv)
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
    last = torch.cat([last_keys(kp.shape[2], s, lkv, q.device) for s, kp, _, _, _ in levels])

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
        if causal:
            seen = seen & (last <= torch.arange(start, stop, device=q.device).unsqueeze(-1))
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
