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
ever stored.
"""

from __future__ import annotations

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

if HAS_TRITON:

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
    def _importance_kernel(
        Q, K, OUT,
        sqb, sqh, sqm, skb, skh, skn, sob, soh, som,
        H, LQ, LKV, NQ, NK, qk_scale,
        STRIDE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr,
        SPQ: tl.constexpr, SPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        QB: tl.constexpr = BLOCK_M // SPQ
        KB: tl.constexpr = BLOCK_N // SPK
        pid = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HEAD_DIM

        r = tl.arange(0, BLOCK_M)
        qblk = pid * QB + r // SPQ
        qoff = (r % SPQ) * STRIDE
        qpos = qblk * BLOCK_Q + qoff
        qvalid = (qblk < NQ) & (qoff < BLOCK_Q) & (qpos < LQ)
        q = tl.load(
            Q + b * sqb + h * sqh + qpos[:, None] * sqm + offs_d[None, :],
            mask=qvalid[:, None] & dmask[None, :],
            other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
        kbase = K + b * skb + h * skh
        n_tiles = tl.cdiv(NK, KB)

        # pass 1: row max and sum over every sampled key
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for t in range(0, n_tiles):
            s = _sampled_logits(q, kbase, skn, t, LKV, NK, qk_scale, offs_d, dmask,
                                STRIDE, BLOCK_KV, SPK, KB, BLOCK_N, UPCAST)  # fmt: skip
            m_new = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
            m_i = m_new

        # weight of each sampled query: 1 / (its softmax sum * the number of samples of its block)
        n_samples = tl.sum(tl.reshape(qvalid.to(tl.float32), (QB, SPQ)), axis=1)  # [QB]
        per_row = tl.reshape(tl.broadcast_to(n_samples[:, None], (QB, SPQ)), (BLOCK_M,))
        w = tl.where(qvalid, 1.0 / (l_i * tl.maximum(per_row, 1.0)), 0.0)

        # pass 2: normalised probabilities, summed per (query block, KV block)
        oq = pid * QB + tl.arange(0, QB)
        out_base = OUT + b * sob + h * soh + oq[:, None] * som
        for t in range(0, n_tiles):
            s = _sampled_logits(q, kbase, skn, t, LKV, NK, qk_scale, offs_d, dmask,
                                STRIDE, BLOCK_KV, SPK, KB, BLOCK_N, UPCAST)  # fmt: skip
            p = tl.math.exp2(s - m_i[:, None]) * w[:, None]
            p = tl.sum(tl.reshape(p, (BLOCK_M, KB, SPK)), axis=2)  # [BLOCK_M, KB]
            p = tl.sum(tl.reshape(p, (QB, SPQ, KB)), axis=1)  # [QB, KB]
            ok = t * KB + tl.arange(0, KB)
            tl.store(out_base + ok[None, :], p, mask=(oq < NQ)[:, None] & (ok < NK)[None, :])


def estimate_block_importance_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_q: int,
    block_kv: int,
    stride: int = 8,
    scale: float | None = None,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Sampled block attention mass ``S`` ``[B, H, Nq, Nk]`` float32, each row summing to 1.

    q: ``[B, H, Lq, D]``, k: ``[B, H, Lkv, D]`` (any strides with a contiguous
    last dim). Same result as :func:`.reference.estimate_block_importance_reference`
    (up to float32 rounding and the bf16/fp16 products of the inputs' dtype).
    Costs about ``2 / stride**2`` of dense ``QK^T``; memory: the output only.
    ``config`` overrides tile sizes (benchmarks only).
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
    out = triton_support.new_output((b, h, nq, nk), dtype=torch.float32, device=q.device)
    grid = (cdiv(nq, cfg["BLOCK_M"] // spq), b * h)
    _importance_kernel[grid](
        q, k, out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        h, lq, lkv, nq, nk, scale * LOG2E,
        STRIDE=stride, BLOCK_Q=block_q, BLOCK_KV=block_kv, SPQ=spq, SPK=spk,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], HEAD_DIM=d, BLOCK_D=next_power_of_2(d),
        UPCAST=dot_upcast(q.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return out
