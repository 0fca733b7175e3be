"""Key smoothness per KV block and the similarity cap; key scatter and sink candidates (Triton).

Same math as :func:`.reference.block_smoothness_reference`: for factor ``s``
in 2, 4, 8, the mean over the block's groups of ``s`` keys of the cosine
similarity between the group's first and last key (``x.y / (max(|x|, eps) *
max(|y|, eps))``, eps 1e-6; a group of one real token counts 1). The cap of a
block is the largest ``s`` whose smoothness reaches ``tau_s`` (1 if none), as in
``reference.similarity_caps_reference``. One program per (block, batch*head) reads the
block once; both outputs come from one launch.

``key_block_statistics_triton`` (same math as ``reference.key_block_statistics_reference``):
one program per (block, batch*head) reads the block's keys once and writes the within-group key
scatter at factors 2, 4, 8 and, per run of ``SINK_SEGMENT`` keys, the key with the largest product
with the head's mean query.
"""

from __future__ import annotations

import torch

from .. import triton_support
from ..kernel_configs import kernel_config
from ..triton_support import HAS_TRITON, cdiv, check_supported, last_dim_contiguous, next_power_of_2, tl, triton
from .reference import SINK_SEGMENT

if HAS_TRITON:
    from ..triton_support import finite

    @triton.jit
    def _group_cosine_mean(kb, skn, j, L, offs_d, dmask, S: tl.constexpr, BLOCK_KV: tl.constexpr):
        g = tl.arange(0, BLOCK_KV // S)
        first = j * BLOCK_KV + g * S
        valid = first < L
        last = tl.minimum(first + S - 1, L - 1)
        lmask = valid[:, None] & dmask[None, :]
        a = tl.load(kb + first[:, None] * skn + offs_d[None, :], mask=lmask, other=0.0).to(tl.float32)
        c = tl.load(kb + last[:, None] * skn + offs_d[None, :], mask=lmask, other=0.0).to(tl.float32)
        dot = tl.sum(a * c, 1)
        na = tl.maximum(tl.sqrt(tl.sum(a * a, 1)), 1e-6)
        nc = tl.maximum(tl.sqrt(tl.sum(c * c, 1)), 1e-6)
        cos = tl.where(first == last, 1.0, dot / (na * nc))
        cos = tl.where(valid, cos, 0.0)
        return tl.sum(cos, 0) / tl.sum(valid.to(tl.float32), 0)

    @triton.jit
    def _smoothness_kernel(
        K, OUT, CAPS, skb, skh, skn, sob, soh, sok, scb, sch,
        H, L, TAU2, TAU4, TAU8,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_KV: tl.constexpr,
    ):  # fmt: skip
        j = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HEAD_DIM
        kb = K + b * skb + h * skh
        s2 = _group_cosine_mean(kb, skn, j, L, offs_d, dmask, 2, BLOCK_KV)
        s4 = _group_cosine_mean(kb, skn, j, L, offs_d, dmask, 4, BLOCK_KV)
        s8 = _group_cosine_mean(kb, skn, j, L, offs_d, dmask, 8, BLOCK_KV)
        out = OUT + b * sob + h * soh + j * sok
        tl.store(out + 0, s2)
        tl.store(out + 1, s4)
        tl.store(out + 2, s8)
        cap = tl.where(s8 >= TAU8, 8, tl.where(s4 >= TAU4, 4, tl.where(s2 >= TAU2, 2, 1)))
        tl.store(CAPS + b * scb + h * sch + j, cap)

    @triton.jit
    def _group_scatter(kx, real, S: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr):
        """Sum over the block's real keys of ``|k - mean of its group of S|**2`` (``kx`` zero on padding)."""
        g = tl.reshape(kx, (BLOCK_KV // S, S, BLOCK_D))
        n = tl.sum(tl.reshape(real.to(tl.float32), (BLOCK_KV // S, S)), 1)  # real keys per group
        mean = tl.sum(g, 1) / tl.maximum(n, 1.0)[:, None]
        dev = g - mean[:, None, :]
        sq = tl.sum(dev * dev, 2)  # [G, S]
        return tl.sum(tl.where(tl.reshape(real, (BLOCK_KV // S, S)), sq, 0.0))

    @triton.jit
    def _key_stats_kernel(
        K, QM, SCAT, TOPV, TOPI, skb, skh, skn, sqb, sqh, ssb, ssh, ssk, stb, sth,
        H, L, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_KV: tl.constexpr, SEG: tl.constexpr,
    ):  # fmt: skip
        j = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HEAD_DIM
        t = j * BLOCK_KV + tl.arange(0, BLOCK_KV)
        real = t < L
        kx = tl.load(K + b * skb + h * skh + t[:, None].to(tl.int64) * skn + offs_d[None, :],
                     mask=real[:, None] & dmask[None, :], other=0.0).to(tl.float32)  # fmt: skip
        kx = finite(kx)
        qm = finite(tl.load(QM + b * sqb + h * sqh + offs_d, mask=dmask, other=0.0).to(tl.float32))
        n = tl.sum(real.to(tl.float32), 0)
        out = SCAT + b * ssb + h * ssh + j * ssk
        tl.store(out + 0, _group_scatter(kx, real, 2, BLOCK_KV, BLOCK_D) / n)
        tl.store(out + 1, _group_scatter(kx, real, 4, BLOCK_KV, BLOCK_D) / n)
        tl.store(out + 2, _group_scatter(kx, real, 8, BLOCK_KV, BLOCK_D) / n)
        y = tl.reshape(tl.where(real, tl.sum(kx * qm[None, :], 1), float("-inf")), (BLOCK_KV // SEG, SEG))
        top = tl.max(y, 1)
        arg = tl.argmax(y, 1, tie_break_left=True)
        seg = j * (BLOCK_KV // SEG) + tl.arange(0, BLOCK_KV // SEG)
        tl.store(TOPV + b * stb + h * sth + seg, top)
        tl.store(TOPI + b * stb + h * sth + seg, seg.to(tl.int64) * SEG + arg.to(tl.int64))


def smoothness_and_caps_triton(
    k: torch.Tensor,
    *,
    block_kv: int,
    thresholds: tuple[float, float, float] | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(smoothness [B, H, Nk, 3] float32 for factors 2, 4, 8, caps [B, H, Nk] int32)`` in one launch.

    Without ``thresholds`` every cap is 1. Matches ``reference.block_smoothness`` and
    ``reference.similarity_caps`` (float32 sums in another order: a smoothness within
    rounding of a threshold may cap differently).
    """
    check_supported(k, names=("k",))
    if block_kv not in (16, 32, 64, 128, 256):
        raise ValueError(f"block_kv={block_kv!r} must be a power of two in 16..256")
    k = last_dim_contiguous(k)
    b, h, length, d = k.shape
    nk = cdiv(length, block_kv)
    out = triton_support.new_output((b, h, nk, 3), dtype=torch.float32, device=k.device)
    caps = triton_support.new_output((b, h, nk), dtype=torch.int32, device=k.device)
    cfg = kernel_config("caps", device=k.device, head_dim=d, dtype=k.dtype, override=config)
    taus = tuple(float(t) for t in thresholds) if thresholds is not None else (float("inf"),) * 3
    _smoothness_kernel[(nk, b * h)](
        k, out, caps, k.stride(0), k.stride(1), k.stride(2), out.stride(0), out.stride(1), out.stride(2),
        caps.stride(0), caps.stride(1), h, length, *taus,
        HEAD_DIM=d, BLOCK_D=next_power_of_2(d), BLOCK_KV=block_kv, num_warps=cfg["num_warps"],
    )  # fmt: skip
    return out, caps


def block_smoothness_triton(k: torch.Tensor, *, block_kv: int, config: dict | None = None) -> torch.Tensor:
    """Key smoothness per KV block ``[B, H, Nk, 3]`` float32 (same as ``reference.block_smoothness_reference``)."""
    return smoothness_and_caps_triton(k, block_kv=block_kv, config=config)[0]


def similarity_caps_triton(
    k: torch.Tensor, *, block_kv: int, thresholds: tuple[float, float, float], config: dict | None = None
) -> torch.Tensor:
    """Largest allowed pooling factor per KV block ``[B, H, Nk]`` int32 (as ``reference.similarity_caps_reference``)."""
    return smoothness_and_caps_triton(k, block_kv=block_kv, thresholds=thresholds, config=config)[1]


def key_block_statistics_triton(
    k: torch.Tensor, q_mean: torch.Tensor, *, block_kv: int, config: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scatter [B, H, Nk, 3] float32, top_logit [B, H, Ns] float32, top_index [B, H, Ns] int64)`` in one launch.

    Same as ``reference.key_block_statistics_reference`` up to float32 summation order (a favourite
    key within rounding of another may be the other). k: ``[B, H, Lkv, D]``; q_mean ``[B, H, D]``.
    """
    check_supported(k, names=("k",))
    if block_kv not in (32, 64, 128, 256):
        raise ValueError(f"block_kv={block_kv!r} must be a power of two in 32..256")
    b, h, length, d = k.shape
    if tuple(q_mean.shape) != (b, h, d):
        raise ValueError(f"q_mean must have shape {(b, h, d)}, got {tuple(q_mean.shape)}")
    k = last_dim_contiguous(k)
    qm = q_mean.to(device=k.device, dtype=torch.float32).contiguous()
    nk = cdiv(length, block_kv)
    scatter = triton_support.new_output((b, h, nk, 3), dtype=torch.float32, device=k.device)
    n_seg = nk * block_kv // SINK_SEGMENT
    top_logit = triton_support.new_output((b, h, n_seg), dtype=torch.float32, device=k.device)
    top_index = triton_support.new_output((b, h, n_seg), dtype=torch.int64, device=k.device)
    cfg = kernel_config("caps", device=k.device, head_dim=d, dtype=k.dtype, override=config)
    _key_stats_kernel[(nk, b * h)](
        k, qm, scatter, top_logit, top_index, k.stride(0), k.stride(1), k.stride(2), qm.stride(0), qm.stride(1),
        scatter.stride(0), scatter.stride(1), scatter.stride(2), top_logit.stride(0), top_logit.stride(1),
        h, length, HEAD_DIM=d, BLOCK_D=next_power_of_2(d), BLOCK_KV=block_kv, SEG=SINK_SEGMENT,
        num_warps=cfg["num_warps"],
    )  # fmt: skip
    return scatter, top_logit, top_index
