"""Sparse pyramid attention backward (Triton): dQ, dK, dV over every level, FlashAttention-2 style.

K and V are pooled as for the forward (:func:`..pooling.kernel.pool_kv_triton`); then two kernels:

* Row kernel: one program per ``ROW_M`` query rows of one (batch, head), walking the row's
  KV blocks level by level from the compact mask, as the forward does, twice. The first walk
  recomputes the softmax statistics (the forward does not save them): the log2-sum-exp ``lse``
  and ``delta = rowsum(dO * O) = sum_t P_t (dO . vbar_t)``. The second walk accumulates
  ``dQ = scale * sum_t dS_t kbar_t`` with ``dS = P * (dO vbar_t - delta)``. ``lse`` and ``delta``
  are stored for the column kernel.
* Column kernel, launched once per level in the order 8, 4, 2, 1: one program per ``COL_N`` rows
  of one KV block at level ``s`` (rows of the level-``s`` buffer), walking the query blocks that
  see that block at level ``s`` (the transposed mask, :func:`transposed_mask`) and accumulating
  ``dVbar = P^T dO`` and ``dKbar = scale * dS^T Q``. Levels 2, 4 and 8 store the pooled gradients
  in float32. Level 1 then adds to each token ``1/c`` of the pooled gradient of each group it
  belongs to (``c`` real tokens in the group) and writes dK and dV.

A pooled token of ``c`` real tokens has the logit bias ``ln(c)`` (``log2(c)`` here, in the exp2
domain) in both kernels, as in the forward; the mask is a constant.
"""

from __future__ import annotations

import math

import torch

from ...mask import PyramidBlockMask
from .. import triton_support
from ..kernel_configs import kernel_config
from ..pooling.kernel import level_offsets, pool_kv_triton
from ..triton_support import HAS_TRITON, LOG2E, cdiv, check_supported, dot_upcast, next_power_of_2, tl, triton

if HAS_TRITON:
    from .kernel import group_log2_count, load_rows  # the forward's tile loads and pooled-count bias

    @triton.jit
    def _row_tile(
        m_i, l_i, acc_d, dq, q, do, lse, delta, kbase, vbase, skn, svn, rows, valid, LKV, qk_scale, offs_d, dmask,
        S: tl.constexpr, LOG2S: tl.constexpr, PAD_D: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr,
        PASS: tl.constexpr,
    ):  # fmt: skip
        """One tile of level-S rows: PASS 0 folds it into (m, l, delta sum); PASS 1 adds its dS @ K to dq."""
        k, v = load_rows(kbase, vbase, skn, svn, rows, valid, offs_d, dmask, MASKED, PAD_D)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k))
        if MASKED:
            bias = group_log2_count(rows, LKV, S)
            z = tl.where(valid[None, :], qk * qk_scale + bias[None, :], float("-inf"))
        else:
            z = qk * qk_scale + LOG2S
        dov = tl.dot(do, tl.trans(v))
        if PASS == 0:
            m_new = tl.maximum(m_i, tl.max(z, 1))
            p = tl.math.exp2(z - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc_d = acc_d * alpha + tl.sum(p * dov, 1)
            m_i = m_new
        else:
            p = tl.math.exp2(z - lse[:, None])
            ds = p * (dov - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)
        return m_i, l_i, acc_d, dq

    @triton.jit
    def _row_level(
        m_i, l_i, acc_d, dq, q, do, lse, delta, kbase, vbase, skn, svn, idx_ptr, n, LS, LKV, qk_scale, offs_d, dmask,
        S: tl.constexpr, LOG2S: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_N: tl.constexpr, PAD_D: tl.constexpr,
        UPCAST: tl.constexpr, PASS: tl.constexpr,
    ):  # fmt: skip
        """The ``n`` blocks ``idx_ptr[0:n]`` of level S, each ``R = BLOCK_KV / S`` rows of the level buffer."""
        R: tl.constexpr = BLOCK_KV // S
        EVEN: tl.constexpr = R % BLOCK_N == 0
        TPB: tl.constexpr = (R + BLOCK_N - 1) // BLOCK_N
        for e in range(0, n):
            start = tl.load(idx_ptr + e) * R
            n_rows = tl.minimum(LS - start, R)
            if EVEN:
                full = n_rows == R
            else:
                full = n_rows < 0  # blocks shorter than a tile always take the masked path
            if full:  # a full block: every column stands for exactly S tokens
                for t in tl.static_range(TPB):
                    rows = start + t * BLOCK_N + tl.arange(0, BLOCK_N)
                    m_i, l_i, acc_d, dq = _row_tile(
                        m_i, l_i, acc_d, dq, q, do, lse, delta, kbase, vbase, skn, svn, rows, rows < LS, LKV,
                        qk_scale, offs_d, dmask, S, LOG2S, PAD_D, False, UPCAST, PASS,
                    )  # fmt: skip
            else:  # the sequence's partial last block, or blocks shorter than a tile
                for t in range(0, tl.cdiv(n_rows, BLOCK_N)):
                    local = t * BLOCK_N + tl.arange(0, BLOCK_N)
                    rows = start + local
                    m_i, l_i, acc_d, dq = _row_tile(
                        m_i, l_i, acc_d, dq, q, do, lse, delta, kbase, vbase, skn, svn, rows, local < n_rows, LKV,
                        qk_scale, offs_d, dmask, S, LOG2S, PAD_D, True, UPCAST, PASS,
                    )  # fmt: skip
        return m_i, l_i, acc_d, dq

    @triton.jit
    def _row_pass(
        m_i, l_i, acc_d, dq, q, do, lse, delta, kb, vb, skn, svn, kpb, vpb, sp_n, cnt_ptr, idx_ptr,
        LKV, OFF2, OFF4, OFF8, qk_scale, offs_d, dmask,
        BLOCK_KV: tl.constexpr, BN1: tl.constexpr, BN2: tl.constexpr, BN4: tl.constexpr, BN8: tl.constexpr,
        PAD_D: tl.constexpr, UPCAST: tl.constexpr, PASS: tl.constexpr,
    ):  # fmt: skip
        """One walk over the four levels of a query row block."""
        n1 = tl.load(cnt_ptr + 0)
        n2 = tl.load(cnt_ptr + 1)
        n4 = tl.load(cnt_ptr + 2)
        n8 = tl.load(cnt_ptr + 3)
        m_i, l_i, acc_d, dq = _row_level(
            m_i, l_i, acc_d, dq, q, do, lse, delta, kb, vb, skn, svn, idx_ptr, n1, LKV, LKV, qk_scale, offs_d,
            dmask, 1, 0.0, BLOCK_KV, BN1, PAD_D, UPCAST, PASS,
        )  # fmt: skip
        m_i, l_i, acc_d, dq = _row_level(
            m_i, l_i, acc_d, dq, q, do, lse, delta, kpb + OFF2 * sp_n, vpb + OFF2 * sp_n, sp_n, sp_n, idx_ptr + n1,
            n2, OFF4 - OFF2, LKV, qk_scale, offs_d, dmask, 2, 1.0, BLOCK_KV, BN2, PAD_D, UPCAST, PASS,
        )  # fmt: skip
        m_i, l_i, acc_d, dq = _row_level(
            m_i, l_i, acc_d, dq, q, do, lse, delta, kpb + OFF4 * sp_n, vpb + OFF4 * sp_n, sp_n, sp_n,
            idx_ptr + n1 + n2, n4, OFF8 - OFF4, LKV, qk_scale, offs_d, dmask, 4, 2.0, BLOCK_KV, BN4, PAD_D, UPCAST,
            PASS,
        )  # fmt: skip
        m_i, l_i, acc_d, dq = _row_level(
            m_i, l_i, acc_d, dq, q, do, lse, delta, kpb + OFF8 * sp_n, vpb + OFF8 * sp_n, sp_n, sp_n,
            idx_ptr + n1 + n2 + n4, n8, (LKV + 7) // 8, LKV, qk_scale, offs_d, dmask, 8, 3.0, BLOCK_KV, BN8, PAD_D,
            UPCAST, PASS,
        )  # fmt: skip
        return m_i, l_i, acc_d, dq

    @triton.jit
    def _psa_bwd_row_kernel(
        Q, K, V, KP, VP, DO, DQ, LSE, DELTA, COUNTS, INDICES,
        sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sp_bh, sp_n,
        sdob, sdoh, sdom, sdqb, sdqh, sdqm, scb, sch, scm, sib, sih, sim,
        H, LQ, LKV, OFF2, OFF4, OFF8, qk_scale, scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
        BLOCK_KV: tl.constexpr, BN1: tl.constexpr, BN2: tl.constexpr, BN4: tl.constexpr, BN8: tl.constexpr,
        UPCAST: tl.constexpr,
    ):  # fmt: skip
        """Program (row tile, b*H + h): lse and delta of BLOCK_M query rows (stored), then their dQ."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        qblk = (pid_m * BLOCK_M) // BLOCK_Q
        PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HEAD_DIM
        rmask = (offs_m < LQ)[:, None] & dmask[None, :]
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=rmask, other=0.0)
        do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :], mask=rmask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        cnt_ptr = COUNTS + b * scb + h * sch + qblk * scm
        idx_ptr = INDICES + b * sib + h * sih + qblk * sim
        kb = K + b * skb + h * skh
        vb = V + b * svb + h * svh
        kpb = KP + pid_bh.to(tl.int64) * sp_bh
        vpb = VP + pid_bh.to(tl.int64) * sp_bh

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc_d = tl.zeros([BLOCK_M], dtype=tl.float32)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        m_i, l_i, acc_d, dq = _row_pass(
            m_i, l_i, acc_d, dq, q, do, m_i, l_i, kb, vb, skn, svn, kpb, vpb, sp_n, cnt_ptr, idx_ptr,
            LKV, OFF2, OFF4, OFF8, qk_scale, offs_d, dmask, BLOCK_KV, BN1, BN2, BN4, BN8, PAD_D, UPCAST, 0,
        )  # fmt: skip
        lse = m_i + tl.log2(l_i)
        delta = acc_d / l_i
        stat = pid_bh.to(tl.int64) * LQ + offs_m
        tl.store(LSE + stat, lse, mask=offs_m < LQ)
        tl.store(DELTA + stat, delta, mask=offs_m < LQ)
        m_i, l_i, acc_d, dq = _row_pass(
            m_i, l_i, acc_d, dq, q, do, lse, delta, kb, vb, skn, svn, kpb, vpb, sp_n, cnt_ptr, idx_ptr,
            LKV, OFF2, OFF4, OFF8, qk_scale, offs_d, dmask, BLOCK_KV, BN1, BN2, BN4, BN8, PAD_D, UPCAST, 1,
        )  # fmt: skip
        tl.store(
            DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :],
            (dq * scale).to(DQ.dtype.element_ty),
            mask=rmask,
        )

    @triton.jit
    def _add_pooled(acc, G, sg_n, OFF, rows, valid, LKV, offs_d, lmask, S: tl.constexpr):
        """``acc`` plus, for each token row, 1/c of the pooled gradient of its level-S group (c real tokens)."""
        grp = rows // S
        cnt = tl.maximum(tl.minimum(LKV - grp * S, S), 1).to(tl.float32)
        g = tl.load(G + (OFF + grp)[:, None] * sg_n + offs_d[None, :], mask=lmask, other=0.0)
        return acc + g / cnt[:, None]

    @triton.jit
    def _psa_bwd_col_kernel(
        Q, DO, LSE, DELTA, KS, VS, CNT_T, IDX_T, DK, DV, GK, GV,
        sqb, sqh, sqm, sdob, sdoh, sdom, sksb, sksh, sksn, svsb, svsh, svsn,
        sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, sg_bh, sg_n,
        sctb, scth, sctj, sitb, sith, sitj,
        H, LQ, LKV, LS, OFF2, OFF4, OFF8, qk_scale, scale,
        S: tl.constexpr, LEVEL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        """Program (tile of a KV block, b*H + h): dK, dV of BLOCK_N level-S rows over the query blocks seeing them.

        KS/VS: the level-S buffer (K, V for S == 1), rows of ``[B, H, LS, D]`` strides. S > 1 writes the pooled
        gradients into DK/DV (float32 rows of the pooled buffers); S == 1 adds GK/GV (the pooled gradients of
        levels 2, 4, 8, ``[B*H, L2+L4+L8, D]``) and writes the token gradients.
        """
        R: tl.constexpr = BLOCK_KV // S
        TPB: tl.constexpr = (R + BLOCK_N - 1) // BLOCK_N
        pid_t = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        j = pid_t // TPB
        local = (pid_t % TPB) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = j * R + local
        valid = (local < R) & (rows < LS)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HEAD_DIM
        lmask = valid[:, None] & dmask[None, :]
        k, v = load_rows(KS + b * sksb + h * sksh, VS + b * svsb + h * svsh, sksn, svsn, rows, valid, offs_d, dmask,
                         True, BLOCK_D != HEAD_DIM)  # fmt: skip
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if S > 1:  # log2(c) per column: c = S except for the sequence's last group
            bias = group_log2_count(rows, LKV, S)
        else:
            bias = tl.zeros([BLOCK_N], dtype=tl.float32)

        cnt_ptr = CNT_T + b * sctb + h * scth + j * sctj
        first = 0
        for lv in tl.static_range(LEVEL):
            first += tl.load(cnt_ptr + lv)
        n = tl.load(cnt_ptr + LEVEL)
        idx_ptr = IDX_T + b * sitb + h * sith + j * sitj + first

        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        qb = Q + b * sqb + h * sqh
        dob = DO + b * sdob + h * sdoh
        stat = pid_bh.to(tl.int64) * LQ
        for e in range(0, n):
            i = tl.load(idx_ptr + e)
            for mm in tl.static_range(BLOCK_Q // BLOCK_M):
                offs_m = i * BLOCK_Q + mm * BLOCK_M + tl.arange(0, BLOCK_M)
                mvalid = offs_m < LQ
                qmask = mvalid[:, None] & dmask[None, :]
                q = tl.load(qb + offs_m[:, None] * sqm + offs_d[None, :], mask=qmask, other=0.0)
                do = tl.load(dob + offs_m[:, None] * sdom + offs_d[None, :], mask=qmask, other=0.0)
                if UPCAST:
                    q = q.to(tl.float32)
                    do = do.to(tl.float32)
                lse = tl.load(LSE + stat + offs_m, mask=mvalid, other=float("inf"))  # rows past LQ: P = 0
                delta = tl.load(DELTA + stat + offs_m, mask=mvalid, other=0.0)
                pt = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale + bias[:, None] - lse[None, :])  # [N, M]
                dv += tl.dot(pt.to(do.dtype), do)
                dpt = tl.dot(v, tl.trans(do))
                dst = pt * (dpt - delta[None, :])
                dk += tl.dot(dst.to(q.dtype), q)
        dk = dk * scale
        if S == 1:
            gk = GK + pid_bh.to(tl.int64) * sg_bh
            gv = GV + pid_bh.to(tl.int64) * sg_bh
            dk = _add_pooled(dk, gk, sg_n, OFF2, rows, valid, LKV, offs_d, lmask, 2)
            dk = _add_pooled(dk, gk, sg_n, OFF4, rows, valid, LKV, offs_d, lmask, 4)
            dk = _add_pooled(dk, gk, sg_n, OFF8, rows, valid, LKV, offs_d, lmask, 8)
            dv = _add_pooled(dv, gv, sg_n, OFF2, rows, valid, LKV, offs_d, lmask, 2)
            dv = _add_pooled(dv, gv, sg_n, OFF4, rows, valid, LKV, offs_d, lmask, 4)
            dv = _add_pooled(dv, gv, sg_n, OFF8, rows, valid, LKV, offs_d, lmask, 8)
        tl.store(DK + b * sdkb + h * sdkh + rows[:, None] * sdkn + offs_d[None, :], dk.to(DK.dtype.element_ty),
                 mask=lmask)  # fmt: skip
        tl.store(DV + b * sdvb + h * sdvh + rows[:, None] * sdvn + offs_d[None, :], dv.to(DV.dtype.element_ty),
                 mask=lmask)  # fmt: skip


def transposed_mask(mask: PyramidBlockMask) -> PyramidBlockMask:
    """The mask seen from the keys: for each (b, h, KV block j), the query blocks that see ``j``, grouped by level.

    ``kv_counts`` ``[B, H, Nk, 4]`` and ``kv_indices`` ``[B, H, Nk, Nq]`` (ascending within a level), int32;
    torch ops on the mask's device, no host synchronisation.
    """
    lm = mask.to_level_map().transpose(-1, -2)
    return PyramidBlockMask.from_valid_level_map(lm, block_q=mask.block_kv, block_kv=mask.block_q)


def _tile_rows(block: int, s: int, want: int) -> int:
    """Tile height for a level-``s`` block of ``block / s`` rows: at most ``want``, at least 16 (tl.dot's minimum)."""
    return max(16, min(want, block // s))


def launch_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kp: torch.Tensor,
    vp: torch.Tensor,
    mask: PyramidBlockMask,
    scale: float,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launcher: the row kernel, then the column kernel for levels 8, 4, 2, 1.

    ``kp``/``vp``: pooled K/V ``[B*H, L2+L4+L8, D]`` of all (b, h) slices. Returns ``(dq, dk, dv)`` in the
    inputs' dtype; every tensor has a contiguous last dimension.
    """
    b, h, lq, d = q.shape
    lkv = k.shape[2]
    bq, bkv = mask.block_q, mask.block_kv
    cfg = kernel_config("attention_backward", device=q.device, head_dim=d, dtype=q.dtype, override=config)
    row_m, col_m = min(cfg["ROW_M"], bq), min(cfg["COL_M"], bq)
    for name, m in (("ROW_M", row_m), ("COL_M", col_m)):
        if bq % m:
            raise ValueError(f"{name}={m} must divide block_q={bq}")
    counts = mask.kv_counts.to(torch.int32).contiguous()
    indices = mask.kv_indices.to(torch.int32).contiguous()
    tmask = transposed_mask(mask)
    t_counts, t_indices = tmask.kv_counts.contiguous(), tmask.kv_indices.contiguous()
    offs = level_offsets(lkv)
    block_d = next_power_of_2(d)
    qk_scale = scale * LOG2E
    upcast = dot_upcast(q.dtype)
    new = triton_support.new_output
    dq = new((b, h, lq, d), dtype=q.dtype, device=q.device)
    dk = new((b, h, lkv, d), dtype=k.dtype, device=q.device)
    dv = new((b, h, lkv, d), dtype=v.dtype, device=q.device)
    lse = new((b * h, lq), dtype=torch.float32, device=q.device)
    delta = new((b * h, lq), dtype=torch.float32, device=q.device)
    gk = new((b * h, offs["total"], d), dtype=torch.float32, device=q.device)
    gv = new((b * h, offs["total"], d), dtype=torch.float32, device=q.device)

    bns = {s: _tile_rows(bkv, s, cfg["ROW_N"]) for s in (1, 2, 4, 8)}
    _psa_bwd_row_kernel[(cdiv(lq, row_m), b * h)](
        q, k, v, kp, vp, grad_out, dq, lse, delta, counts, indices,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), kp.stride(0), kp.stride(1),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
        counts.stride(0), counts.stride(1), counts.stride(2), indices.stride(0), indices.stride(1), indices.stride(2),
        h, lq, lkv, offs[2], offs[4], offs[8], qk_scale, scale,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=row_m, BLOCK_Q=bq, BLOCK_KV=bkv,
        BN1=bns[1], BN2=bns[2], BN4=bns[4], BN8=bns[8], UPCAST=upcast,
        num_warps=cfg["row_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip

    nk = cdiv(lkv, bkv)
    sp_bh, sp_n = kp.stride(0), kp.stride(1)
    sg_bh, sg_n = gk.stride(0), gk.stride(1)
    for level, s in ((3, 8), (2, 4), (1, 2), (0, 1)):
        bn = _tile_rows(bkv, s, cfg["COL_N"])
        if s == 1:
            ks, vs, ls = k, v, lkv
            kstr = (k.stride(0), k.stride(1), k.stride(2))
            vstr = (v.stride(0), v.stride(1), v.stride(2))
            dks, dvs = dk, dv
            dkstr = (dk.stride(0), dk.stride(1), dk.stride(2))
            dvstr = (dv.stride(0), dv.stride(1), dv.stride(2))
        else:  # a pooled level: (b, h) slice b*H + h of the [B*H, rows, D] buffers, its rows from offs[s]
            ks, vs = kp[:, offs[s] :], vp[:, offs[s] :]
            ls = cdiv(lkv, s)
            kstr = vstr = (h * sp_bh, sp_bh, sp_n)
            dks, dvs = gk[:, offs[s] :], gv[:, offs[s] :]
            dkstr = dvstr = (h * sg_bh, sg_bh, sg_n)
        _psa_bwd_col_kernel[(nk * cdiv(bkv // s, bn), b * h)](
            q, grad_out, lse, delta, ks, vs, t_counts, t_indices, dks, dvs, gk, gv,
            q.stride(0), q.stride(1), q.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            *kstr, *vstr, *dkstr, *dvstr, sg_bh, sg_n,
            t_counts.stride(0), t_counts.stride(1), t_counts.stride(2),
            t_indices.stride(0), t_indices.stride(1), t_indices.stride(2),
            h, lq, lkv, ls, offs[2], offs[4], offs[8], qk_scale, scale,
            S=s, LEVEL=level, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=col_m, BLOCK_N=bn, BLOCK_Q=bq, BLOCK_KV=bkv,
            UPCAST=upcast, num_warps=cfg["col_warps"], num_stages=cfg["num_stages"],
        )  # fmt: skip
    return dq, dk, dv


def psa_attention_backward_triton(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: PyramidBlockMask,
    scale: float | None = None,
    *,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of pyramid sparse attention: same result as
    :func:`.reference.psa_attention_backward_reference`.

    grad_out and q: ``[B, H, Lq, D]``; k, v: ``[B, H, Lkv, D]``; ``mask`` ``[B, H, ceil(Lq/block_q),
    ceil(Lkv/block_kv)]`` on q's device, a constant. Returns tensors of q's, k's and v's shapes and dtype.
    config: overrides the ``"attention_backward"`` entry of the kernel configuration table.
    Raises ValueError where :func:`..triton_support.triton_unsupported_reason` gives a reason.
    """
    q, k, v, grad_out = (t.detach() for t in (q, k, v, grad_out))
    check_supported(q, k, v, names=("q", "k", "v"))
    if grad_out.shape != q.shape or grad_out.dtype != q.dtype or grad_out.device != q.device:
        raise ValueError(
            f"grad_out must be a {tuple(q.shape)} {q.dtype} tensor on {q.device}, "
            f"got {tuple(grad_out.shape)} {grad_out.dtype} on {grad_out.device}"
        )
    b, h, lq, d = q.shape
    mask.check_fits(lq, k.shape[2])
    if mask.shape[:2] != (b, h):
        raise ValueError(f"mask batch/heads {mask.shape[:2]} do not match q {tuple(q.shape)}")
    if mask.device != q.device:
        raise ValueError(f"mask is on {mask.device} but q is on {q.device}")
    scale = d**-0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale={scale!r} must be finite")
    q, k, v, grad_out = (triton_support.last_dim_contiguous(t) for t in (q, k, v, grad_out))
    kp, vp = pool_kv_triton(k, v)
    return launch_attention_backward(grad_out, q, k, v, kp, vp, mask, scale, config)
