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

Log-sum-exp. With ``STORE_LSE`` the program also stores each row's natural log-sum-exp
``ln(2) * (m + log2(l))`` of its (scaled, biased) logits, float32 ``[B, H, Lq]``: the statistic the
backward (:mod:`.backward_kernel`) reads instead of recomputing the softmax.

Loads. Level-1 contiguous tiles can come through host tensor descriptors of K and V
(TMA on Hopper; the ``DESC`` entry of the configuration table, where
:func:`descriptors_apply`); every other tile through pointers.

Causal (``causal=True``, ``Lq == Lkv``). Per level, a binary search over the ascending ids
splits the row tile's blocks into those wholly at or before its first query (the tiles
above, unmasked), those reaching past it (packed, masked tiles: query ``r`` sees a pooled
row only if the row's last token is at most ``r``) and those starting after its last
query (skipped). Every query must see its own block at level 1 (the causal level rule
guarantees it), so each row's softmax has a finite maximum before any masked tile.
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
    INTERPRETED,
    LOG2E,
    cdiv,
    check_supported,
    dot_upcast,
    last_dim_contiguous,
    next_power_of_2,
    tl,
    triton,
)
from .reference import check_causal_lengths

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # no triton, or one without host tensor descriptors
    TensorDescriptor = None

if HAS_TRITON:

    @triton.jit
    def _tile(
        acc, m_i, l_i, q, k, v, rows, valid, LKV, qk_scale, offs_m,
        S: tl.constexpr, LOG2S: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr, CAUSAL: tl.constexpr,
    ):  # fmt: skip
        """One BLOCK_N-row tile ``k``, ``v`` of level S (rows ``rows`` of the level buffer), folded into the
        online softmax. CAUSAL (masked tiles only): query ``offs_m`` sees a row whose last token is not later."""
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k))
        if MASKED:
            # per-column log2(c) (c < S only for the sequence's last group) and -inf off the real rows
            bias = group_log2_count(rows, LKV, S)
            see = valid[None, :]
            if CAUSAL:
                last = tl.minimum((rows + 1) * S, LKV) - 1  # the group's last token
                see = see & (last[None, :] <= offs_m[:, None])
            z = tl.where(see, qk * qk_scale + bias[None, :], float("-inf"))
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
    def group_log2_count(rows, LKV, S: tl.constexpr):
        """``log2(c)`` of pooled rows ``rows`` of level S: ``c`` real tokens (S but for the last group)."""
        return tl.log2(tl.maximum(tl.minimum(LKV - rows * S, S), 1).to(tl.float32))

    @triton.jit
    def load_rows(kbase, vbase, skn, svn, rows, valid, offs_d, dmask, MASKED: tl.constexpr, PAD_D: tl.constexpr):
        """K and V rows ``rows`` ``[BLOCK_N, BLOCK_D]`` by pointers; rows off ``valid`` (MASKED), padded dims: 0."""
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
        return k, v

    @triton.jit
    def _attend_level(
        acc, m_i, l_i, q, kbase, vbase, skn, svn, idx_ptr, n, LS, LKV, NK, qk_scale, offs_d, dmask,
        kdesc, vdesc, b, h,
        S: tl.constexpr, LOG2S: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_N: tl.constexpr,
        PAD_D: tl.constexpr, UPCAST: tl.constexpr, DESC: tl.constexpr, WARP_SPEC: tl.constexpr,
    ):  # fmt: skip
        """The ``n`` blocks ``idx_ptr[0:n]`` (ascending) of level S; each is R = BLOCK_KV/S rows of the level buffer.

        DESC (level 1 only): full contiguous tiles come through the tensor descriptors ``kdesc``/``vdesc`` of
        the ``[B, H, L, D]`` K and V (TMA on Hopper) at ``[b, h, row, 0]``; WARP_SPEC: that loop is warp-specialised.
        """
        R: tl.constexpr = BLOCK_KV // S
        # only the sequence's last block can be partial, and ascending ids put it last in the list
        last = tl.load(idx_ptr + tl.maximum(n - 1, 0), mask=n > 0, other=0)
        has_tail = ((n > 0) & (last == NK - 1) & (LKV % BLOCK_KV != 0)).to(tl.int32)
        if R >= BLOCK_N:
            # contiguous tiles: block j is rows [j*R, (j+1)*R) of the level buffer
            TPB: tl.constexpr = R // BLOCK_N
            for t in tl.range(0, (n - has_tail) * TPB, warp_specialize=WARP_SPEC):
                blk = tl.load(idx_ptr + t // TPB)
                row0 = blk * R + (t % TPB) * BLOCK_N
                rows = row0 + tl.arange(0, BLOCK_N)
                if DESC:
                    k = kdesc.load([b, h, row0, 0]).reshape(BLOCK_N, kdesc.block_shape[3])
                    v = vdesc.load([b, h, row0, 0]).reshape(BLOCK_N, vdesc.block_shape[3])
                else:
                    k, v = load_rows(kbase, vbase, skn, svn, rows, rows < LS, offs_d, dmask, False, PAD_D)
                acc, m_i, l_i = _tile(acc, m_i, l_i, q, k, v, rows, rows < LS, LKV, qk_scale, rows, S, LOG2S, False,
                                      UPCAST, False)  # fmt: skip
            if has_tail != 0:
                tail0 = (NK - 1) * R
                for t in range(0, tl.cdiv(LS - tail0, BLOCK_N)):
                    rows = tail0 + t * BLOCK_N + tl.arange(0, BLOCK_N)
                    k, v = load_rows(kbase, vbase, skn, svn, rows, rows < LS, offs_d, dmask, True, PAD_D)
                    acc, m_i, l_i = _tile(acc, m_i, l_i, q, k, v, rows, rows < LS, LKV, qk_scale, rows, S, LOG2S,
                                          True, UPCAST, False)  # fmt: skip
        else:
            # packed tiles: BLOCK_N / R short blocks side by side, row v of the tile from block idx[v // R]
            n_tiles = tl.cdiv(n * R, BLOCK_N)
            need_mask = (has_tail != 0) | ((n * R) % BLOCK_N != 0)
            n_full = n_tiles - need_mask.to(tl.int32)
            for t in range(0, n_full):
                vrow = t * BLOCK_N + tl.arange(0, BLOCK_N)
                rows = tl.load(idx_ptr + vrow // R) * R + vrow % R
                k, v = load_rows(kbase, vbase, skn, svn, rows, rows < LS, offs_d, dmask, False, PAD_D)
                acc, m_i, l_i = _tile(acc, m_i, l_i, q, k, v, rows, rows < LS, LKV, qk_scale, rows, S, LOG2S, False,
                                      UPCAST, False)  # fmt: skip
            if need_mask:
                vrow = n_full * BLOCK_N + tl.arange(0, BLOCK_N)
                ent = vrow // R
                rows = tl.load(idx_ptr + ent, mask=ent < n, other=0) * R + vrow % R
                valid = (ent < n) & (rows < LS)
                k, v = load_rows(kbase, vbase, skn, svn, rows, valid, offs_d, dmask, True, PAD_D)
                acc, m_i, l_i = _tile(acc, m_i, l_i, q, k, v, rows, valid, LKV, qk_scale, rows, S, LOG2S, True, UPCAST,
                                      False)  # fmt: skip
        return acc, m_i, l_i

    @triton.jit
    def _count_below(idx_ptr, n, thr, BITS: tl.constexpr):
        """How many of the ascending ``idx_ptr[0:n]`` are below ``thr`` (binary search, BITS >= log2(n+1) steps)."""
        lo = n * 0
        hi = n
        for _ in tl.static_range(BITS):
            active = lo < hi
            mid = (lo + hi) // 2
            val = tl.load(idx_ptr + mid, mask=active, other=0)
            below = val < thr
            lo = tl.where(active & below, mid + 1, lo)
            hi = tl.where(active & (val >= thr), mid, hi)
        return lo

    @triton.jit
    def _attend_causal(
        acc, m_i, l_i, q, kbase, vbase, skn, svn, idx_ptr, n, LS, LKV, qk_scale, offs_m, offs_d, dmask,
        S: tl.constexpr, LOG2S: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_N: tl.constexpr,
        PAD_D: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        """The ``n`` blocks ``idx_ptr[0:n]`` of level S that are not wholly before the program's first query:
        packed tiles (as for short pooled blocks), every one masked so no query sees a later token."""
        R: tl.constexpr = BLOCK_KV // S
        for t in range(0, tl.cdiv(n * R, BLOCK_N)):
            vrow = t * BLOCK_N + tl.arange(0, BLOCK_N)
            ent = vrow // R
            rows = tl.load(idx_ptr + ent, mask=ent < n, other=0) * R + vrow % R
            valid = (ent < n) & (rows < LS)
            k, v = load_rows(kbase, vbase, skn, svn, rows, valid, offs_d, dmask, True, PAD_D)
            acc, m_i, l_i = _tile(acc, m_i, l_i, q, k, v, rows, valid, LKV, qk_scale, offs_m, S, LOG2S, True, UPCAST,
                                  True)  # fmt: skip
        return acc, m_i, l_i

    @triton.jit
    def _attend_level_causal(
        acc, m_i, l_i, q, kbase, vbase, skn, svn, idx_ptr, n, LS, LKV, NK, qk_scale, offs_m, offs_d, dmask,
        kdesc, vdesc, b, h, m0, m1,
        S: tl.constexpr, LOG2S: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_N: tl.constexpr,
        PAD_D: tl.constexpr, UPCAST: tl.constexpr, DESC: tl.constexpr, WARP_SPEC: tl.constexpr,
        NK_BITS: tl.constexpr,
    ):  # fmt: skip
        """Level S of a causal row tile (queries ``m0 .. m1``): the blocks wholly at or before ``m0`` unmasked,
        those reaching past it masked, those starting after ``m1`` skipped (ids ascend, so each is a run)."""
        n_past = _count_below(idx_ptr, n, (m0 + 1) // BLOCK_KV, NK_BITS)
        n_seen = _count_below(idx_ptr, n, m1 // BLOCK_KV + 1, NK_BITS)
        acc, m_i, l_i = _attend_level(
            acc, m_i, l_i, q, kbase, vbase, skn, svn, idx_ptr, n_past, LS, LKV, NK, qk_scale, offs_d, dmask,
            kdesc, vdesc, b, h, S, LOG2S, BLOCK_KV, BLOCK_N, PAD_D, UPCAST, DESC, WARP_SPEC,
        )  # fmt: skip
        return _attend_causal(
            acc, m_i, l_i, q, kbase, vbase, skn, svn, idx_ptr + n_past, n_seen - n_past, LS, LKV, qk_scale, offs_m,
            offs_d, dmask, S, LOG2S, BLOCK_KV, BLOCK_N, PAD_D, UPCAST,
        )  # fmt: skip

    @triton.jit
    def _level(
        acc, m_i, l_i, q, kbase, vbase, skn, svn, idx_ptr, n, LS, LKV, NK, qk_scale, offs_m, offs_d, dmask,
        kdesc, vdesc, b, h, m0, m1,
        S: tl.constexpr, LOG2S: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_N: tl.constexpr,
        PAD_D: tl.constexpr, UPCAST: tl.constexpr, DESC: tl.constexpr, WARP_SPEC: tl.constexpr,
        CAUSAL: tl.constexpr, NK_BITS: tl.constexpr,
    ):  # fmt: skip
        """One level of a row tile: :func:`_attend_level`, or with CAUSAL :func:`_attend_level_causal`."""
        if CAUSAL:
            return _attend_level_causal(
                acc, m_i, l_i, q, kbase, vbase, skn, svn, idx_ptr, n, LS, LKV, NK, qk_scale, offs_m, offs_d, dmask,
                kdesc, vdesc, b, h, m0, m1, S, LOG2S, BLOCK_KV, BLOCK_N, PAD_D, UPCAST, DESC, WARP_SPEC, NK_BITS,
            )  # fmt: skip
        return _attend_level(
            acc, m_i, l_i, q, kbase, vbase, skn, svn, idx_ptr, n, LS, LKV, NK, qk_scale, offs_d, dmask,
            kdesc, vdesc, b, h, S, LOG2S, BLOCK_KV, BLOCK_N, PAD_D, UPCAST, DESC, WARP_SPEC,
        )  # fmt: skip

    @triton.jit
    def _psa_fwd_kernel(
        Q, K, V, KP, VP, O, LSE, COUNTS, INDICES, KDESC, VDESC,
        sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
        sp_bh, sp_n,
        sob, soh, som,
        scb, sch, scm, sib, sih, sim,
        H, BH0, LQ, LKV, NK, OFF2, OFF4, OFF8, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, UPCAST: tl.constexpr,
        DESC: tl.constexpr, WARP_SPEC: tl.constexpr, CAUSAL: tl.constexpr, NK_BITS: tl.constexpr,
        STORE_LSE: tl.constexpr,
    ):  # fmt: skip
        """Program (row tile, b*H + h - BH0): BLOCK_M query rows against their pyramid of KV blocks (with CAUSAL,
        row tiles in reverse order: the longest first).

        KP/VP: pooled buffers ``[chunk of B*H, L2+L4+L8, D]`` (row ``b*H + h - BH0``), levels at OFF2/4/8.
        KDESC/VDESC: tensor descriptors of K and V with block ``[1, 1, BLOCK_N, D]`` when DESC, else unused.
        LSE: with STORE_LSE, the rows' natural log-sum-exp, a contiguous float32 ``[B*H, LQ]``; else unused.
        """
        pid_m = tl.program_id(0)
        if CAUSAL:  # the longest rows (the last queries) first: no long row is left for the last wave
            pid_m = tl.num_programs(0) - 1 - pid_m
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
        kpb = KP + local_bh.to(tl.int64) * sp_bh
        vpb = VP + local_bh.to(tl.int64) * sp_bh
        m0 = pid_m * BLOCK_M
        m1 = tl.minimum(m0 + BLOCK_M, LQ) - 1
        bi = b.to(tl.int32)
        hi = h.to(tl.int32)
        acc, m_i, l_i = _level(
            acc, m_i, l_i, q, kb, vb, skn, svn, idx_ptr, n1, LKV, LKV, NK, qk_scale, offs_m, offs_d, dmask,
            KDESC, VDESC, bi, hi, m0, m1, 1, 0.0, BLOCK_KV, BLOCK_N, PAD_D, UPCAST, DESC, WARP_SPEC, CAUSAL, NK_BITS,
        )  # fmt: skip
        acc, m_i, l_i = _level(
            acc, m_i, l_i, q, kpb + OFF2 * sp_n, vpb + OFF2 * sp_n, sp_n, sp_n, idx_ptr + n1, n2, OFF4 - OFF2, LKV,
            NK, qk_scale, offs_m, offs_d, dmask, KDESC, VDESC, bi, hi, m0, m1, 2, 1.0, BLOCK_KV, BLOCK_N, PAD_D,
            UPCAST, False, False, CAUSAL, NK_BITS,
        )  # fmt: skip
        acc, m_i, l_i = _level(
            acc, m_i, l_i, q, kpb + OFF4 * sp_n, vpb + OFF4 * sp_n, sp_n, sp_n, idx_ptr + n1 + n2, n4, OFF8 - OFF4,
            LKV, NK, qk_scale, offs_m, offs_d, dmask, KDESC, VDESC, bi, hi, m0, m1, 4, 2.0, BLOCK_KV, BLOCK_N, PAD_D,
            UPCAST, False, False, CAUSAL, NK_BITS,
        )  # fmt: skip
        acc, m_i, l_i = _level(
            acc, m_i, l_i, q, kpb + OFF8 * sp_n, vpb + OFF8 * sp_n, sp_n, sp_n, idx_ptr + n1 + n2 + n4, n8,
            (LKV + 7) // 8, LKV, NK, qk_scale, offs_m, offs_d, dmask, KDESC, VDESC, bi, hi, m0, m1, 8, 3.0, BLOCK_KV,
            BLOCK_N, PAD_D, UPCAST, False, False, CAUSAL, NK_BITS,
        )  # fmt: skip

        out = acc / l_i[:, None]
        tl.store(
            O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :],
            out.to(O.dtype.element_ty),
            mask=(offs_m < LQ)[:, None] & dmask[None, :],
        )
        if STORE_LSE:  # m and log2(l) are in the exp2 domain: ln(2) takes them to the natural log
            lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
            tl.store(LSE + pid_bh.to(tl.int64) * LQ + offs_m, lse, mask=offs_m < LQ)


def descriptors_apply(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether K and V can be read through tensor descriptors (TMA): a CUDA device of compute capability 9+,
    a power-of-two head dim of at least 16, and 16-byte aligned strides and base addresses."""
    if INTERPRETED or TensorDescriptor is None or k.device.type != "cuda":
        return False
    if torch.cuda.get_device_capability(k.device)[0] < 9:
        return False
    d = k.shape[-1]
    if d < 16 or d & (d - 1) or k.stride(-1) != 1 or v.stride(-1) != 1:
        return False
    for t in (k, v):
        es = t.element_size()
        if t.data_ptr() % 16 or any((st * es) % 16 for st in t.stride()[:-1]):
            return False
    return True


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
    causal: bool = False,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launcher: grid, strides, head-dim padding (masked loads to the next power of two), tile config.

    ``causal``: no query sees a later key (``Lq == Lkv``): the KV blocks of a row tile that reach past its
    first query are masked, those starting after its last query skipped.
    ``lse``: a contiguous float32 ``[B, H, Lq]`` buffer that receives each row's natural log-sum-exp
    (of the computed slices), or None.

    ``kp``/``vp``: pooled buffers ``[nbh, L2+L4+L8, D]`` of the flattened (b, h) slices
    ``bh0 .. bh0+nbh`` (from :func:`..pooling.kernel.pool_kv_triton`); only those slices are computed.
    """
    b, h, lq, d = q.shape
    lkv = k.shape[2]
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension, got strides {tuple(t.stride())}")
    if lse is not None and (lse.shape != (b, h, lq) or lse.dtype != torch.float32 or not lse.is_contiguous()):
        raise ValueError(f"lse must be a contiguous float32 {(b, h, lq)} tensor, got {tuple(lse.shape)} {lse.dtype}")
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
    use_desc = bool(cfg.get("DESC", False)) and descriptors_apply(k, v)
    kdesc, vdesc = k, v  # placeholders the kernel never reads when DESC is off
    if use_desc:
        block = [1, 1, cfg["BLOCK_N"], d]
        kdesc = TensorDescriptor(k, list(k.shape), list(k.stride()), block)
        vdesc = TensorDescriptor(v, list(v.shape), list(v.stride()), block)
    _psa_fwd_kernel[grid](
        q, k, v, kp, vp, out, out if lse is None else lse, counts, indices, kdesc, vdesc,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        kp.stride(0), kp.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        counts.stride(0), counts.stride(1), counts.stride(2),
        indices.stride(0), indices.stride(1), indices.stride(2),
        h, bh0, lq, lkv, cdiv(lkv, mask.block_kv), offs[2], offs[4], offs[8], scale * LOG2E,
        HEAD_DIM=d, BLOCK_D=next_power_of_2(d), BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"],
        BLOCK_Q=mask.block_q, BLOCK_KV=mask.block_kv, UPCAST=dot_upcast(q.dtype),
        DESC=use_desc, WARP_SPEC=bool(cfg.get("WARP_SPEC", False)), CAUSAL=causal,
        NK_BITS=max(1, (cdiv(lkv, mask.block_kv) + 1).bit_length()) if causal else 1, STORE_LSE=lse is not None,
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
    causal: bool = False,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
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
    (``BLOCK_M``, ``BLOCK_N``, ``num_warps``, ``num_stages``, ``DESC``, ``WARP_SPEC``).
    causal: no query sees a later key; needs ``Lq == Lkv`` and the diagonal blocks at level 1
    (``ops.levels.causal``); docs/design.md, section 8.
    return_lse: return ``(out, lse)``, ``lse`` ``[B, H, Lq]`` float32 the rows' natural log-sum-exp
    (as the reference's ``return_lse``; what the backward reads).
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
    check_causal_lengths(causal, lq, lkv)
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
    lse = triton_support.new_output((b, h, lq), dtype=torch.float32, device=q.device) if return_lse else None
    if pooled is not None:
        kp, vp = pooled
        want = (total, level_offsets(lkv)["total"], d)
        if tuple(kp.shape) != want or tuple(vp.shape) != want or kp.device != q.device:
            raise ValueError(f"pooled buffers must be two {want} tensors on {q.device} (pool_kv_triton(k, v))")
        launch_attention(q, k, v, kp, vp, mask, scale, out, config, causal=causal, lse=lse)
        return (out, lse) if return_lse else out
    chunk = total if pool_chunk is None else int(pool_chunk)
    if chunk < 1:
        raise ValueError(f"pool_chunk={pool_chunk!r} must be a positive integer")
    for bh0 in range(0, total, chunk):
        n = min(chunk, total - bh0)
        kp, vp = pool_kv_triton(k, v, bh0, n)
        launch_attention(q, k, v, kp, vp, mask, scale, out, config, bh0, n, causal=causal, lse=lse)
        del kp, vp
    return (out, lse) if return_lse else out
