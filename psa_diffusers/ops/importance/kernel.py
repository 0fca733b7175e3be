"""Sampled block attention mass on the GPU (Triton).

Same math as :func:`.reference.estimate_block_importance_reference`: every
``stride``-th token of each block (offsets 0, stride, ... inside the block) is
sampled; each sampled query runs a full softmax over all sampled keys; ``S[i, j]``
is the probability mass the sampled queries of query block ``i`` put on the
sampled keys of KV block ``j``, averaged over those queries.

Samples sit on a padded grid: query block ``i`` owns slots
``[i*SPQ, (i+1)*SPQ)`` with ``SPQ = next_pow2(ceil(block_q / stride))``; a slot
is real when its offset ``slot*stride`` lies inside the block and the sequence.
One program owns ``BLOCK_M`` slots (``BLOCK_M / SPQ`` whole query blocks) and
makes two passes over the sampled keys: the first finds each row's max and sum
(online, as flash attention does), the second recomputes the logits, normalises
them and reduces each ``[SPQ, SPK]`` sub-tile to one number, so the program
writes finished rows of ``S`` and nothing of size ``[L/stride, L/stride]`` is
ever stored. ``PAST_ONLY`` (causal rules read only the blocks wholly before their query block) stops the
second pass after the program's last key tile with such a block and writes zeros for every other
entry. With ``ONE_PASS`` (a key of the ``"importance"`` table entries, or
``config={"ONE_PASS": True}``) it makes one pass instead, as the statistics kernel
below does (and with its helpers): per key tile, the unnormalised block sums against
the running max, and that max, go to float32 scratch ``[B*H, Nq*SPQ, Nk]`` (and
``[B*H, Nq*SPQ, n_tiles]``) that the same program reads back after a barrier, rescaled
by ``exp2(m_tile - m_final)`` and weighted by ``1 / (l_final * samples of the block)``.

``estimate_block_statistics_triton`` (same math as
:func:`.reference.estimate_block_statistics_reference`) samples keys at half the query stride
and adds each head's sink keys, and makes *one* pass over the keys: for every key tile it
stores, per sampled query and KV block, the unnormalised sums of ``p`` and ``p**2 / w`` taken
against the running maximum of that tile (``[rows, Nk]`` float32 scratch, written and read back
by the same program, so it stays in L2), with that maximum (``[rows, n_tiles]``). A closing loop,
with no logits recomputed, rescales them by ``exp2(m_tile - m_final) / l_final``, adds the sink
keys (kept in registers: at most 16 per head) and sums the block's sampled queries. So twice
the keys of the published estimate cost the same ``QK^T`` as its two passes.
"""

from __future__ import annotations

import math

import torch

from .. import triton_support
from ..kernel_configs import kernel_config
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
from .reference import SPIKE_SHARE, BlockStatistics, key_sample_stride

if HAS_TRITON:
    from ..triton_support import finite

    @triton.jit
    def _sampled_logits(
        q, K, skn, t, LKV, NK, qk_scale, offs_d, dmask,
        STRIDE: tl.constexpr, BLOCK_KV: tl.constexpr, SPK: tl.constexpr, KB: tl.constexpr,
        BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        """Scaled log2-domain logits of the sampled queries against key tile ``t``; -inf off the samples."""
        c = tl.arange(0, BLOCK_N)
        kblk = t * KB + c // SPK
        koff = (c % SPK) * STRIDE
        kpos = kblk * BLOCK_KV + koff
        kvalid = (kblk < NK) & (koff < BLOCK_KV) & (kpos < LKV)
        k = tl.load(K + kpos[:, None] * skn + offs_d[None, :], mask=kvalid[:, None] & dmask[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        return tl.where(kvalid[None, :], s, float("-inf"))

    @triton.jit
    def _online_tile(s, m_i, l_i):
        """One online-softmax step over log2-domain logits ``s``: ``p`` against the new row max, that max, the sum."""
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        return p, m_new, l_i * tl.math.exp2(m_i - m_new) + tl.sum(p, 1)

    @triton.jit
    def _scratch_tile(row, t, NK, qvalid, KB: tl.constexpr):
        """Offsets ``row * NK + kv block`` of key tile ``t``'s ``KB`` KV blocks in a ``[rows, NK]`` scratch, and
        their mask (real samples and KV blocks only)."""
        kt = t * KB + tl.arange(0, KB)
        return row[:, None] * NK + kt[None, :], qvalid[:, None] & (kt < NK)[None, :]

    @triton.jit
    def _tile_scale(MT, row, t, NT, m_i, inv_l, qvalid):
        """``exp2(m_tile - m_final) * inv_l`` per row: what turns tile ``t``'s scratch sums into probabilities."""
        mt = tl.load(MT + row * NT + t, mask=qvalid, other=0.0)
        return tl.math.exp2(mt - m_i) * inv_l

    @triton.jit
    def _kv_block_sums(x, BLOCK_M: tl.constexpr, KB: tl.constexpr, SPK: tl.constexpr):
        """``[BLOCK_M, BLOCK_N]`` -> ``[BLOCK_M, KB]``: the sum over each KV block's ``SPK`` sampled keys."""
        return tl.sum(tl.reshape(x, (BLOCK_M, KB, SPK)), axis=2)

    @triton.jit
    def _store_block_rows(out_base, p, oq, t, NQ, NK, QB: tl.constexpr, SPQ: tl.constexpr, KB: tl.constexpr):
        """Sum ``p`` ``[QB*SPQ, KB]`` over each query block's sampled rows; store it at tile ``t``'s KV blocks."""
        p = tl.sum(tl.reshape(p, (QB, SPQ, KB)), axis=1)  # [QB, KB]
        ok = t * KB + tl.arange(0, KB)
        tl.store(out_base + ok[None, :], p, mask=(oq < NQ)[:, None] & (ok < NK)[None, :])

    @triton.jit
    def _past_only_rows(p, qblk, t, BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, KB: tl.constexpr,
                        PAST_ONLY: tl.constexpr):  # fmt: skip
        """``p`` ``[BLOCK_M, KB]`` (sampled rows of query blocks ``qblk`` against tile ``t``'s KV blocks) with the
        KV blocks not wholly before the row's query block zeroed (``PAST_ONLY``; otherwise ``p`` itself)."""
        if PAST_ONLY:
            kt = t * KB + tl.arange(0, KB)
            p = tl.where((kt[None, :] + 1) * BLOCK_KV <= qblk[:, None] * BLOCK_Q, p, 0.0)
        return p

    @triton.jit
    def _past_tiles(pid, n_tiles, NQ, BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, QB: tl.constexpr,
                    KB: tl.constexpr, PAST_ONLY: tl.constexpr):  # fmt: skip
        """The key tiles holding a KV block wholly before one of program ``pid``'s query blocks (``PAST_ONLY``;
        otherwise all ``n_tiles``): the tiles after them hold no entry a causal rule reads."""
        if PAST_ONLY:
            q_last = tl.minimum(pid * QB + QB, NQ) - 1
            return tl.minimum(tl.cdiv((q_last * BLOCK_Q) // BLOCK_KV, KB), n_tiles)
        return n_tiles

    @triton.jit
    def _sampled_query_rows(pid, LQ, NQ, STRIDE: tl.constexpr, BLOCK_Q: tl.constexpr, SPQ: tl.constexpr,
                            BLOCK_M: tl.constexpr):  # fmt: skip
        """Program ``pid``'s ``BLOCK_M`` sample slots: slot index, query block, token position, and whether the
        slot is a real sampled query (inside its block and the sequence)."""
        r = tl.arange(0, BLOCK_M)
        qblk = pid * (BLOCK_M // SPQ) + r // SPQ
        qoff = (r % SPQ) * STRIDE
        qpos = qblk * BLOCK_Q + qoff
        return r, qblk, qpos, (qblk < NQ) & (qoff < BLOCK_Q) & (qpos < LQ)

    @triton.jit
    def _importance_kernel(
        Q, K, OUT, U, MT,
        sqb, sqh, sqm, skb, skh, skn, sob, soh, som,
        H, LQ, LKV, NQ, NK, ROWS, qk_scale,
        STRIDE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr,
        SPQ: tl.constexpr, SPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, ONE_PASS: tl.constexpr,
        PAST_ONLY: tl.constexpr,
    ):  # fmt: skip
        QB: tl.constexpr = BLOCK_M // SPQ
        KB: tl.constexpr = BLOCK_N // SPK
        pid = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HEAD_DIM

        r, qblk, qpos, qvalid = _sampled_query_rows(pid, LQ, NQ, STRIDE, BLOCK_Q, SPQ, BLOCK_M)
        q = tl.load(
            Q + b * sqb + h * sqh + qpos[:, None] * sqm + offs_d[None, :],
            mask=qvalid[:, None] & dmask[None, :],
            other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
        kbase = K + b * skb + h * skh
        n_tiles = tl.cdiv(NK, KB)
        # weight of each sampled query: 1 / (its softmax sum * the number of samples of its block)
        n_samples = tl.sum(tl.reshape(qvalid.to(tl.float32), (QB, SPQ)), axis=1)  # [QB]
        per_row = tl.reshape(tl.broadcast_to(n_samples[:, None], (QB, SPQ)), (BLOCK_M,))
        oq = pid * QB + tl.arange(0, QB)
        out_base = OUT + b * sob + h * soh + oq[:, None] * som

        # the running row max and sum over every sampled key
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        # PAST_ONLY: rows are written up to the last tile with a past block of this program, zeros after
        t_end = _past_tiles(pid, n_tiles, NQ, BLOCK_Q, BLOCK_KV, QB, KB, PAST_ONLY)
        if ONE_PASS:
            # one pass: per tile, the unnormalised block sums against the running max, and that max, to scratch
            # (only this program's rows: no other program touches them)
            row = pid_bh.to(tl.int64) * ROWS + qblk.to(tl.int64) * SPQ + r % SPQ
            for t in range(0, n_tiles):
                s = _sampled_logits(q, kbase, skn, t, LKV, NK, qk_scale, offs_d, dmask,
                                    STRIDE, BLOCK_KV, SPK, KB, BLOCK_N, UPCAST)  # fmt: skip
                p, m_i, l_i = _online_tile(s, m_i, l_i)
                offs, smask = _scratch_tile(row, t, NK, qvalid, KB)
                tl.store(U + offs, _kv_block_sums(p, BLOCK_M, KB, SPK), mask=smask)
                tl.store(MT + row * n_tiles + t, m_i, mask=qvalid)
            # the closing loop reads entries other threads of this program wrote: make their stores visible
            tl.debug_barrier()
            w = tl.where(qvalid, 1.0 / (l_i * tl.maximum(per_row, 1.0)), 0.0)
            for t in range(0, t_end):
                offs, smask = _scratch_tile(row, t, NK, qvalid, KB)
                f = _tile_scale(MT, row, t, n_tiles, m_i, w, qvalid)
                p = tl.load(U + offs, mask=smask, other=0.0) * f[:, None]  # [BLOCK_M, KB]
                p = _past_only_rows(p, qblk, t, BLOCK_Q, BLOCK_KV, KB, PAST_ONLY)
                _store_block_rows(out_base, p, oq, t, NQ, NK, QB, SPQ, KB)
        else:
            # pass 1: row max and sum
            for t in range(0, n_tiles):
                s = _sampled_logits(q, kbase, skn, t, LKV, NK, qk_scale, offs_d, dmask,
                                    STRIDE, BLOCK_KV, SPK, KB, BLOCK_N, UPCAST)  # fmt: skip
                _, m_i, l_i = _online_tile(s, m_i, l_i)
            w = tl.where(qvalid, 1.0 / (l_i * tl.maximum(per_row, 1.0)), 0.0)

            # pass 2: normalised probabilities, summed per (query block, KV block)
            for t in range(0, t_end):
                s = _sampled_logits(q, kbase, skn, t, LKV, NK, qk_scale, offs_d, dmask,
                                    STRIDE, BLOCK_KV, SPK, KB, BLOCK_N, UPCAST)  # fmt: skip
                p = _kv_block_sums(tl.math.exp2(s - m_i[:, None]) * w[:, None], BLOCK_M, KB, SPK)
                p = _past_only_rows(p, qblk, t, BLOCK_Q, BLOCK_KV, KB, PAST_ONLY)
                _store_block_rows(out_base, p, oq, t, NQ, NK, QB, SPQ, KB)
        if PAST_ONLY:
            for t in range(t_end, n_tiles):
                _store_block_rows(out_base, tl.zeros([BLOCK_M, KB], dtype=tl.float32), oq, t, NQ, NK, QB, SPQ, KB)

    @triton.jit
    def _stride_logits(
        q, K, skn, t, LKV, NK, qk_scale, log2_w, offs_d, dmask, spos,
        KSTRIDE: tl.constexpr, BLOCK_KV: tl.constexpr, SPK: tl.constexpr, KB: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """log2-domain logits (with each sample's log2 weight) of the sampled queries against key tile ``t``;
        -inf off the samples and on samples that are sink keys (``spos``: counted as sinks)."""
        c = tl.arange(0, BLOCK_N)
        kblk = t * KB + c // SPK
        koff = (c % SPK) * KSTRIDE
        kpos = kblk * BLOCK_KV + koff
        kvalid = (kblk < NK) & (koff < BLOCK_KV) & (kpos < LKV)
        kvalid = kvalid & (tl.sum((kpos[:, None] == spos[None, :]).to(tl.int32), 1) == 0)
        k = finite(
            tl.load(K + kpos[:, None] * skn + offs_d[None, :], mask=kvalid[:, None] & dmask[None, :], other=0.0)
        )
        s = tl.dot(q, tl.trans(k)) * qk_scale + log2_w
        return tl.where(kvalid[None, :], s, float("-inf"))

    @triton.jit
    def _block_stats_kernel(
        Q, K, SINKS, MASS, SQ, SPIKE, QSQ, U1, U2, MT,
        sqb, sqh, sqm, skb, skh, skn, ssb, ssh, sob, soh, som, sqsb, sqsh,
        H, LQ, LKV, NQ, NK, NT, NS, ROWS, qk_scale, log2_w, spike_share,
        STRIDE: tl.constexpr, KSTRIDE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr,
        SPQ: tl.constexpr, SPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        MS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        QB: tl.constexpr = BLOCK_M // SPQ
        KB: tl.constexpr = BLOCK_N // SPK
        pid = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HEAD_DIM

        r, qblk, qpos, qvalid = _sampled_query_rows(pid, LQ, NQ, STRIDE, BLOCK_Q, SPQ, BLOCK_M)
        q = finite(tl.load(Q + b * sqb + h * sqh + qpos[:, None] * sqm + offs_d[None, :],
                            mask=qvalid[:, None] & dmask[None, :], other=0.0))  # fmt: skip
        kbase = K + b * skb + h * skh
        row = pid_bh.to(tl.int64) * ROWS + qblk.to(tl.int64) * SPQ + r % SPQ  # scratch row of each sampled query
        oq = pid * QB + tl.arange(0, QB)
        n_samples = tl.sum(tl.reshape(qvalid.to(tl.float32), (QB, SPQ)), axis=1)  # [QB]
        qsq = tl.sum(tl.reshape(tl.sum(q * q, 1), (QB, SPQ)), axis=1) / tl.maximum(n_samples, 1.0)
        tl.store(QSQ + b * sqsb + h * sqsh + oq, qsq, mask=oq < NQ)

        # the sink keys (weight 1; -1 marks none); a sampled key that is a sink is counted here only
        sk = tl.arange(0, MS)
        spos = tl.load(SINKS + b * ssb + h * ssh + sk, mask=sk < NS, other=-1)
        svalid = (spos >= 0) & (spos < LKV)
        spos = tl.where(svalid, spos, -1)
        ks = finite(tl.load(kbase + spos[:, None] * skn + offs_d[None, :], mask=svalid[:, None] & dmask[None, :],
                             other=0.0))  # fmt: skip
        s_sink = tl.where(svalid[None, :], tl.dot(q, tl.trans(ks)) * qk_scale, float("-inf"))  # [BLOCK_M, MS]
        m_i = tl.max(s_sink, 1)
        m_i = tl.where(m_i == float("-inf"), -1.0e30, m_i)
        l_i = tl.sum(tl.math.exp2(s_sink - m_i[:, None]), 1)

        # one pass over the strided samples: per tile, unnormalised block sums against the running max
        for t in range(0, NT):
            s = _stride_logits(q, kbase, skn, t, LKV, NK, qk_scale, log2_w, offs_d, dmask, spos,
                               KSTRIDE, BLOCK_KV, SPK, KB, BLOCK_N)  # fmt: skip
            p, m_i, l_i = _online_tile(s, m_i, l_i)
            offs, smask = _scratch_tile(row, t, NK, qvalid, KB)
            tl.store(U1 + offs, _kv_block_sums(p, BLOCK_M, KB, SPK), mask=smask)
            tl.store(U2 + offs, _kv_block_sums(p * p, BLOCK_M, KB, SPK), mask=smask)
            tl.store(MT + row * NT + t, m_i, mask=qvalid)
        tl.debug_barrier()

        # closing loop: rescale to the final max and sum, add the sinks, sum each block's sampled queries
        inv_l = tl.where(qvalid, 1.0 / l_i, 0.0)
        p_sink = tl.math.exp2(s_sink - m_i[:, None]) * inv_l[:, None]  # [BLOCK_M, MS]
        sblk = tl.where(svalid, spos // BLOCK_KV, -1)
        inv_w = tl.math.exp2(-log2_w)
        out_rows = (oq < NQ)[:, None]
        for t in range(0, NT):
            kt = t * KB + tl.arange(0, KB)
            offs, smask = _scratch_tile(row, t, NK, qvalid, KB)
            f = _tile_scale(MT, row, t, NT, m_i, inv_l, qvalid)
            w1 = tl.load(U1 + offs, mask=smask, other=0.0) * f[:, None]
            w2 = tl.load(U2 + offs, mask=smask, other=0.0) * (f * f * inv_w)[:, None]
            hit = (sblk[:, None] == kt[None, :]).to(tl.float32)  # [MS, KB]
            c1 = tl.sum(p_sink[:, :, None] * hit[None, :, :], 1)  # [BLOCK_M, KB] sink mass per block
            c2 = tl.sum((p_sink * p_sink)[:, :, None] * hit[None, :, :], 1)
            per = 1.0 / tl.maximum(n_samples, 1.0)[:, None]
            mass = tl.sum(tl.reshape(w1 + c1, (QB, SPQ, KB)), axis=1) * per
            sq = tl.sum(tl.reshape(w2 + c2, (QB, SPQ, KB)), axis=1)
            sink_mass = tl.sum(tl.reshape(c1, (QB, SPQ, KB)), axis=1) * per
            omask = out_rows & (kt < NK)[None, :]
            out = b * sob + h * soh + oq[:, None] * som + kt[None, :]
            tl.store(MASS + out, mass, mask=omask)
            tl.store(SQ + out, sq, mask=omask)
            tl.store(SPIKE + out, (sink_mass > spike_share * mass).to(tl.int8), mask=omask)


def estimate_block_importance_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_q: int,
    block_kv: int,
    stride: int = 8,
    scale: float | None = None,
    past_only: bool = False,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Sampled block attention mass ``S`` ``[B, H, Nq, Nk]`` float32, each row summing to 1.

    q: ``[B, H, Lq, D]``, k: ``[B, H, Lkv, D]`` (any strides with a contiguous
    last dim). Same result as :func:`.reference.estimate_block_importance_reference`
    (up to float32 rounding and the bf16/fp16 products of the inputs' dtype).
    Costs about ``2 / stride**2`` of dense ``QK^T``; memory: the output only. With ``"ONE_PASS"`` (a key of
    the ``"importance"`` entry, or ``config={"ONE_PASS": True}``) it makes one pass over the keys instead
    (``1 / stride**2``; see the module docstring) and takes ``B * H * Nq * next_pow2(block_q / stride) * Nk``
    float32 of scratch. ``past_only`` (causal self-attention): the entries of KV blocks wholly before their
    query block are the same, every other entry is 0, and the second pass skips each program's key tiles
    past its last query block (about half of it). ``config`` overrides tile sizes (benchmarks only).
    """
    check_supported(q, k, names=("q", "k"))
    for name, val in (("block_q", block_q), ("block_kv", block_kv), ("stride", stride)):
        if not isinstance(val, int) or val < 1:
            raise ValueError(f"{name}={val!r} must be a positive integer")
    if block_q & (block_q - 1) or block_kv & (block_kv - 1):
        raise ValueError(f"block_q={block_q} and block_kv={block_kv} must be powers of two")
    b, h, lq, d = q.shape
    lkv = k.shape[2]
    scale = d**-0.5 if scale is None else float(scale)
    q, k = last_dim_contiguous(q), last_dim_contiguous(k)
    nq, nk = cdiv(lq, block_q), cdiv(lkv, block_kv)
    spq = next_power_of_2(cdiv(block_q, stride))
    spk = next_power_of_2(cdiv(block_kv, stride))
    cfg = kernel_config("importance", device=q.device, head_dim=d, dtype=q.dtype, override=config)
    cfg["BLOCK_M"], cfg["BLOCK_N"] = max(cfg["BLOCK_M"], spq, 16), max(cfg["BLOCK_N"], spk, 16)
    one_pass = bool(cfg["ONE_PASS"])
    out = triton_support.new_output((b, h, nq, nk), dtype=torch.float32, device=q.device)
    rows = nq * spq
    # the one-pass scratch (block sums against each tile's running max, and that max); unused otherwise
    u, mt = _tile_scratch(1, b * h, rows, nk, cdiv(nk, cfg["BLOCK_N"] // spk), q.device) if one_pass else (out, out)
    grid = (cdiv(nq, cfg["BLOCK_M"] // spq), b * h)
    _importance_kernel[grid](
        q, k, out, u, mt,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        h, lq, lkv, nq, nk, rows, scale * LOG2E,
        STRIDE=stride, BLOCK_Q=block_q, BLOCK_KV=block_kv, SPQ=spq, SPK=spk,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], HEAD_DIM=d, BLOCK_D=next_power_of_2(d),
        UPCAST=dot_upcast(q.dtype), ONE_PASS=one_pass, PAST_ONLY=bool(past_only), num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )  # fmt: skip
    return out


def _tile_scratch(n_sums: int, bh: int, rows: int, nk: int, n_tiles: int, device) -> tuple[torch.Tensor, ...]:
    """Scratch of the one-pass kernels: ``n_sums`` ``[bh, rows, nk]`` float32 block sums, then ``[bh, rows, n_tiles]``
    tile maxima. Allocated like outputs (NaN-poisoned under the tests), since every entry the kernels read back
    must have been written by the same program first."""
    sums = [triton_support.new_output((bh, rows, nk), dtype=torch.float32, device=device) for _ in range(n_sums)]
    return (*sums, triton_support.new_output((bh, rows, n_tiles), dtype=torch.float32, device=device))


MAX_SINKS = 16
"""Sink keys per head the statistics kernel takes (they stay in registers)."""


def estimate_block_statistics_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_q: int,
    block_kv: int,
    stride: int = 8,
    sinks: torch.Tensor | None = None,
    scale: float | None = None,
    config: dict[str, int] | None = None,
) -> BlockStatistics:
    """:class:`BlockStatistics` of q ``[B, H, Lq, D]`` against k in one launch (see the module docstring).

    Same result as :func:`.reference.estimate_block_statistics_reference` up to float32 rounding
    (and the bf16/fp16 products of the inputs' dtype; a spike share within rounding of
    ``SPIKE_SHARE`` may flip). ``sinks``: ``[B, H, m]`` int64 key positions, ``m <= MAX_SINKS``.
    Scratch: ``2 * B * H * Nq * (block_q / stride) * Nk`` float32 (2/64 of ``Lq * Nk`` floats per head at
    stride 8). ``config`` overrides tile sizes (the ``"importance"`` entry).
    """
    check_supported(q, k, names=("q", "k"))
    for name, val in (("block_q", block_q), ("block_kv", block_kv), ("stride", stride)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name}={val!r} must be a positive integer")
    if block_q & (block_q - 1) or block_kv & (block_kv - 1):
        raise ValueError(f"block_q={block_q} and block_kv={block_kv} must be powers of two")
    b, h, lq, d = q.shape
    lkv = k.shape[2]
    scale = d**-0.5 if scale is None else float(scale)
    q, k = last_dim_contiguous(q), last_dim_contiguous(k)
    nq, nk = cdiv(lq, block_q), cdiv(lkv, block_kv)
    ks = key_sample_stride(stride)
    spq = next_power_of_2(cdiv(block_q, stride))
    spk = next_power_of_2(cdiv(block_kv, ks))
    if sinks is None:
        sinks = torch.full((b, h, 1), -1, dtype=torch.int64, device=q.device)
    if sinks.dim() != 3 or tuple(sinks.shape[:2]) != (b, h) or not 1 <= sinks.shape[2] <= MAX_SINKS:
        raise ValueError(f"sinks must have shape [{b}, {h}, m] with 1 <= m <= {MAX_SINKS}, got {tuple(sinks.shape)}")
    sinks = sinks.to(device=q.device, dtype=torch.int64).contiguous()
    cfg = kernel_config("importance", device=q.device, head_dim=d, dtype=q.dtype, override=config)
    block_m, block_n = max(cfg["BLOCK_M"], spq, 16), max(cfg["BLOCK_N"], spk, 16)
    n_tiles = cdiv(nk, block_n // spk)
    rows = nq * spq
    dev = q.device
    mass = triton_support.new_output((b, h, nq, nk), dtype=torch.float32, device=dev)
    sq = triton_support.new_output((b, h, nq, nk), dtype=torch.float32, device=dev)
    spike = triton_support.new_output((b, h, nq, nk), dtype=torch.int8, device=dev)
    q_sq = triton_support.new_output((b, h, nq), dtype=torch.float32, device=dev)
    u1, u2, mt = _tile_scratch(2, b * h, rows, nk, n_tiles, dev)
    grid = (cdiv(nq, block_m // spq), b * h)
    _block_stats_kernel[grid](
        q, k, sinks, mass, sq, spike, q_sq, u1, u2, mt,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        sinks.stride(0), sinks.stride(1), mass.stride(0), mass.stride(1), mass.stride(2),
        q_sq.stride(0), q_sq.stride(1),
        h, lq, lkv, nq, nk, n_tiles, sinks.shape[2], rows, scale * LOG2E, math.log2(ks), SPIKE_SHARE,
        STRIDE=stride, KSTRIDE=ks, BLOCK_Q=block_q, BLOCK_KV=block_kv, SPQ=spq, SPK=spk,
        BLOCK_M=block_m, BLOCK_N=block_n, MS=MAX_SINKS, HEAD_DIM=d, BLOCK_D=next_power_of_2(d),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return BlockStatistics(mass, sq, spike.bool(), q_sq)
