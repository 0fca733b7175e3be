"""Within-group logit variance for the budget mode, on the GPU (Triton moments + one GEMM).

Same math as :func:`.reference.pooled_logit_variance_reference`:

    V[i, j, s] = scale**2 * tr(S_i C_j^s) / (n_i n_j)

with ``S_i = sum_{r in i} q_r q_r^T`` the second moment of query block ``i`` and
``C_j^s = sum_{t in j} (k_t - kbar_g(t)) (k_t - kbar_g(t))^T`` the within-group scatter
of KV block ``j`` at pooling factor ``s`` (2, 4, 8; ``kbar_g`` the mean of the real
tokens of the key's group). Two kernels write the moments, each as the *packed upper
triangle* (``D (D + 1) / 2`` numbers; off-diagonal entries of ``C`` doubled), so that the
trace is a dot product: ``V = S_packed @ C_packed^T``, a GEMM ``[Nq, P] x [P, 3 Nk]`` per
head (``_trace_kernel``, with the normalisation fused). ``_moment_kernel`` reads a query block and writes
``S_i`` (one ``tl.dot``). ``_scatter_kernel`` reads 128 keys as eight row-strided tiles
(key ``8g + r`` in tile ``r``), so that every group of 2, 4, 8 consists of matching rows,
and builds the scatters by merging groups pairwise (law of total variance: merging
groups of ``na`` and ``nb`` tokens with means ``a``, ``b`` adds
``na nb / (na + nb) (a - b)(a - b)^T``): seven ``tl.dot`` with K = 16 and no
cancellation between large moments. Moments are stored in bfloat16 on the GPU (float32
for float32 inputs under the interpreter); the GEMM accumulates in float32. Cost and error at
real shapes: docs/benchmarks.md.
"""

from __future__ import annotations

import torch

from ...config import POOLED_LEVELS
from ...ops import triton_support
from ...ops.kernel_configs import kernel_config
from ...ops.triton_support import (
    HAS_TRITON,
    cdiv,
    check_supported,
    dot_upcast,
    last_dim_contiguous,
    next_power_of_2,
    tl,
    triton,
)

if HAS_TRITON:

    @triton.jit
    def _store_packed(OUT, m, offs, HEAD_DIM: tl.constexpr, DOUBLE: tl.constexpr):
        """Store the upper triangle of the symmetric ``[BLOCK_D, BLOCK_D]`` tile ``m``, row by row."""
        a = offs[:, None]
        b = offs[None, :]
        keep = (a <= b) & (b < HEAD_DIM)
        if DOUBLE:
            m = tl.where(a < b, 2.0 * m, m)
        packed = a * HEAD_DIM - (a * (a - 1)) // 2 + (b - a)
        tl.store(OUT + packed, m.to(OUT.dtype.element_ty), mask=keep)

    @triton.jit
    def _row_tile(base, rows, skl, L, offs_d, dmask):
        """Rows ``rows`` ``[16]`` of one head as float32 ``[16, BLOCK_D]`` (0 past ``L``), and 1.0/0.0 for real rows."""
        real = rows < L
        x = tl.load(base + rows[:, None].to(tl.int64) * skl + offs_d[None, :], mask=real[:, None] & dmask, other=0.0)
        return x.to(tl.float32), real.to(tl.float32)

    @triton.jit
    def _merge(a, na, b, nb, DOT_DTYPE: tl.constexpr):
        """Merge two token groups (means ``a``, ``b`` ``[16, BLOCK_D]``, real-token counts ``na``, ``nb`` ``[16]``).

        Returns the merged mean and count, and ``d = sqrt(na nb / (na + nb)) (a - b)``, whose
        ``d^T d`` is what the merge adds to the within-group scatter (0 when a side is empty).
        """
        n = na + nb
        inv = 1.0 / tl.maximum(n, 1.0)
        mean = (a * na[:, None] + b * nb[:, None]) * inv[:, None]
        d = (a - b) * tl.sqrt(na * nb * inv)[:, None]
        return mean, n, d.to(DOT_DTYPE)

    @triton.jit
    def _scatter_kernel(
        K, OUT,
        skb, skh, skl, sob, son, sof,
        H, L, NB,
        BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr,
    ):  # fmt: skip
        """128 keys -> the within-group scatters at factors 2, 4, 8 of each of their ``128 / BLOCK`` blocks.

        Key ``8 g + r`` of the chunk is row ``g`` of tile ``x_r`` (r = 0..7, loaded with a row stride
        of 8), so every group of 2, 4, 8 is made of matching rows of these tiles: the scatters build
        up pairwise (law of total variance), ``C2 = sum d^T d`` over the four pair merges,
        ``C4 = C2 +`` the two merges of pairs, ``C8 = C4 +`` the last merge. Each ``d^T d`` is a
        ``tl.dot`` with K = 16 rows, restricted to one block's rows by a mask.
        """
        chunk = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        g = tl.arange(0, 16)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = (offs_d < HEAD_DIM)[None, :]
        base = K + b * skb + h * skh
        start = chunk * 128 + 8 * g
        x0, n0 = _row_tile(base, start + 0, skl, L, offs_d, dmask)
        x1, n1 = _row_tile(base, start + 1, skl, L, offs_d, dmask)
        x2, n2 = _row_tile(base, start + 2, skl, L, offs_d, dmask)
        x3, n3 = _row_tile(base, start + 3, skl, L, offs_d, dmask)
        x4, n4 = _row_tile(base, start + 4, skl, L, offs_d, dmask)
        x5, n5 = _row_tile(base, start + 5, skl, L, offs_d, dmask)
        x6, n6 = _row_tile(base, start + 6, skl, L, offs_d, dmask)
        x7, n7 = _row_tile(base, start + 7, skl, L, offs_d, dmask)
        m01, n01, d01 = _merge(x0, n0, x1, n1, DOT_DTYPE)
        m23, n23, d23 = _merge(x2, n2, x3, n3, DOT_DTYPE)
        m45, n45, d45 = _merge(x4, n4, x5, n5, DOT_DTYPE)
        m67, n67, d67 = _merge(x6, n6, x7, n7, DOT_DTYPE)
        m03, n03, d03 = _merge(m01, n01, m23, n23, DOT_DTYPE)
        m47, n47, d47 = _merge(m45, n45, m67, n67, DOT_DTYPE)
        _m, _n, d07 = _merge(m03, n03, m47, n47, DOT_DTYPE)
        GPB: tl.constexpr = BLOCK // 8  # groups of 8 per block
        for bb in tl.static_range(128 // BLOCK):
            blk = chunk * (128 // BLOCK) + bb
            if blk < NB:
                mine = ((g // GPB) == bb)[:, None]
                zero = tl.zeros_like(d01)
                c = tl.dot(tl.trans(tl.where(mine, d01, zero)), d01)
                c += tl.dot(tl.trans(tl.where(mine, d23, zero)), d23)
                c += tl.dot(tl.trans(tl.where(mine, d45, zero)), d45)
                c += tl.dot(tl.trans(tl.where(mine, d67, zero)), d67)
                out = OUT + pid_bh.to(tl.int64) * sob + blk.to(tl.int64) * son
                _store_packed(out, c, offs_d, HEAD_DIM, True)
                c += tl.dot(tl.trans(tl.where(mine, d03, zero)), d03)
                c += tl.dot(tl.trans(tl.where(mine, d47, zero)), d47)
                _store_packed(out + sof, c, offs_d, HEAD_DIM, True)
                c += tl.dot(tl.trans(tl.where(mine, d07, zero)), d07)
                _store_packed(out + 2 * sof, c, offs_d, HEAD_DIM, True)

    @triton.jit
    def _moment_kernel(
        X, OUT,
        sxb, sxh, sxl, sob, son,
        H, L,
        BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr,
    ):  # fmt: skip
        """One block of ``BLOCK`` tokens -> its second moment ``sum_t x_t x_t^T``."""
        blk = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        rows = blk * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, BLOCK_D)
        x = tl.load(
            X + b * sxb + h * sxh + rows[:, None].to(tl.int64) * sxl + offs_d[None, :],
            mask=(rows < L)[:, None] & (offs_d < HEAD_DIM)[None, :],
            other=0.0,
        ).to(DOT_DTYPE)
        m = tl.dot(tl.trans(x), x)
        _store_packed(OUT + pid_bh.to(tl.int64) * sob + blk.to(tl.int64) * son, m, offs_d, HEAD_DIM, False)

    @triton.jit
    def _trace_kernel(
        S, C, OUT,
        ssb, ssm, scb, scn, sob, som,
        NQ, NC, P, LQ, LKV, norm,
        BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        """``OUT[bh, i, n] = norm * S[bh, i] . C[bh, n] / (n_i n_j)`` (``n = 3 j + level``): the traces, float32."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        bh = tl.program_id(2).to(tl.int64)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        a_ptr = S + bh * ssb + rm[:, None].to(tl.int64) * ssm + rk[None, :]
        b_ptr = C + bh * scb + rn[:, None].to(tl.int64) * scn + rk[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, P, BLOCK_K):
            kmask = (k0 + rk) < P
            a = tl.load(a_ptr + k0, mask=(rm < NQ)[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b_ptr + k0, mask=(rn < NC)[:, None] & kmask[None, :], other=0.0)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc += tl.dot(a, tl.trans(b))
        n_i = tl.maximum(tl.minimum(LQ - rm * BLOCK_Q, BLOCK_Q), 1).to(tl.float32)  # 1 past the end: not stored
        n_j = tl.maximum(tl.minimum(LKV - (rn // 3) * BLOCK_KV, BLOCK_KV), 1).to(tl.float32)
        out = acc * norm / (n_i[:, None] * n_j[None, :])
        tl.store(
            OUT + bh * sob + rm[:, None].to(tl.int64) * som + rn[None, :],
            out,
            mask=(rm < NQ)[:, None] & (rn < NC)[None, :],
        )


def packed_size(head_dim: int) -> int:
    """Numbers in the packed upper triangle of a ``head_dim x head_dim`` matrix, padded to a multiple of 8."""
    return cdiv(head_dim * (head_dim + 1) // 2, 8) * 8


def _dot_dtype(dtype: torch.dtype):
    if dtype == torch.float32 or dot_upcast(dtype):
        return tl.float32  # the interpreter multiplies bf16 bit patterns as integers
    return tl.float16 if dtype == torch.float16 else tl.bfloat16


def block_moments_triton(x: torch.Tensor, *, block: int, centred: bool) -> torch.Tensor:
    """Packed moments of every block of ``x`` ``[B, H, L, D]``.

    ``centred=False``: ``sum_t x_t x_t^T`` per block, ``[B*H, N, 1, P]``; ``centred=True``: the
    within-group scatters at factors 2, 4, 8 (off-diagonal entries doubled), ``[B*H, N, 3, P]``.
    ``P = packed_size(D)``; padding entries are zero. bfloat16 (float32 for float32 inputs).
    """
    check_supported(x, names=("x",))
    if block not in (32, 64, 128):
        raise ValueError(f"block={block!r} must be 32, 64 or 128")
    b, h, length, d = x.shape
    x = last_dim_contiguous(x)
    n = cdiv(length, block)
    p = packed_size(d)
    levels = len(POOLED_LEVELS) if centred else 1
    out_dtype = torch.float32 if x.dtype == torch.float32 else torch.bfloat16
    out = triton_support.new_output((b * h, n, levels, p), dtype=out_dtype, device=x.device)
    if p > d * (d + 1) // 2:
        out[..., d * (d + 1) // 2 :] = 0
    block_d = next_power_of_2(d)
    warps = kernel_config("budget.variance", device=x.device, head_dim=d, dtype=x.dtype)["moment_warps"]
    if centred:
        _scatter_kernel[(cdiv(length, 128), b * h)](
            x, out,
            x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
            h, length, n,
            BLOCK=block, HEAD_DIM=d, BLOCK_D=block_d, DOT_DTYPE=_dot_dtype(x.dtype), num_warps=warps, num_stages=1,
        )  # fmt: skip
    else:
        _moment_kernel[(n, b * h)](
            x, out,
            x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1),
            h, length,
            BLOCK=block, HEAD_DIM=d, BLOCK_D=block_d, DOT_DTYPE=_dot_dtype(x.dtype), num_warps=warps, num_stages=1,
        )  # fmt: skip
    return out


def pooled_logit_variance_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_q: int,
    block_kv: int,
    scale: float | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Within-group logit variance ``[B, H, Nq, Nk, 3]`` float32 for pooling factors 2, 4, 8.

    q: ``[B, H, Lq, D]``, k: ``[B, H, Lkv, D]``. Same result as
    :func:`.reference.pooled_logit_variance_reference` up to the bfloat16 storage of
    the moments (about 2**-9 relative per entry; float32 inputs stay float32).
    ``config`` overrides the ``"budget.variance"`` kernel configuration.
    """
    check_supported(q, k, names=("q", "k"))
    if block_q not in (64, 128):
        raise ValueError(f"block_q={block_q!r} must be 64 or 128")
    b, h, lq, d = q.shape
    lkv = k.shape[2]
    scale = d**-0.5 if scale is None else float(scale)
    nq, nk = cdiv(lq, block_q), cdiv(lkv, block_kv)
    s_packed = block_moments_triton(q, block=block_q, centred=False).view(b * h, nq, -1)
    c_packed = block_moments_triton(k, block=block_kv, centred=True).view(b * h, nk * len(POOLED_LEVELS), -1)
    nc = nk * len(POOLED_LEVELS)
    out = triton_support.new_output((b * h, nq, nc), dtype=torch.float32, device=q.device)
    cfg = kernel_config("budget.variance", device=q.device, head_dim=d, dtype=q.dtype, override=config)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    _trace_kernel[(cdiv(nq, bm), cdiv(nc, bn), b * h)](
        s_packed, c_packed, out,
        s_packed.stride(0), s_packed.stride(1), c_packed.stride(0), c_packed.stride(1), out.stride(0), out.stride(1),
        nq, nc, s_packed.shape[-1], lq, lkv, scale**2,
        BLOCK_Q=block_q, BLOCK_KV=block_kv, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        UPCAST=dot_upcast(s_packed.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return out.view(b, h, nq, nk, len(POOLED_LEVELS))
