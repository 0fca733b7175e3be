"""Sparse pyramid attention backward (Triton): dQ, dK, dV over every level, FlashAttention-2 style.

The forward saves each row's natural log-sum-exp ``lse`` (``psa_attention_triton(..., return_lse=True)``)
and its output ``O``. K and V are pooled as for the forward (:func:`..pooling.kernel.pool_kv_triton`);
then two kernels:

* Row kernel: one program per ``ROW_M`` query rows of one (batch, head). It computes
  ``delta = rowsum(dO * O)`` (float32) from the saved output and stores it for the column kernel,
  then walks the row's KV blocks level by level from the compact mask once, as the forward does
  (contiguous tiles, or several short pooled blocks packed into one tile), accumulating
  ``dQ = scale * sum_t dS_t kbar_t`` with ``P_t = exp2(z_t - lse)`` and ``dS = P * (dO vbar_t - delta)``:
  three matrix products per tile (``Q Kbar^T``, ``dO Vbar^T``, ``dS Kbar``).
* Column kernel, launched once per level in the order 8, 4, 2, 1: one program per ``COL_N`` rows
  of one KV block at level ``s`` (rows of the level-``s`` buffer), walking the query blocks that
  see that block at level ``s`` (the transposed mask, :func:`transposed_mask`) and accumulating
  ``dVbar = P^T dO`` and ``dKbar = scale * dS^T Q`` (four products per tile). Levels 2, 4 and 8
  store the pooled gradients in float32. Level 1 then adds to each token ``1/c`` of the pooled
  gradient of each group it belongs to (``c`` real tokens in the group) and writes dK and dV.

A pooled token of ``c`` real tokens has the logit bias ``ln(c)`` (``log2(c)`` here, in the exp2
domain, where the kernels also take ``lse`` times ``log2(e)``) in both kernels, as in the forward;
the mask is a constant.
"""

from __future__ import annotations

import math

import torch

from ...mask import PyramidBlockMask
from .. import triton_support
from ..kernel_configs import kernel_config
from ..pooling.kernel import level_offsets, pool_kv_triton
from ..triton_support import HAS_TRITON, LOG2E, cdiv, check_supported, dot_upcast, next_power_of_2, tl, triton
from .kernel import psa_attention_triton

if HAS_TRITON:
    from .kernel import group_log2_count, load_rows  # the forward's tile loads and pooled-count bias

    @triton.jit
    def _row_tile(
        dq, q, do, lse, delta, kbase, vbase, skn, svn, rows, valid, LKV, qk_scale, offs_d, dmask,
        S: tl.constexpr, LOG2S: tl.constexpr, PAD_D: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        """``dq`` plus the dS @ K of one BLOCK_N-row tile (rows ``rows`` of the level-S buffer); ``lse`` is in
        the exp2 domain. MASKED: per-column log2(c) biases and no weight off ``valid``."""
        k, v = load_rows(kbase, vbase, skn, svn, rows, valid, offs_d, dmask, MASKED, PAD_D)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k))
        if MASKED:
            bias = group_log2_count(rows, LKV, S)
            p = tl.math.exp2(tl.where(valid[None, :], qk * qk_scale + bias[None, :] - lse[:, None], float("-inf")))
        else:  # every column stands for exactly S tokens: log2(S) folds into the row's lse
            p = tl.math.exp2(qk * qk_scale - (lse - LOG2S)[:, None])
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        return dq + tl.dot(ds.to(k.dtype), k)

    @triton.jit
    def _row_level(
        dq, q, do, lse, delta, kbase, vbase, skn, svn, idx_ptr, n, LS, LKV, NK, qk_scale, offs_d, dmask,
        S: tl.constexpr, LOG2S: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_N: tl.constexpr, PAD_D: tl.constexpr,
        UPCAST: tl.constexpr,
    ):  # fmt: skip
        """The ``n`` blocks ``idx_ptr[0:n]`` (ascending) of level S, each ``R = BLOCK_KV / S`` rows of the level
        buffer, in the forward's tiles (its level walk in kernel.py): contiguous when ``R >= BLOCK_N``, else
        ``BLOCK_N / R`` blocks packed per tile; only tiles holding the partial tail block or padding are masked."""
        R: tl.constexpr = BLOCK_KV // S
        # only the sequence's last block can be partial, and ascending ids put it last in the list
        last = tl.load(idx_ptr + tl.maximum(n - 1, 0), mask=n > 0, other=0)
        has_tail = ((n > 0) & (last == NK - 1) & (LKV % BLOCK_KV != 0)).to(tl.int32)
        if R >= BLOCK_N:
            TPB: tl.constexpr = R // BLOCK_N
            for t in range(0, (n - has_tail) * TPB):
                rows = tl.load(idx_ptr + t // TPB) * R + (t % TPB) * BLOCK_N + tl.arange(0, BLOCK_N)
                dq = _row_tile(dq, q, do, lse, delta, kbase, vbase, skn, svn, rows, rows < LS, LKV, qk_scale, offs_d,
                               dmask, S, LOG2S, PAD_D, False, UPCAST)  # fmt: skip
            if has_tail != 0:
                tail0 = (NK - 1) * R
                for t in range(0, tl.cdiv(LS - tail0, BLOCK_N)):
                    rows = tail0 + t * BLOCK_N + tl.arange(0, BLOCK_N)
                    dq = _row_tile(dq, q, do, lse, delta, kbase, vbase, skn, svn, rows, rows < LS, LKV, qk_scale,
                                   offs_d, dmask, S, LOG2S, PAD_D, True, UPCAST)  # fmt: skip
        else:
            n_tiles = tl.cdiv(n * R, BLOCK_N)
            need_mask = (has_tail != 0) | ((n * R) % BLOCK_N != 0)
            n_full = n_tiles - need_mask.to(tl.int32)
            for t in range(0, n_full):
                vrow = t * BLOCK_N + tl.arange(0, BLOCK_N)
                rows = tl.load(idx_ptr + vrow // R) * R + vrow % R
                dq = _row_tile(dq, q, do, lse, delta, kbase, vbase, skn, svn, rows, rows < LS, LKV, qk_scale, offs_d,
                               dmask, S, LOG2S, PAD_D, False, UPCAST)  # fmt: skip
            if need_mask:
                vrow = n_full * BLOCK_N + tl.arange(0, BLOCK_N)
                ent = vrow // R
                rows = tl.load(idx_ptr + ent, mask=ent < n, other=0) * R + vrow % R
                valid = (ent < n) & (rows < LS)
                dq = _row_tile(dq, q, do, lse, delta, kbase, vbase, skn, svn, rows, valid, LKV, qk_scale, offs_d,
                               dmask, S, LOG2S, PAD_D, True, UPCAST)  # fmt: skip
        return dq

    @triton.jit
    def _psa_bwd_row_kernel(
        Q, K, V, KP, VP, O, DO, DQ, LSE, DELTA, COUNTS, INDICES,
        sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sp_bh, sp_n,
        sob, soh, som, sdob, sdoh, sdom, sdqb, sdqh, sdqm, scb, sch, scm, sib, sih, sim,
        H, LQ, LKV, NK, OFF2, OFF4, OFF8, qk_scale, scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        """Program (row tile, b*H + h): ``delta = rowsum(dO * O)`` of BLOCK_M query rows (stored), then their dQ.

        LSE (read) and DELTA (written): contiguous float32 ``[B*H, LQ]``; LSE is the forward's natural log-sum-exp.
        """
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        qblk = (pid_m * BLOCK_M) // BLOCK_Q
        PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HEAD_DIM
        mvalid = offs_m < LQ
        rmask = mvalid[:, None] & dmask[None, :]
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=rmask, other=0.0)
        do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :], mask=rmask, other=0.0)
        o = tl.load(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], mask=rmask, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        stat = pid_bh.to(tl.int64) * LQ + offs_m
        tl.store(DELTA + stat, delta, mask=mvalid)
        lse = tl.load(LSE + stat, mask=mvalid, other=0.0) * 1.4426950408889634  # log2(e): to the exp2 domain
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        cnt_ptr = COUNTS + b * scb + h * sch + qblk * scm
        idx_ptr = INDICES + b * sib + h * sih + qblk * sim
        n1 = tl.load(cnt_ptr + 0)
        n2 = tl.load(cnt_ptr + 1)
        n4 = tl.load(cnt_ptr + 2)
        n8 = tl.load(cnt_ptr + 3)
        kb = K + b * skb + h * skh
        vb = V + b * svb + h * svh
        kpb = KP + pid_bh.to(tl.int64) * sp_bh
        vpb = VP + pid_bh.to(tl.int64) * sp_bh

        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        dq = _row_level(
            dq, q, do, lse, delta, kb, vb, skn, svn, idx_ptr, n1, LKV, LKV, NK, qk_scale, offs_d, dmask,
            1, 0.0, BLOCK_KV, BLOCK_N, PAD_D, UPCAST,
        )  # fmt: skip
        dq = _row_level(
            dq, q, do, lse, delta, kpb + OFF2 * sp_n, vpb + OFF2 * sp_n, sp_n, sp_n, idx_ptr + n1, n2, OFF4 - OFF2,
            LKV, NK, qk_scale, offs_d, dmask, 2, 1.0, BLOCK_KV, BLOCK_N, PAD_D, UPCAST,
        )  # fmt: skip
        dq = _row_level(
            dq, q, do, lse, delta, kpb + OFF4 * sp_n, vpb + OFF4 * sp_n, sp_n, sp_n, idx_ptr + n1 + n2, n4,
            OFF8 - OFF4, LKV, NK, qk_scale, offs_d, dmask, 4, 2.0, BLOCK_KV, BLOCK_N, PAD_D, UPCAST,
        )  # fmt: skip
        dq = _row_level(
            dq, q, do, lse, delta, kpb + OFF8 * sp_n, vpb + OFF8 * sp_n, sp_n, sp_n, idx_ptr + n1 + n2 + n4, n8,
            (LKV + 7) // 8, LKV, NK, qk_scale, offs_d, dmask, 8, 3.0, BLOCK_KV, BLOCK_N, PAD_D, UPCAST,
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
        levels 2, 4, 8, ``[B*H, L2+L4+L8, D]``) and writes the token gradients. LSE (the forward's natural
        log-sum-exp) and DELTA: contiguous float32 ``[B*H, LQ]``.
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
                # exp2 domain (log2(e)); rows past LQ: lse = inf, so P = 0
                lse = tl.load(LSE + stat + offs_m, mask=mvalid, other=float("inf")) * 1.4426950408889634
                delta = tl.load(DELTA + stat + offs_m, mask=mvalid, other=0.0)
                zt = tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :]  # [N, M]
                if S > 1:
                    zt += bias[:, None]
                pt = tl.math.exp2(zt)
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
    out: torch.Tensor,
    lse: torch.Tensor,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launcher: the row kernel, then the column kernel for levels 8, 4, 2, 1.

    ``kp``/``vp``: pooled K/V ``[B*H, L2+L4+L8, D]`` of all (b, h) slices; ``out`` ``[B, H, Lq, D]`` and
    ``lse`` (contiguous float32 ``[B, H, Lq]``): the forward's output and natural log-sum-exp. Returns
    ``(dq, dk, dv)`` in the inputs' dtype; every tensor but ``lse`` has a contiguous last dimension.
    """
    b, h, lq, d = q.shape
    lkv = k.shape[2]
    if out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out must be a {tuple(q.shape)} tensor with a contiguous last dim, got {tuple(out.shape)}")
    if lse.shape != (b, h, lq) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"lse must be a contiguous float32 {(b, h, lq)} tensor, got {tuple(lse.shape)} {lse.dtype}")
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
    delta = new((b * h, lq), dtype=torch.float32, device=q.device)
    gk = new((b * h, offs["total"], d), dtype=torch.float32, device=q.device)
    gv = new((b * h, offs["total"], d), dtype=torch.float32, device=q.device)

    nk = cdiv(lkv, bkv)
    _psa_bwd_row_kernel[(cdiv(lq, row_m), b * h)](
        q, k, v, kp, vp, out, grad_out, dq, lse, delta, counts, indices,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), kp.stride(0), kp.stride(1),
        out.stride(0), out.stride(1), out.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        counts.stride(0), counts.stride(1), counts.stride(2), indices.stride(0), indices.stride(1), indices.stride(2),
        h, lq, lkv, nk, offs[2], offs[4], offs[8], qk_scale, scale,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=row_m, BLOCK_N=cfg["ROW_N"], BLOCK_Q=bq, BLOCK_KV=bkv, UPCAST=upcast,
        num_warps=cfg["row_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip

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
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of pyramid sparse attention: same result as
    :func:`.reference.psa_attention_backward_reference`.

    grad_out and q: ``[B, H, Lq, D]``; k, v: ``[B, H, Lkv, D]``; ``mask`` ``[B, H, ceil(Lq/block_q),
    ceil(Lkv/block_kv)]`` on q's device, a constant. Returns tensors of q's, k's and v's shapes and dtype.
    out, lse: the forward's output (q's shape and dtype) and natural log-sum-exp (float32 ``[B, H, Lq]``),
    as ``psa_attention_triton(..., return_lse=True)`` returns them; both or neither. Without them the
    forward kernel runs first (on the K/V pooled for the backward): one forward's extra cost.
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
    if (out is None) != (lse is None):
        raise ValueError("out and lse (the forward's output and log-sum-exp) must be given together, or neither")
    if out is not None:
        out, lse = out.detach(), lse.detach()
        if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(
                f"out must be a {tuple(q.shape)} {q.dtype} tensor on {q.device}, "
                f"got {tuple(out.shape)} {out.dtype} on {out.device}"
            )
        if lse.shape != q.shape[:3] or lse.dtype != torch.float32 or lse.device != q.device:
            raise ValueError(
                f"lse must be a {tuple(q.shape[:3])} float32 tensor on {q.device}, "
                f"got {tuple(lse.shape)} {lse.dtype} on {lse.device}"
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
    if out is None:
        out, lse = psa_attention_triton(q, k, v, mask, scale, pooled=(kp, vp), return_lse=True)
    else:
        out, lse = triton_support.last_dim_contiguous(out), lse.contiguous()
    return launch_attention_backward(grad_out, q, k, v, kp, vp, mask, scale, out, lse, config)
