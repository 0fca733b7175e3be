"""Pyramid statistics of the "budget" mode on the GPU (Triton).

Same math as :func:`.reference.estimate_pyramid_statistics_reference`, without
materialising anything of size ``[Lq, T * group, D]``. Notation per head: pooled
queries ``qbar_g`` and keys ``kbar_t`` (means over groups of ``group`` tokens, ``c_t``
real keys in group ``t``), ``V_ij`` the within-group logit variance of the query block
``i`` of ``g`` and the KV block ``j`` of ``t``, and the pooled log-mass

    bulk[g, t] = scale * qbar_g . kbar_t + ln c_t + V_ij / 2.

Kernel 0 (*group means*) pools q and k (sums in float32, stored in the inputs' dtype, or
float32 with ``config={"pooled_fp32": True}``).

Kernel 1 (*pooled pass*, one program per ``BLOCK_M`` pooled queries and share of the key
tiles) runs an online softmax over key groups and writes, per pooled query ``g`` and KV
block ``j``,

    M1[g, j] = sum_{t in j} exp2(bulk2[g, t] - m),    M2[g, j] = sum_{t in j} exp2(2 bulk2[g, t] - 2 m) / c_t,

(``bulk2`` is ``bulk`` in log2 units) with ``m`` the running max of the key tile that
holds ``j``, also written (``MT``), and each share's max and sum, merged into the row's
log-sum ``LSE`` by two small torch ops; so ``softmax mass = M1 * exp2(MT - LSE)`` and no
second pass is needed. The per-block sums are reshapes + sums in float32 (faster than a ``tl.dot``
with a 0/1 matrix split into tf32-exact parts; docs/benchmarks.md).

The refinement is four launches, each writing small per-group arrays, none of size
``[Lq, T * group, D]``:

2. *rank* (one program of one warp per query block ``i``): ranks the KV blocks of row ``i``
   by ``sum_g q_cnt[g] * softmax mass`` (top ``refine_blocks``, ties to the lower index, as
   a stable descending sort) -> ``TOP [BH, Nq, MP]``, and each query group's pooled mass of
   the unranked blocks -> ``NONTOP [BH, Gq]``.
3. *select* (one program per query block): recomputes the pooled logits of its query
   groups against the key groups of the ranked blocks, picks the ``refine_groups`` largest
   per query group (same tie rule) -> ``SEL``/``POS [BH, Gq, T]`` (key group, rank position
   of its block), sums the pooled terms of the unpicked groups per ranked block ->
   ``P1``/``P2 [BH, Gq, MP]``, and ``REST [BH, Gq]`` = log2 of all unpicked mass
   (``NONTOP`` + the unpicked ``P1``; summed directly, nothing by subtraction).
4. *exact* (one program per two query groups: ``tl.dot`` needs 16 rows): exact logits of
   each query group against the keys of its picked groups (block-diagonal), the normaliser
   ``log Z`` of each query with ``REST``, ``inv_z``/``inv_z2`` = log2 sum_r 1/Z_r (1/Z_r**2)
   -> ``IZ``/``IZ2``, and the group's share of each ranked block's row
   ``C1 = P1 * exp2(inv_z + lse) + exact mass`` (``C2`` likewise for the squares).
5. *assemble* (one program per query block): each row of ``mass`` and ``sq_mass`` is written
   once, unranked blocks from ``M1``/``M2`` weighted per query group by ``exp(inv_z)`` /
   ``exp(inv_z2 + V_ij)``, ranked blocks as the sum over the block's query groups of ``C1``/``C2``.

No atomics, no scatter, every sum in a fixed order: the result is bit-identical run to run.

The exact logits are bound by gathering each query group's ``refine_groups * group`` keys;
the cost of each kernel is in docs/benchmarks.md.
"""

from __future__ import annotations

import math

import torch

from ...config import POOLED_LEVELS
from ...mask import block_sizes
from ...ops import triton_support
from ...ops.kernel_configs import kernel_config
from ...ops.triton_support import (
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
from ..stats import PyramidStats, group_logit_variance
from ..variance.reference import pooled_logit_variance_reference

if HAS_TRITON:
    from ...ops.pooling.kernel import pool_level_tile  # group means over real tokens, shared with the pyramid pooling

    _TAKEN = tl.constexpr(-(2**63) + 1)  # below every packed selection key
    _LOG2E_K = tl.constexpr(LOG2E)  # log2(e) inside the kernels

    @triton.jit
    def _group_mean_kernel(
        X, Y, sxb, sxh, sxn, H, L, G,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """Means of groups of GROUP consecutive tokens over real tokens only, stored in Y's dtype (``[B*H, G, D]``)."""
        pid = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        pool_level_tile(X + b * sxb + h * sxh, Y + pid_bh.to(tl.int64) * G * HEAD_DIM, sxn, HEAD_DIM,
                    pid * BLOCK_G * GROUP, L, 0, offs_d, offs_d < HEAD_DIM, GROUP, BLOCK_G, BLOCK_D)  # fmt: skip

    @triton.jit
    def _lognormal_shift(v, gm1):
        """``min(V / 2, sqrt((group - 1) V))`` in nats: the log-normal mass correction, capped where it
        would exceed a group's largest possible total (as ``stats.lognormal_shift``)."""
        return tl.minimum(0.5 * v, tl.sqrt(gm1 * tl.maximum(v, 0.0)))

    @triton.jit
    def _pooled_pass_kernel(
        QB, KB, BIAS, INVC, VAR, M1, M2, MT, PM, PL,
        GQ, GK, NQ, NK, NT, TPS, SPLIT, qk_scale, gm1,
        GPQ: tl.constexpr, GPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        KBT: tl.constexpr = BLOCK_N // GPK  # KV blocks per key tile
        pid = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HEAD_DIM
        g = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        gval = g < GQ
        qi = g // GPQ
        q = tl.load(
            QB + (bh * GQ + g[:, None]) * HEAD_DIM + offs_d[None, :], mask=gval[:, None] & dmask[None, :], other=0.0
        )
        if UPCAST:
            q = q.to(tl.float32)
        n = tl.arange(0, BLOCK_N)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for t in range(split * TPS, tl.minimum(NT, split * TPS + TPS)):
            cols = t * BLOCK_N + n
            kval = cols < GK
            k = tl.load(
                KB + (bh * GK + cols[:, None]) * HEAD_DIM + offs_d[None, :],
                mask=kval[:, None] & dmask[None, :],
                other=0.0,
            )
            if UPCAST:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            bias = tl.load(BIAS + cols, mask=kval, other=float("-inf"))  # log2 of the count, -inf when empty
            # per-block terms spread to their key groups, and per-block sums, by reshapes (exact float32 adds)
            kt = t * KBT + tl.arange(0, KBT)
            omask = gval[:, None] & (kt < NK)[None, :]
            v = tl.load(VAR + (bh * NQ + qi[:, None]) * NK + kt[None, :], mask=omask, other=0.0)
            v = _lognormal_shift(v, gm1) * _LOG2E_K
            s = s + bias[None, :] + tl.reshape(tl.broadcast_to(v[:, :, None], (BLOCK_M, KBT, GPK)), (BLOCK_M, BLOCK_N))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile of empty groups only
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(p, 1)
            m_i = m_new
            invc = tl.load(INVC + cols, mask=kval, other=0.0)
            b1 = tl.sum(tl.reshape(p, (BLOCK_M, KBT, GPK)), axis=2)  # [BLOCK_M, KBT]
            b2 = tl.sum(tl.reshape(p * p * invc[None, :], (BLOCK_M, KBT, GPK)), axis=2)
            tl.store(M1 + (bh * GQ + g[:, None]) * NK + kt[None, :], b1, mask=omask)
            tl.store(M2 + (bh * GQ + g[:, None]) * NK + kt[None, :], b2, mask=omask)
            tl.store(MT + (bh * GQ + g) * NT + t, m_new, mask=gval)
        tl.store(PM + (bh * GQ + g) * SPLIT + split, m_i, mask=gval)  # this split's max and sum
        tl.store(PL + (bh * GQ + g) * SPLIT + split, l_i, mask=gval)

    @triton.jit
    def _log2sumexp2(x, axis: tl.constexpr):
        """log2(sum(exp2(x))) along ``axis``; -inf where every entry is -inf."""
        mx = tl.max(x, axis)
        ms = tl.where(mx == float("-inf"), 0.0, mx)
        return ms + tl.math.log2(tl.sum(tl.math.exp2(x - tl.expand_dims(ms, axis)), axis))

    @triton.jit
    def _rank_kernel(
        M1, MT, LSE, TOP, NONTOP,
        LQ, GQ, NQ, NK, NT,
        GROUP: tl.constexpr, GPQ: tl.constexpr, KBT: tl.constexpr, M: tl.constexpr, MP: tl.constexpr,
        BLOCK_NK: tl.constexpr,
    ):  # fmt: skip
        """Per query block: its KV blocks ranked by pooled mass (top M), and each query group's unranked mass."""
        qblk = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        jj = tl.arange(0, BLOCK_NK)
        jval = jj < NK
        row_mass = tl.zeros([BLOCK_NK], dtype=tl.float32)
        for og in range(0, GPQ):  # one query group at a time: few registers, one warp
            g = qblk * GPQ + og
            gm = jj < tl.minimum(tl.maximum(GQ - g, 0), 1) * NK  # the row's blocks; none for a padding group
            lse = tl.load(LSE + bh * GQ + tl.minimum(g, GQ - 1))  # unused when the group is padding
            mt = tl.load(MT + (bh * GQ + g) * NT + jj // KBT, mask=gm, other=0.0)
            sm = tl.load(M1 + (bh * GQ + g) * NK + jj, mask=gm, other=0.0) * tl.math.exp2(mt - lse)
            row_mass += sm * tl.minimum(tl.maximum(LQ - g * GROUP, 0), GROUP).to(tl.float32)
        # key: the mass's bits (non-negative floats order as ints), then the reversed index (ties to the lower)
        rkey = (row_mass.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (BLOCK_NK - 1 - jj)
        rkey = tl.where(jval, rkey, -1)
        om = tl.arange(0, MP)
        top = tl.zeros([MP], dtype=tl.int32)  # M passes of argmax (tl.topk was no faster)
        for p in tl.static_range(M):
            best = tl.max(rkey, 0)
            rkey = tl.where(rkey == best, -1, rkey)
            top = tl.where(om == p, (BLOCK_NK - 1 - (best & 0xFFFFFFFF)).to(tl.int32), top)
        taken_j = rkey == -1
        tl.store(TOP + (bh * NQ + qblk) * MP + om, top)
        out = jval & ~taken_j
        for og in range(0, GPQ):  # pooled mass of the unranked blocks, per query group
            g = qblk * GPQ + og
            gm = out & (jj < tl.minimum(tl.maximum(GQ - g, 0), 1) * NK)
            lse = tl.load(LSE + bh * GQ + tl.minimum(g, GQ - 1))
            mt = tl.load(MT + (bh * GQ + g) * NT + jj // KBT, mask=gm, other=0.0)
            sm = tl.load(M1 + (bh * GQ + g) * NK + jj, mask=gm, other=0.0) * tl.math.exp2(mt - lse)
            if g < GQ:
                tl.store(NONTOP + bh * GQ + g, tl.sum(sm, 0))

    @triton.jit
    def _select_kernel(
        QB, KB, BIAS, VAR, LSE, TOP, NONTOP, SEL, POS, REST, P1, P2,
        GQ, GK, NQ, NK, qk_scale, sq_cap, gm1,
        GPQ: tl.constexpr, GPQP: tl.constexpr, GPK: tl.constexpr,
        M: tl.constexpr, MP: tl.constexpr, T: tl.constexpr, TP: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        """Per query block: each query group's key groups among the ranked blocks', and its unpicked pooled mass."""
        NC: tl.constexpr = MP * GPK  # candidate key groups (the ranked blocks' groups)
        qblk = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HEAD_DIM

        og = tl.arange(0, GPQP)
        g = qblk * GPQ + og
        gval = (og < GPQ) & (g < GQ)
        lse = tl.load(LSE + bh * GQ + g, mask=gval, other=0.0)
        nontop = tl.load(NONTOP + bh * GQ + g, mask=gval, other=0.0)  # [GPQP] pooled mass of the unranked blocks
        om = tl.arange(0, MP)
        top = tl.load(TOP + (bh * NQ + qblk) * MP + om)

        # 2. pooled logits against the ranked blocks' key groups; pick T per query group
        c = tl.arange(0, NC)
        cp = c // GPK
        cpos = cp < M
        cblk = tl.sum(tl.where(cp[:, None] == om[None, :], top[None, :], 0), 1)
        cgrp = cblk * GPK + c % GPK
        ckval = cpos & (cgrp < GK)
        kb = tl.load(
            KB + (bh * GK + cgrp[:, None]) * HEAD_DIM + offs_d[None, :], mask=ckval[:, None] & dmask[None, :], other=0.0
        )
        qb = tl.load(
            QB + (bh * GQ + g[:, None]) * HEAD_DIM + offs_d[None, :], mask=gval[:, None] & dmask[None, :], other=0.0
        )
        if UPCAST:
            kb = kb.to(tl.float32)
            qb = qb.to(tl.float32)
        zc = tl.dot(qb, tl.trans(kb)) * qk_scale  # [GPQP, NC], log2 units
        zsel = tl.where(ckval[None, :], zc, float("-inf"))
        bits = zsel.to(tl.int32, bitcast=True)
        okey = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # order-preserving int of the float (-inf included)
        skey = (okey.to(tl.int64) << 32) | (NC - 1 - c)[None, :]
        skey = tl.where(cpos[None, :], skey, _TAKEN)
        ot = tl.arange(0, TP)
        pick = tl.zeros([GPQP, TP], dtype=tl.int32)  # T passes of argmax per query group
        for tau in tl.static_range(T):
            best = tl.max(skey, 1)
            skey = tl.where(skey == best[:, None], _TAKEN, skey)
            pick = tl.where(ot[None, :] == tau, (NC - 1 - (best & 0xFFFFFFFF)).to(tl.int32)[:, None], pick)
        picked = skey == _TAKEN
        vc = tl.load(VAR + (bh * NQ + qblk) * NK + cblk, mask=cpos, other=0.0)
        bias_c = tl.load(BIAS + cgrp, mask=ckval, other=float("-inf"))
        unsel = gval[:, None] & cpos[None, :] & ~picked & ckval[None, :]
        zkey = (skey >> 32).to(tl.int32)  # the candidate logits back from the keys (zc itself need not stay live)
        zr = tl.where(zkey >= 0, zkey, zkey ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)  # == zc where unsel
        bulk = zr + bias_c[None, :] + (_lognormal_shift(vc, gm1) * _LOG2E_K)[None, :] - lse[:, None]
        e1 = tl.where(unsel, tl.math.exp2(bulk), 0.0)
        bias_s = tl.where(ckval, bias_c, 0.0)[None, :]
        e2 = tl.where(unsel, tl.math.exp2(2.0 * bulk - bias_s + tl.minimum(vc * _LOG2E_K, sq_cap)[None, :]), 0.0)
        pool1 = tl.sum(tl.reshape(e1, (GPQP, MP, GPK)), axis=2)  # [GPQP, MP] unpicked pooled terms per ranked block
        pool2 = tl.sum(tl.reshape(e2, (GPQP, MP, GPK)), axis=2)
        rest_sum = nontop + tl.sum(pool1, 1)
        rest = tl.where(
            rest_sum > 0, lse + tl.math.log2(tl.maximum(rest_sum, 1e-30)), float("-inf")
        )  # log2 of the unpicked mass
        pick_pos = pick // GPK  # rank position of each picked group's block
        pick_blk = tl.sum(tl.where(pick_pos[:, :, None] == om[None, None, :], top[None, None, :], 0), 2)
        gm = gval[:, None]
        tl.store(SEL + (bh * GQ + g[:, None]) * TP + ot[None, :], pick_blk * GPK + pick % GPK, mask=gm)
        tl.store(POS + (bh * GQ + g[:, None]) * TP + ot[None, :], pick_pos, mask=gm)
        tl.store(P1 + (bh * GQ + g[:, None]) * MP + om[None, :], pool1, mask=gm)
        tl.store(P2 + (bh * GQ + g[:, None]) * MP + om[None, :], pool2, mask=gm)
        tl.store(REST + bh * GQ + g, rest, mask=gval)

    @triton.jit
    def _exact_kernel(
        Q, K, SEL, POS, REST, LSE, P1, P2, C1, C2, IZ, IZ2,
        sqb, sqh, sqm, skb, skh, skn,
        H, LQ, LKV, GQ, qk_scale,
        GROUP: tl.constexpr, GPD: tl.constexpr, MP: tl.constexpr, T: tl.constexpr, TP: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PAIRS: tl.constexpr,
    ):  # fmt: skip
        """Exact logits of GPD query groups against their picked key groups (one block-diagonal tl.dot), PAIRS times."""
        R: tl.constexpr = GPD * GROUP  # query rows
        NKEY: tl.constexpr = GPD * TP * GROUP  # keys
        pid = tl.program_id(0)
        pid_bh = tl.program_id(1)
        bh = pid_bh.to(tl.int64)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HEAD_DIM
        oa = tl.arange(0, GPD)
        for it in range(0, PAIRS):  # PAIRS tiles of GPD query groups each
            blk = pid * PAIRS + it
            ga = blk * GPD + oa
            gaval = ga < GQ
            ot = tl.arange(0, TP)
            amask = gaval[:, None] & (ot < T)[None, :]
            grp_a = tl.load(SEL + (bh * GQ + ga[:, None]) * TP + ot[None, :], mask=amask, other=0)  # [GPD, TP]
            rest_a = tl.load(REST + bh * GQ + ga, mask=gaval, other=float("-inf"))
            r = tl.arange(0, R)
            ck = tl.arange(0, NKEY)
            ktau = (ck // GROUP) % TP
            kgrp = tl.reshape(tl.broadcast_to(grp_a[:, :, None], (GPD, TP, GROUP)), (NKEY,))
            kpos = kgrp * GROUP + ck % GROUP
            kval = (ktau < T) & (kpos < LKV)
            k = tl.load(
                K + b * skb + h * skh + kpos[:, None].to(tl.int64) * skn + offs_d[None, :],
                mask=kval[:, None] & dmask[None, :],
                other=0.0,
            )
            qpos = blk * R + r
            qval = qpos < LQ
            q = tl.load(
                Q + b * sqb + h * sqh + qpos[:, None].to(tl.int64) * sqm + offs_d[None, :],
                mask=qval[:, None] & dmask[None, :],
                other=0.0,
            )
            if UPCAST:
                k = k.to(tl.float32)
                q = q.to(tl.float32)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            diag = (r // GROUP)[:, None] == (ck // (TP * GROUP))[None, :]
            s = tl.where(diag & kval[None, :], s, float("-inf"))
            lz = _log2sumexp2(s, 1)
            rest_r = tl.reshape(tl.broadcast_to(rest_a[:, None], (GPD, GROUP)), (R,))
            mx = tl.maximum(rest_r, lz)
            ms = tl.where(mx == float("-inf"), 0.0, mx)
            log_z = ms + tl.math.log2(tl.math.exp2(rest_r - ms) + tl.math.exp2(lz - ms))
            log_z = tl.where(qval, log_z, float("inf"))  # padded queries contribute nothing
            pr = tl.math.exp2(s - log_z[:, None])
            t1 = tl.sum(tl.reshape(tl.sum(pr, 0), (GPD, TP, GROUP)), axis=2)  # [GPD, TP]
            t2 = tl.sum(tl.reshape(tl.sum(pr * pr, 0), (GPD, TP, GROUP)), axis=2)
            iz = _log2sumexp2(tl.reshape(-log_z, (GPD, GROUP)), 1)  # log2 sum_r 1/Z_r
            iz2 = _log2sumexp2(tl.reshape(-2.0 * log_z, (GPD, GROUP)), 1)
            # this group's share of the ranked blocks' row: unpicked pooled terms weighted by 1/Z, plus the exact terms
            om = tl.arange(0, MP)
            pos_a = tl.load(POS + (bh * GQ + ga[:, None]) * TP + ot[None, :], mask=amask, other=-1)
            hit = pos_a[:, :, None] == om[None, None, :]  # [GPD, TP, MP]
            lse_a = tl.load(LSE + bh * GQ + ga, mask=gaval, other=0.0)
            w1 = tl.where(gaval, tl.math.exp2(iz + lse_a), 0.0)
            w2 = tl.where(gaval, tl.math.exp2(iz2 + 2.0 * lse_a), 0.0)
            pm = gaval[:, None] & (om < MP)[None, :]
            prow = (bh * GQ + ga[:, None]) * MP + om[None, :]
            c1 = tl.load(P1 + prow, mask=pm, other=0.0) * w1[:, None] + tl.sum(tl.where(hit, t1[:, :, None], 0.0), 1)
            c2 = tl.load(P2 + prow, mask=pm, other=0.0) * w2[:, None] + tl.sum(tl.where(hit, t2[:, :, None], 0.0), 1)
            tl.store(C1 + prow, c1, mask=pm)
            tl.store(C2 + prow, c2, mask=pm)
            tl.store(IZ + bh * GQ + ga, iz, mask=gaval)
            tl.store(IZ2 + bh * GQ + ga, iz2, mask=gaval)

    @triton.jit
    def _assemble_kernel(
        VAR, M1, M2, MT, LSE, TOP, C1, C2, IZ, IZ2, MASS, SQ,
        LQ, GQ, NQ, NK, NT, sq_cap,
        GROUP: tl.constexpr, GPQ: tl.constexpr, GPQP: tl.constexpr, KBT: tl.constexpr,
        M: tl.constexpr, MP: tl.constexpr, BLOCK_NK: tl.constexpr,
    ):  # fmt: skip
        """One row of mass and sq_mass: unranked blocks from M1/M2, ranked blocks from the refined terms."""
        qblk = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        jj = tl.arange(0, BLOCK_NK)
        jval = jj < NK
        og = tl.arange(0, GPQP)
        g = qblk * GPQ + og
        gval = (og < GPQ) & (g < GQ)
        om = tl.arange(0, MP)
        invz = tl.load(IZ + bh * GQ + g, mask=gval, other=float("-inf"))
        invz2 = tl.load(IZ2 + bh * GQ + g, mask=gval, other=float("-inf"))
        top = tl.load(TOP + (bh * NQ + qblk) * MP + om)
        pm = gval[:, None] & (om < M)[None, :]
        n_q = tl.minimum(LQ - qblk * GPQ * GROUP, GPQ * GROUP).to(tl.float32)
        mass_top = tl.sum(tl.load(C1 + (bh * GQ + g[:, None]) * MP + om[None, :], mask=pm, other=0.0), 0) / n_q
        sq_top = tl.sum(tl.load(C2 + (bh * GQ + g[:, None]) * MP + om[None, :], mask=pm, other=0.0), 0)
        rmask = gval[:, None] & jval[None, :]
        rows = (bh * GQ + g[:, None]) * NK + jj[None, :]
        mt = tl.load(MT + (bh * GQ + g[:, None]) * NT + jj[None, :] // KBT, mask=rmask, other=0.0)
        mass = tl.sum(tl.load(M1 + rows, mask=rmask, other=0.0) * tl.math.exp2(invz[:, None] + mt), 0) / n_q
        v_row = tl.load(VAR + (bh * NQ + qblk) * NK + jj, mask=jval, other=0.0)
        sq = tl.sum(tl.load(M2 + rows, mask=rmask, other=0.0) * tl.math.exp2(invz2[:, None] + 2.0 * mt), 0)
        sq = sq * tl.math.exp2(tl.minimum(v_row * _LOG2E_K, sq_cap))  # capped: see reference
        is_top = (jj[:, None] == top[None, :]) & (om < M)[None, :]  # [BLOCK_NK, MP]
        in_top = tl.sum(is_top.to(tl.int32), 1) > 0
        mass = tl.where(in_top, tl.sum(tl.where(is_top, mass_top[None, :], 0.0), 1), mass)
        sq = tl.where(in_top, tl.sum(tl.where(is_top, sq_top[None, :], 0.0), 1), sq)
        out = (bh * NQ + qblk) * NK + jj
        tl.store(MASS + out, mass, mask=jval)
        tl.store(SQ + out, sq, mask=jval)


def _pooled_inputs(q: torch.Tensor, k: torch.Tensor, group: int, dtype: torch.dtype):
    """Pooled means ``qbar`` ``[B, H, Gq, D]``, ``kbar`` ``[B, H, Gk, D]`` in ``dtype`` (summed in float32), and per
    key group ``log2(count)`` and ``1 / count`` ``[Gk]`` float32; ``Gq = ceil(Lq / group)``, ``Gk = ceil(Lkv / group)``.
    """
    outs = []
    for x in (q, k):
        b, h, length, d = x.shape
        n_groups = cdiv(length, group)
        y = triton_support.new_output((b, h, n_groups, d), dtype=dtype, device=x.device)
        block_g = 32
        _group_mean_kernel[(cdiv(n_groups, block_g), b * h)](
            x, y, x.stride(0), x.stride(1), x.stride(2), h, length, n_groups,
            GROUP=group, BLOCK_G=block_g, HEAD_DIM=d, BLOCK_D=next_power_of_2(d), num_warps=4,
        )  # fmt: skip
        outs.append(y)
    lkv = k.shape[2]
    k_cnt = block_sizes(lkv, group, outs[1].shape[2], k.device).float()
    return outs[0], outs[1], k_cnt.log2(), 1.0 / k_cnt


def _pooled_pass(qbar, kbar, bias, invc, var_g, *, block_q: int, block_kv: int, group: int, cfg: dict):
    """Launch the pooled pass: ``(M1, M2, MT, LSE)``, see the module docstring."""
    b, h, gq, d = qbar.shape
    gk = kbar.shape[2]
    nq, nk = var_g.shape[2], var_g.shape[3]
    gpq, gpk = block_q // group, block_kv // group
    bn = cfg["BLOCK_N"]
    nt = cdiv(nk * gpk, bn)
    dev = qbar.device
    if cfg.get("split"):
        split = min(cfg["split"], nt)
    elif INTERPRETED:
        split = min(2, nt)
    else:  # key tiles split over programs until there are about 16 per SM, each with 4 tiles or more
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        split = max(1, min(nt // 4, cdiv(16 * sms, cdiv(gq, cfg["BLOCK_M"]) * b * h)))
    tps = cdiv(nt, split)
    split = cdiv(nt, tps)
    m1 = triton_support.new_output((b * h, gq, nk), dtype=torch.float32, device=dev)
    m2 = triton_support.new_output((b * h, gq, nk), dtype=torch.float32, device=dev)
    mt = triton_support.new_output((b * h, gq, nt), dtype=torch.float32, device=dev)
    pm = triton_support.new_output((b * h, gq, split), dtype=torch.float32, device=dev)
    pl = triton_support.new_output((b * h, gq, split), dtype=torch.float32, device=dev)
    _pooled_pass_kernel[(cdiv(gq, cfg["BLOCK_M"]), b * h, split)](
        qbar, kbar, bias, invc, var_g, m1, m2, mt, pm, pl,
        gq, gk, nq, nk, nt, tps, split, cfg["qk_scale"], float(group - 1),
        GPQ=gpq, GPK=gpk, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=bn, HEAD_DIM=d, BLOCK_D=next_power_of_2(d),
        UPCAST=dot_upcast(qbar.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    top = pm.amax(-1, keepdim=True)  # finite: split 0 holds a real key group
    lse = (top + (torch.exp2(pm - top) * pl).sum(-1, keepdim=True).log2()).squeeze(-1)
    return m1, m2, mt, lse


def _refine(q, k, qbar, kbar, bias, var_g, passed, *, block_q, block_kv, group, refine_blocks, refine_groups, cfg):
    """Launch the refinement (rank, select, exact, assemble): ``mass``, ``sq_mass`` ``[B, H, Nq, Nk]`` float32."""
    m1, m2, mt, lse = passed
    b, h, lq, d = q.shape
    lkv = k.shape[2]
    gq, gk = qbar.shape[2], kbar.shape[2]
    nq, nk = var_g.shape[2], var_g.shape[3]
    nt = mt.shape[2]
    gpq, gpk = block_q // group, block_kv // group
    m = min(refine_blocks, nk)
    t_sel = min(refine_groups, m * gpk)
    tp = max(2, next_power_of_2(t_sel))
    gpd = max(1, 16 // group)  # query groups per exact-logit tile (tl.dot needs 16 rows)
    mp = max(next_power_of_2(m), cdiv(16, gpk))  # keeps MP * GPK >= 16 for tl.dot
    gpqp = max(gpq, 16)
    kbt = cfg["BLOCK_N"] // gpk
    bnk = next_power_of_2(nk)
    dev = q.device
    bh = b * h
    top = triton_support.new_output((bh, nq, mp), dtype=torch.int32, device=dev)
    nontop = triton_support.new_output((bh, gq), dtype=torch.float32, device=dev)
    _rank_kernel[(nq, bh)](
        m1, mt, lse, top, nontop, lq, gq, nq, nk, nt,
        GROUP=group, GPQ=gpq, KBT=kbt, M=m, MP=mp, BLOCK_NK=bnk,
        num_warps=cfg["rank_warps"], num_stages=1,
    )  # fmt: skip
    sel = triton_support.new_output((bh, gq, tp), dtype=torch.int32, device=dev)
    pos = triton_support.new_output((bh, gq, tp), dtype=torch.int32, device=dev)
    rest = triton_support.new_output((bh, gq), dtype=torch.float32, device=dev)
    p1 = triton_support.new_output((bh, gq, mp), dtype=torch.float32, device=dev)
    p2 = triton_support.new_output((bh, gq, mp), dtype=torch.float32, device=dev)
    _select_kernel[(nq, bh)](
        qbar, kbar, bias, var_g, lse, top, nontop, sel, pos, rest, p1, p2,
        gq, gk, nq, nk, cfg["qk_scale"], math.log2(group), float(group - 1),
        GPQ=gpq, GPQP=gpqp, GPK=gpk, M=m, MP=mp, T=t_sel, TP=tp,
        HEAD_DIM=d, BLOCK_D=next_power_of_2(d), UPCAST=dot_upcast(q.dtype),
        num_warps=cfg["select_warps"], num_stages=1,
    )  # fmt: skip
    c1 = triton_support.new_output((bh, gq, mp), dtype=torch.float32, device=dev)
    c2 = triton_support.new_output((bh, gq, mp), dtype=torch.float32, device=dev)
    iz = triton_support.new_output((bh, gq), dtype=torch.float32, device=dev)
    iz2 = triton_support.new_output((bh, gq), dtype=torch.float32, device=dev)
    pairs = cfg["exact_pairs"]
    _exact_kernel[(cdiv(cdiv(gq, gpd), pairs), bh)](
        q, k, sel, pos, rest, lse, p1, p2, c1, c2, iz, iz2,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        h, lq, lkv, gq, cfg["qk_scale"],
        GROUP=group, GPD=gpd, MP=mp, T=t_sel, TP=tp, HEAD_DIM=d, BLOCK_D=next_power_of_2(d),
        UPCAST=dot_upcast(q.dtype), PAIRS=pairs, num_warps=cfg["exact_warps"], num_stages=cfg["exact_stages"],
    )  # fmt: skip
    mass = triton_support.new_output((b, h, nq, nk), dtype=torch.float32, device=dev)
    sq_mass = triton_support.new_output((b, h, nq, nk), dtype=torch.float32, device=dev)
    _assemble_kernel[(nq, bh)](
        var_g, m1, m2, mt, lse, top, c1, c2, iz, iz2, mass, sq_mass,
        lq, gq, nq, nk, nt, math.log2(group),
        GROUP=group, GPQ=gpq, GPQP=gpqp, KBT=kbt, M=m, MP=mp, BLOCK_NK=bnk,
        num_warps=cfg["assemble_warps"], num_stages=1,
    )  # fmt: skip
    return mass, sq_mass


def _check_int(name: str, val, minimum: int = 1) -> None:
    if isinstance(val, bool) or not isinstance(val, int) or val < minimum:
        raise ValueError(f"{name}={val!r} must be an integer >= {minimum}")


def estimate_pyramid_statistics_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_q: int,
    block_kv: int,
    scale: float | None = None,
    group: int = 8,
    refine_blocks: int = 16,
    refine_groups: int = 16,
    var: torch.Tensor | None = None,
    config: dict[str, int] | None = None,
) -> PyramidStats:
    """Block mass, squared mass and pooling blur of every (query block, KV block) pair, on the GPU.

    q: ``[B, H, Lq, D]``, k: ``[B, H, Lkv, D]`` (any strides with a contiguous last dim).
    ``var``: the ``[B, H, Nq, Nk, 3]`` float32 result of
    :func:`..variance.reference.pooled_logit_variance_reference` for the same inputs (computed
    here when None); it is returned as ``logit_var``. Same result as
    :func:`.reference.estimate_pyramid_statistics_reference` up to float32 rounding,
    the bf16/fp16 products of the inputs' dtype (the pooled ``qbar``, ``kbar`` are rounded
    to it), and the order of blocks or groups whose ranking scores tie within rounding.
    Needs ``block_q``, ``block_kv`` and ``group`` powers of two, ``group >= 8`` dividing both
    blocks. Memory: ``3 * B * H * ceil(Lq / group) * Nk`` float32 besides the outputs, and about
    ``6 * refine_groups`` values per query group for the refinement's intermediate arrays.
    ``config`` overrides tile sizes (benchmarks only).
    """
    check_supported(q, k, names=("q", "k"))
    for name, val in (("block_q", block_q), ("block_kv", block_kv), ("group", group)):
        _check_int(name, val)
        if val & (val - 1):
            raise ValueError(f"{name}={val} must be a power of two")
    _check_int("refine_blocks", refine_blocks)
    _check_int("refine_groups", refine_groups)
    if group < 8:
        raise ValueError(f"group={group} must be at least 8")
    if block_q % group or block_kv % group:
        raise ValueError(f"group={group} must divide block_q={block_q} and block_kv={block_kv}")
    if block_q < 16:
        raise ValueError(f"block_q={block_q} must be at least 16")
    b, h, lq, d = q.shape
    lkv = k.shape[2]
    scale = d**-0.5 if scale is None else float(scale)
    nq, nk = cdiv(lq, block_q), cdiv(lkv, block_kv)
    if var is None:
        var = pooled_logit_variance_reference(q, k, block_q=block_q, block_kv=block_kv, scale=scale)
    if tuple(var.shape) != (b, h, nq, nk, len(POOLED_LEVELS)) or var.dtype != torch.float32:
        want = (b, h, nq, nk, len(POOLED_LEVELS))
        raise ValueError(f"var has shape {tuple(var.shape)} and dtype {var.dtype}; expected {want} float32")
    if var.device != q.device:
        raise ValueError(f"var is on {var.device} but q is on {q.device}")
    var_g = group_logit_variance(var, group).contiguous()  # [B, H, Nq, Nk]
    q, k = last_dim_contiguous(q), last_dim_contiguous(k)
    qbar, kbar, bias, passed, cfg = pooled_stage(
        q, k, var_g, block_q=block_q, block_kv=block_kv, group=group, scale=scale, config=config
    )
    mass, sq_mass = _refine(
        q, k, qbar, kbar, bias, var_g, passed,
        block_q=block_q, block_kv=block_kv, group=group, refine_blocks=refine_blocks,
        refine_groups=refine_groups, cfg=cfg,
    )  # fmt: skip
    return PyramidStats(mass, sq_mass, var)


def pooled_stage(q, k, var_g, *, block_q: int, block_kv: int, group: int, scale: float, config: dict | None):
    """Kernels 0 and 1 (group means, pooled pass) on checked inputs: ``(qbar, kbar, bias, passed, cfg)``.

    ``var_g`` ``[B, H, Nq, Nk]`` float32 contiguous; ``passed`` = ``(M1, M2, MT, LSE)``; ``cfg`` the
    tile configuration the refinement uses too. Separate so that ``benchmarks/budget_cost.py`` can
    time the estimate without its refinement.
    """
    cfg = kernel_config("budget.statistics", device=q.device, head_dim=q.shape[-1], dtype=q.dtype, override=config)
    cfg["BLOCK_N"] = max(cfg["BLOCK_N"], block_kv // group, 16)
    cfg["qk_scale"] = scale * LOG2E
    if cfg["BLOCK_N"] % (block_kv // group):
        raise ValueError(
            f"config BLOCK_N={cfg['BLOCK_N']} must be a multiple of block_kv // group = {block_kv // group}"
        )
    pooled_dtype = torch.float32 if cfg["pooled_fp32"] else q.dtype
    qbar, kbar, bias, invc = _pooled_inputs(q, k, group, pooled_dtype)
    passed = _pooled_pass(qbar, kbar, bias, invc, var_g, block_q=block_q, block_kv=block_kv, group=group, cfg=cfg)
    return qbar, kbar, bias, passed, cfg
