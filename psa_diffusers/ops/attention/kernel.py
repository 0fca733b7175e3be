"""Sparse pyramid attention forward (Triton).

One program owns ``BLOCK_M`` query rows of one (batch, head) -- all inside one
query block of the mask -- and walks that block's KV blocks level by level
(1, 2, 4, 8) straight from the compact mask (``kv_counts`` gives each level's
share of the ``kv_indices`` row; no sentinels). One online softmax in float32
(``exp2``, scale folded into ``log2(e) * scale``) runs across all levels.

Tiles. At level ``s`` a KV block is ``R = block_kv / s`` consecutive rows of the
level-``s`` buffer (level 1: K/V themselves; others: the pooled buffer of
:mod:`.pooling`). The blocks of one level are laid end to end as "virtual
rows"; tile ``t`` takes virtual rows ``[t*BLOCK_N, (t+1)*BLOCK_N)``, row ``v``
being row ``v % R`` of block ``kv_indices[v // R]``. When ``R < BLOCK_N`` that
packs ``BLOCK_N / R`` short pooled blocks into one tensor-core tile; when
``R > BLOCK_N`` a block spans several tiles.

Bias. A pooled token of ``c`` real tokens gets ``+ln(c)`` on its logit. Inside a
level every token has ``c = s`` except the sequence's last group, so full tiles
fold ``log2(s)`` into the row maximum (no per-element cost); only the last
tile(s) of a level -- where the partial tail block and the packing padding can
sit, because indices ascend within a level -- use per-column masks and biases.
"""

from __future__ import annotations

import math

import torch

from ...mask import PyramidBlockMask
from .. import triton_support
from ..kernel_configs import kernel_config
from ..pooling.kernel import level_offsets, pool_kv_triton
from ..triton_support import (
    HAS_TRITON,
    LOG2E,
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
    def _tile(
        acc, m_i, l_i, q, kbase, vbase, skn, svn, rows, valid, LKV, qk_scale, offs_d, dmask,
        S: tl.constexpr, LOG2S: tl.constexpr, PAD_D: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        """One BLOCK_N-row tile of level S (rows of the level buffer), folded into the online softmax."""
        if MASKED:
            lmask = valid[:, None]
            if PAD_D:
                lmask = lmask & dmask[None, :]
            k = tl.load(kbase + rows[:, None] * skn + offs_d[None, :], mask=lmask, other=0.0)
            v = tl.load(vbase + rows[:, None] * svn + offs_d[None, :], mask=lmask, other=0.0)
        elif PAD_D:
            k = tl.load(kbase + rows[:, None] * skn + offs_d[None, :], mask=dmask[None, :], other=0.0)
            v = tl.load(vbase + rows[:, None] * svn + offs_d[None, :], mask=dmask[None, :], other=0.0)
        else:
            k = tl.load(kbase + rows[:, None] * skn + offs_d[None, :])
            v = tl.load(vbase + rows[:, None] * svn + offs_d[None, :])
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k))
        if MASKED:
            # per-column log2(c) (c < S only for the sequence's last group) and -inf off the real rows
            cnt = tl.minimum(LKV - rows * S, S)
            bias = tl.log2(tl.maximum(cnt, 1).to(tl.float32))
            z = tl.where(valid[None, :], qk * qk_scale + bias[None, :], float("-inf"))
            m_new = tl.maximum(m_i, tl.max(z, 1))
            p = tl.math.exp2(z - m_new[:, None])
        else:
            # every column of a full tile stands for exactly S tokens: log2(S) folds into the row max
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale + LOG2S)
            p = tl.math.exp2(qk * qk_scale - (m_new - LOG2S)[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return acc, m_new, l_i

    @triton.jit
    def _attend_level(
        acc, m_i, l_i, q, kbase, vbase, skn, svn, idx_ptr, n, LS, LKV, NK, qk_scale, offs_d, dmask,
        S: tl.constexpr, LOG2S: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_N: tl.constexpr,
        PAD_D: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        """The ``n`` blocks ``idx_ptr[0:n]`` (ascending) of level S; each is R = BLOCK_KV/S rows of the level buffer."""
        R: tl.constexpr = BLOCK_KV // S
        # only the sequence's last block can be partial, and ascending ids put it last in the list
        last = tl.load(idx_ptr + tl.maximum(n - 1, 0), mask=n > 0, other=0)
        has_tail = ((n > 0) & (last == NK - 1) & (LKV % BLOCK_KV != 0)).to(tl.int32)
        if R >= BLOCK_N:
            # contiguous tiles: block j is rows [j*R, (j+1)*R) of the level buffer
            TPB: tl.constexpr = R // BLOCK_N
            for t in range(0, (n - has_tail) * TPB):
                blk = tl.load(idx_ptr + t // TPB)
                rows = blk * R + (t % TPB) * BLOCK_N + tl.arange(0, BLOCK_N)
                acc, m_i, l_i = _tile(acc, m_i, l_i, q, kbase, vbase, skn, svn, rows, rows < LS, LKV, qk_scale,
                                      offs_d, dmask, S, LOG2S, PAD_D, False, UPCAST)  # fmt: skip
            if has_tail != 0:
                tail0 = (NK - 1) * R
                for t in range(0, tl.cdiv(LS - tail0, BLOCK_N)):
                    rows = tail0 + t * BLOCK_N + tl.arange(0, BLOCK_N)
                    acc, m_i, l_i = _tile(acc, m_i, l_i, q, kbase, vbase, skn, svn, rows, rows < LS, LKV, qk_scale,
                                          offs_d, dmask, S, LOG2S, PAD_D, True, UPCAST)  # fmt: skip
        else:
            # packed tiles: BLOCK_N / R short blocks side by side, row v of the tile from block idx[v // R]
            n_tiles = tl.cdiv(n * R, BLOCK_N)
            need_mask = (has_tail != 0) | ((n * R) % BLOCK_N != 0)
            n_full = n_tiles - need_mask.to(tl.int32)
            for t in range(0, n_full):
                vrow = t * BLOCK_N + tl.arange(0, BLOCK_N)
                rows = tl.load(idx_ptr + vrow // R) * R + vrow % R
                acc, m_i, l_i = _tile(acc, m_i, l_i, q, kbase, vbase, skn, svn, rows, rows < LS, LKV, qk_scale,
                                      offs_d, dmask, S, LOG2S, PAD_D, False, UPCAST)  # fmt: skip
            if need_mask:
                vrow = n_full * BLOCK_N + tl.arange(0, BLOCK_N)
                ent = vrow // R
                rows = tl.load(idx_ptr + ent, mask=ent < n, other=0) * R + vrow % R
                valid = (ent < n) & (rows < LS)
                acc, m_i, l_i = _tile(acc, m_i, l_i, q, kbase, vbase, skn, svn, rows, valid, LKV, qk_scale,
                                      offs_d, dmask, S, LOG2S, PAD_D, True, UPCAST)  # fmt: skip
        return acc, m_i, l_i

    @triton.jit
    def _psa_fwd_kernel(
        Q, K, V, KP, VP, O, COUNTS, INDICES,
        sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
        sp_bh, sp_n,
        sob, soh, som,
        scb, sch, scm, sib, sih, sim,
        H, BH0, LQ, LKV, NK, OFF2, OFF4, OFF8, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        """Program (row tile, b*H + h - BH0): BLOCK_M query rows against their pyramid of KV blocks.

        KP/VP: pooled buffers ``[chunk of B*H, L2+L4+L8, D]`` (row ``b*H + h - BH0``), levels at OFF2/4/8.
        """
        pid_m = tl.program_id(0)
        local_bh = tl.program_id(1)
        pid_bh = BH0 + local_bh
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        qblk = (pid_m * BLOCK_M) // BLOCK_Q
        PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HEAD_DIM
        q = tl.load(
            Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
            mask=(offs_m < LQ)[:, None] & dmask[None, :],
            other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)

        cnt_ptr = COUNTS + b * scb + h * sch + qblk * scm
        idx_ptr = INDICES + b * sib + h * sih + qblk * sim
        n1 = tl.load(cnt_ptr + 0)
        n2 = tl.load(cnt_ptr + 1)
        n4 = tl.load(cnt_ptr + 2)
        n8 = tl.load(cnt_ptr + 3)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        kb = K + b * skb + h * skh
        vb = V + b * svb + h * svh
        acc, m_i, l_i = _attend_level(
            acc, m_i, l_i, q, kb, vb, skn, svn, idx_ptr, n1, LKV, LKV, NK, qk_scale, offs_d, dmask,
            1, 0.0, BLOCK_KV, BLOCK_N, PAD_D, UPCAST,
        )  # fmt: skip
        kpb = KP + local_bh.to(tl.int64) * sp_bh
        vpb = VP + local_bh.to(tl.int64) * sp_bh
        acc, m_i, l_i = _attend_level(
            acc, m_i, l_i, q, kpb + OFF2 * sp_n, vpb + OFF2 * sp_n, sp_n, sp_n, idx_ptr + n1, n2,
            OFF4 - OFF2, LKV, NK, qk_scale, offs_d, dmask, 2, 1.0, BLOCK_KV, BLOCK_N, PAD_D, UPCAST,
        )  # fmt: skip
        acc, m_i, l_i = _attend_level(
            acc, m_i, l_i, q, kpb + OFF4 * sp_n, vpb + OFF4 * sp_n, sp_n, sp_n, idx_ptr + n1 + n2, n4,
            OFF8 - OFF4, LKV, NK, qk_scale, offs_d, dmask, 4, 2.0, BLOCK_KV, BLOCK_N, PAD_D, UPCAST,
        )  # fmt: skip
        acc, m_i, l_i = _attend_level(
            acc, m_i, l_i, q, kpb + OFF8 * sp_n, vpb + OFF8 * sp_n, sp_n, sp_n, idx_ptr + n1 + n2 + n4, n8,
            (LKV + 7) // 8, LKV, NK, qk_scale, offs_d, dmask, 8, 3.0, BLOCK_KV, BLOCK_N, PAD_D, UPCAST,
        )  # fmt: skip

        out = acc / l_i[:, None]
        tl.store(
            O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :],
            out.to(O.dtype.element_ty),
            mask=(offs_m < LQ)[:, None] & dmask[None, :],
        )


def launch_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kp: torch.Tensor,
    vp: torch.Tensor,
    mask: PyramidBlockMask,
    scale: float,
    out: torch.Tensor,
    config: dict[str, int] | None = None,
    bh0: int = 0,
    nbh: int | None = None,
) -> torch.Tensor:
    """Launcher: grid, strides, head-dim padding (masked loads to the next power of two), tile config.

    ``kp``/``vp``: pooled buffers ``[nbh, L2+L4+L8, D]`` of the flattened (b, h) slices
    ``bh0 .. bh0+nbh`` (from :func:`..pooling.kernel.pool_kv_triton`); only those slices are computed.
    """
    b, h, lq, d = q.shape
    lkv = k.shape[2]
    nbh = b * h - bh0 if nbh is None else nbh
    counts = mask.kv_counts
    indices = mask.kv_indices
    if counts.dtype != torch.int32:
        counts = counts.to(torch.int32)
    if indices.dtype != torch.int32:
        indices = indices.to(torch.int32)
    counts = last_dim_contiguous(counts)
    indices = last_dim_contiguous(indices)
    cfg = kernel_config("attention", device=q.device, head_dim=d, dtype=q.dtype, override=config)
    block_m = min(cfg["BLOCK_M"], mask.block_q)
    if mask.block_q % block_m:
        raise ValueError(f"BLOCK_M={block_m} must divide block_q={mask.block_q}")
    assert kp.shape == vp.shape and kp.shape[0] == nbh and kp.stride(2) == 1 and kp.stride() == vp.stride()
    offs = level_offsets(lkv)
    grid = (cdiv(lq, block_m), nbh)
    _psa_fwd_kernel[grid](
        q, k, v, kp, vp, out, counts, indices,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        kp.stride(0), kp.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        counts.stride(0), counts.stride(1), counts.stride(2),
        indices.stride(0), indices.stride(1), indices.stride(2),
        h, bh0, lq, lkv, cdiv(lkv, mask.block_kv), offs[2], offs[4], offs[8], scale * LOG2E,
        HEAD_DIM=d, BLOCK_D=next_power_of_2(d), BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"],
        BLOCK_Q=mask.block_q, BLOCK_KV=mask.block_kv, UPCAST=dot_upcast(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return out


def psa_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: PyramidBlockMask,
    scale: float | None = None,
    *,
    out: torch.Tensor | None = None,
    pool_chunk: int | None = None,
    pooled: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Pyramid sparse attention forward: same result as :func:`.reference.psa_attention_reference`.

    q: ``[B, H, Lq, D]``; k, v: ``[B, H, Lkv, D]`` (any strides with a contiguous
    last dimension, e.g. a transposed ``[B, L, H, D]`` tensor); ``mask`` of shape
    ``[B, H, ceil(Lq/block_q), ceil(Lkv/block_kv)]`` on q's device. Pools K and V
    (every level, one launch), then runs the sparse kernel. Returns
    ``[B, H, Lq, D]`` in q's dtype, or writes into ``out`` (same shape and dtype)
    and returns it. Every query row must see at least one block (guaranteed by
    ``PyramidBlockMask.from_level_map`` and the mask builder); a row that sees
    none comes out as NaN.

    pool_chunk: pool and attend this many (batch, head) slices at a time (default:
    all at once, fastest). The pooled K/V buffers take ``1.75 * k.nbytes * chunk / (B*H)``
    bytes, so a small chunk keeps the call's peak memory near dense attention's.
    pooled: the pooled K/V buffers of all (batch, head) slices from :func:`pool_kv_triton`, made
    once for several calls on the same k, v (``pool_chunk`` is then ignored).
    config: overrides the ``"attention"`` entry of the kernel configuration table
    (``BLOCK_M``, ``BLOCK_N``, ``num_warps``, ``num_stages``).
    Raises ValueError where :func:`triton_unsupported_reason` gives a reason.
    """
    check_supported(q, k, v, names=("q", "k", "v"))
    b, h, lq, d = q.shape
    lkv = k.shape[2]
    mask.check_fits(lq, lkv)
    if mask.shape[:2] != (b, h):
        raise ValueError(f"mask batch/heads {mask.shape[:2]} do not match q {tuple(q.shape)}")
    if mask.device != q.device:
        raise ValueError(f"mask is on {mask.device} but q is on {q.device}")
    scale = d**-0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale={scale!r} must be finite")
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    if out is None:
        out = triton_support.new_output((b, h, lq, d), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(
            f"out must be a {tuple(q.shape)} {q.dtype} tensor on {q.device} with a contiguous last dim, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    total = b * h
    if pooled is not None:
        kp, vp = pooled
        want = (total, level_offsets(lkv)["total"], d)
        if tuple(kp.shape) != want or tuple(vp.shape) != want or kp.device != q.device:
            raise ValueError(f"pooled buffers must be two {want} tensors on {q.device} (pool_kv_triton(k, v))")
        return launch_attention(q, k, v, kp, vp, mask, scale, out, config)
    chunk = total if pool_chunk is None else int(pool_chunk)
    if chunk < 1:
        raise ValueError(f"pool_chunk={pool_chunk!r} must be a positive integer")
    for bh0 in range(0, total, chunk):
        n = min(chunk, total - bh0)
        kp, vp = pool_kv_triton(k, v, bh0, n)
        launch_attention(q, k, v, kp, vp, mask, scale, out, config, bh0, n)
        del kp, vp
    return out
