"""Importance -> levels -> caps -> forced text -> compact mask, in one Triton launch.

Same rules as ``reference.choose_levels_reference`` (docs/design.md, section 2; ``levels_from_importance``
then the similarity cap, then the forced text levels, then
``PyramidBlockMask.from_valid_level_map``), for one query-block row per program:

1. sort the row's competing blocks (the first ``num_kv_blocks`` columns) by
   importance, descending, ties to the lower block id (a stable sort);
2. quota mode: rank ``r`` gets the level of the first cumulative bound above
   ``r``; mass mode: the level of the first threshold above the mass of its
   predecessors (the row normalised to sum 1), the first ``ceil(min_full_share *
   n)`` ranks at level 1; the best block is always level 1;
3. a non-skipped level becomes ``min(level, cap[j])`` when caps are given;
4. KV blocks from ``num_kv_blocks`` on, and every block of query rows from
   ``num_q_blocks`` on, are level 1 (text);
5. a second sort by (level group, block id) writes ``kv_indices`` grouped by
   level 1, 2, 4, 8, skipped, ascending inside each group; ``kv_counts`` counts.

Both sorts are ascending bitonic sorts of packed integer keys in registers (``tl.sort``), so
the whole mask costs one launch and no ``[B, H, Nq, Nk]`` temporaries besides
its own output. In mass mode the cumulative sum runs in another order than
``torch.cumsum``: a block whose predecessors' mass lies within float32 rounding
of a threshold can land one level apart from the PyTorch builder.

``CAUSAL`` (``build_causal_mask_triton``) is the rule of ``causal.causal_levels_reference`` in
the same launch: each program derives its row's past/diagonal/future blocks and the forced ones
(diagonal, sink, recent, text rows) from the block indices, so the competing blocks are the past,
unforced ones and ``n`` is the row's own count of them; the quota bounds (and ``ceil(min_full_share
* n)``) are computed from ``n`` in float64 with ``torch.round``'s ties-to-even, exactly as the
PyTorch rule does; caps lower the competing blocks only; forced blocks are level 1, future blocks
skipped. Same float32 caveat in mass mode.
"""

from __future__ import annotations

import math
import struct

import torch

from ...config import PSAConfig
from ...mask import PyramidBlockMask, ceil_div
from .. import triton_support
from ..kernel_configs import kernel_config
from ..triton_support import HAS_TRITON, INTERPRETED, next_power_of_2, tl, triton
from .causal import check_causal_rule
from .rules import quota_bounds

if HAS_TRITON:

    @triton.jit
    def _row_of_program(NQ, H):
        """``(i, b, h)`` of this program's query-block row (one program per row, rows in ``[B, H, Nq]`` order)."""
        pid = tl.program_id(0)
        bh = pid // NQ
        return pid % NQ, (bh // H).to(tl.int64), (bh % H).to(tl.int64)

    @triton.jit
    def _as_float64(bits):
        """The float64 whose IEEE bit pattern is the integer ``bits`` (Triton passes Python floats as float32)."""
        return bits.to(tl.int64).to(tl.float64, bitcast=True)

    @triton.jit
    def _round_half_even(x):
        """``x`` >= 0 (float64) to the nearest integer, ties to even as ``torch.round``; int64."""
        f = x.to(tl.int64)  # x >= 0: truncation is the floor
        d = x - f.to(tl.float64)  # the fractional part, exact
        return f + ((d > 0.5) | ((d == 0.5) & (f % 2 == 1))).to(tl.int64)

    @triton.jit
    def _ceil_nonneg(x):
        """``ceil(x)`` of ``x`` >= 0 (float64); int64."""
        f = x.to(tl.int64)
        return f + (x > f.to(tl.float64)).to(tl.int64)

    @triton.jit
    def _row_quota(n, F1, F2, F4, F8, FMIN):
        """Quota bounds of levels 1, 2, 4, 8 and the least level-1 count of a row of ``n`` competing blocks.

        ``F*``: float64 bit patterns of the four shares and ``min_full_share``. Float64 products and
        ties-to-even rounding, as ``causal.causal_levels_reference`` (and ``rules.quota_bounds``) compute them.
        """
        nf = n.to(tl.float64)
        n_min = tl.maximum(_ceil_nonneg(_as_float64(FMIN) * nf), 1)
        b1 = tl.maximum(_round_half_even(_as_float64(F1) * nf), n_min)
        b2 = b1 + _round_half_even(_as_float64(F2) * nf)
        b4 = b2 + _round_half_even(_as_float64(F4) * nf)
        b8 = b4 + _round_half_even(_as_float64(F8) * nf)
        n64 = n.to(tl.int64)
        return tl.minimum(b1, n64), tl.minimum(b2, n64), tl.minimum(b4, n64), tl.minimum(b8, n64), n_min

    @triton.jit
    def _causal_blocks(i, j, LEN, BQ, BKV, SINK, RECENT, QV):
        """``(past, forced)`` of KV blocks ``j`` for query block ``i`` (``causal.causal_forced_full``).

        Past: wholly before the block's first row. Forced (level 1): diagonal (neither past nor future),
        or past and holding one of the first ``SINK`` tokens, or ending within ``RECENT`` tokens before
        the block; in text rows (``i >= QV``: the block holds one of the last ``text_len`` tokens) every
        past block, as if ``RECENT`` were unbounded (folded into one integer bound: the interpreter
        mistypes a scalar bool combined with a block).
        """
        first_row = i * BQ
        last_row = tl.minimum(first_row + BQ, LEN) - 1
        first_key = j * BKV
        past = first_key + BKV <= first_row
        future = first_key > last_row
        recent_from = tl.where(i >= QV, 0, first_row - RECENT)  # a block ending after this is forced
        kept = (first_key < SINK) | (first_key + BKV > recent_from)
        return past, (~past & ~future) | (past & kept)

    @triton.jit(do_not_specialize=["F1", "F2", "F4", "F8", "FMIN"])
    def _levels_kernel(
        S, CAPS, COUNTS, INDICES,
        ssb, ssh, ssq, scb, sch, sib, sih, siq, sob, soh, soq,
        H, NQ, NK, NV, QV,
        B1, B2, B4, B8, T1, T2, T4, T8, NMIN,
        LEN, BQ, BKV, SINK, RECENT, F1, F2, F4, F8, FMIN,
        MASS: tl.constexpr, HAS_CAPS: tl.constexpr, CAUSAL: tl.constexpr, NKP: tl.constexpr,
    ):  # fmt: skip
        i, b, h = _row_of_program(NQ, H)
        j = tl.arange(0, NKP)

        # 0. the competing blocks (the first NV; causal: the row's past, unforced blocks, n of them) and the
        #    row's rank bounds (causal: computed here from n)
        if CAUSAL:
            past, forced = _causal_blocks(i, j, LEN, BQ, BKV, SINK, RECENT, QV)
            competing = past & ~forced
            n = tl.sum(competing.to(tl.int32), 0)
            b1, b2, b4, b8, n_min = _row_quota(n, F1, F2, F4, F8, FMIN)
        else:
            competing = j < NV
            n = NV
            b1, b2, b4, b8, n_min = B1, B2, B4, B8, NMIN

        # 1. stable descending sort of the competing blocks by one ascending sort of packed int64 keys:
        #    high word -bits(S) (S >= 0, so larger S -> smaller key; others S=-1 -> positive -> last),
        #    low word the block id (ties -> lower id first)
        s = tl.load(S + b * ssb + h * ssh + i * ssq + j, mask=competing, other=-1.0)
        if CAUSAL:
            s = tl.where(s == 0.0, 0.0, s)  # -0.0 (bits 0x80000000) ranks with +0.0, as in torch.sort
        bits = s.to(tl.int32, bitcast=True).to(tl.int64)
        key = tl.sort(((-bits) << 32) + j.to(tl.int64))
        hi = key >> 32
        jj = (key - (hi << 32)).to(tl.int32)  # block id at each rank
        rank = j

        # 2. level group by rank (0..3 -> 1, 2, 4, 8; 4 -> skipped)
        if MASS:
            vals = (-hi).to(tl.int32).to(tl.float32, bitcast=True)
            vals = tl.where(rank < n, vals, 0.0)
            mass = vals / tl.maximum(tl.sum(vals, 0), 1e-30)
            before = tl.cumsum(mass, 0) - mass
            group = (
                (before >= T1).to(tl.int32) + (before >= T2).to(tl.int32)
                + (before >= T4).to(tl.int32) + (before >= T8).to(tl.int32)
            )  # fmt: skip
            group = tl.where(rank < n_min, 0, group)
        else:
            group = (
                (rank >= b1).to(tl.int32) + (rank >= b2).to(tl.int32)
                + (rank >= b4).to(tl.int32) + (rank >= b8).to(tl.int32)
            )  # fmt: skip
        group = tl.where(rank == 0, 0, group)
        group = tl.where(rank < n, group, 4)
        level = tl.where(group < 4, 1 << group, 0)

        # 3. similarity cap (kept, i.e. competing, blocks only), 4. forced levels (causal: the forced blocks;
        #    future blocks are not competing, so already skipped), or text levels
        if HAS_CAPS:
            cap = tl.load(CAPS + b * scb + h * sch + jj, mask=jj < NK, other=1)
            level = tl.where(level > 0, tl.minimum(level, cap), level)
        if CAUSAL:
            _, forced_jj = _causal_blocks(i, jj, LEN, BQ, BKV, SINK, RECENT, QV)
            level = tl.where(forced_jj, 1, level)
        else:
            level = tl.where((jj >= NV) | (i >= QV), 1, level)
        real = jj < NK

        # 5. the compact mask
        _store_compact(
            level, jj, real, INDICES + b * sib + h * sih + i * siq, COUNTS + b * sob + h * soh + i * soq, NK, NKP
        )

    @triton.jit
    def _store_compact(level, jj, real, INDICES_ROW, COUNTS_ROW, NK, NKP: tl.constexpr):
        """Write one row of the compact mask from the levels ``level`` of blocks ``jj`` (``real``: inside Nk).

        ``kv_indices`` grouped by level 1, 2, 4, 8, skipped, ascending ids inside a group (padding
        last, not stored); ``kv_counts`` the sizes of the first four groups.
        """
        j = tl.arange(0, NKP)
        lrank = tl.where(level == 0, 4, tl.where(level == 1, 0, tl.where(level == 2, 1, tl.where(level == 4, 2, 3))))
        lrank = tl.where(real, lrank, 5)
        key2 = tl.sort(lrank * NKP + jj)
        tl.store(INDICES_ROW + j, key2 % NKP, mask=j < NK)
        tl.store(COUNTS_ROW + 0, tl.sum((real & (level == 1)).to(tl.int32), 0))
        tl.store(COUNTS_ROW + 1, tl.sum((real & (level == 2)).to(tl.int32), 0))
        tl.store(COUNTS_ROW + 2, tl.sum((real & (level == 4)).to(tl.int32), 0))
        tl.store(COUNTS_ROW + 3, tl.sum((real & (level == 8)).to(tl.int32), 0))

    @triton.jit
    def _compact_kernel(
        LM, COUNTS, INDICES,
        slb, slh, slq, sib, sih, siq, sob, soh, soq,
        H, NQ, NK, NV, QV,
        NKP: tl.constexpr,
    ):  # fmt: skip
        """One row of a level map -> forced text levels (step 4) -> its compact mask (step 5)."""
        i, b, h = _row_of_program(NQ, H)
        j = tl.arange(0, NKP)
        level = tl.load(LM + b * slb + h * slh + i * slq + j, mask=j < NK, other=0).to(tl.int32)
        level = tl.where((j >= NV) | (i >= QV), 1, level)
        _store_compact(
            level, j, j < NK, INDICES + b * sib + h * sih + i * siq, COUNTS + b * sob + h * soh + i * soq, NK, NKP
        )


def _row_warps(device: torch.device, nkp: int, config: dict | None) -> int:
    cfg = kernel_config("levels", device=device, dtype=torch.float32, override=config)
    return cfg["wide_num_warps"] if nkp > cfg["wide_above"] else cfg["num_warps"]


def _float64_bits(x: float) -> int:
    """The IEEE bit pattern of ``x`` as float64, for a kernel argument (``_as_float64`` reads it back)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _importance_rows(importance: torch.Tensor) -> torch.Tensor:
    """``importance`` as a float32 ``[B, H, Nq, Nk]`` table with a contiguous last dim (ValueError otherwise)."""
    if importance.dim() != 4 or not importance.is_floating_point():
        got = f"{importance.dtype} {tuple(importance.shape)}"
        raise ValueError(f"importance must be a float [B, H, Nq, Nk] tensor, got {got}")
    if not HAS_TRITON or (importance.device.type != "cuda" and not INTERPRETED):
        raise ValueError(f"Triton path unavailable for a tensor on {importance.device}")
    s = importance.float()
    return s if s.stride(-1) == 1 else s.contiguous()


def _launch_levels(
    s: torch.Tensor, caps: torch.Tensor | None, config: PSAConfig, *, nv: int, qv: int, quota: list[int],
    n_min: int, causal: tuple[int, ...] | None, kernel_overrides: dict | None,
) -> PyramidBlockMask:  # fmt: skip
    """One launch of ``_levels_kernel`` over the rows of ``s`` ``[B, H, Nq, Nk]``; the compact mask.

    ``quota``/``n_min``: the non-causal rank bounds; ``causal``: ``(length, sink, recent)`` for the
    causal rule (None: non-causal), whose text rows are those from ``qv`` on.
    """
    b, h, nq, nk = s.shape
    counts = triton_support.new_output((b, h, nq, 4), dtype=torch.int32, device=s.device)
    indices = triton_support.new_output((b, h, nq, nk), dtype=torch.int32, device=s.device)
    if caps is not None:
        if caps.shape != (b, h, nk):
            raise ValueError(f"caps must have shape {(b, h, nk)}, got {tuple(caps.shape)}")
        caps_t = caps.to(device=s.device, dtype=torch.int32).contiguous()
    else:
        caps_t = counts  # unused
    thresholds = config.budgets if config.mode == "mass" else (0.0, 0.0, 0.0, 0.0)
    if causal is None:
        causal_args = (0, 1, 1, 0, 0, 0, 0, 0, 0, 0)
    else:
        shares = (*config.budgets, config.min_full_share)
        causal_args = (*causal[:1], config.block_q, config.block_kv, *causal[1:], *map(_float64_bits, shares))
    nkp = max(16, next_power_of_2(nk))
    _levels_kernel[(b * h * nq,)](
        s, caps_t, counts, indices,
        s.stride(0), s.stride(1), s.stride(2), caps_t.stride(0), caps_t.stride(1),
        indices.stride(0), indices.stride(1), indices.stride(2),
        counts.stride(0), counts.stride(1), counts.stride(2),
        h, nq, nk, nv, qv,
        *quota, *(float(t) for t in thresholds), n_min, *causal_args,
        MASS=config.mode == "mass", HAS_CAPS=caps is not None, CAUSAL=causal is not None, NKP=nkp,
        num_warps=_row_warps(s.device, nkp, kernel_overrides),
        # no fused multiply-add: the causal bounds round ``share * n`` as torch does, from the rounded product
        # (a fused ``share * n - floor`` keeps the product's low bits and turns a tie such as 0.1 * 25 upwards)
        enable_fp_fusion=False,
    )  # fmt: skip
    return PyramidBlockMask(counts, indices, block_q=config.block_q, block_kv=config.block_kv)


def build_mask_triton(
    importance: torch.Tensor,
    config: PSAConfig,
    *,
    num_kv_blocks: int | None = None,
    num_q_blocks: int | None = None,
    caps: torch.Tensor | None = None,
    kernel_overrides: dict | None = None,
) -> PyramidBlockMask:
    """The compact mask for ``importance`` ``[B, H, Nq, Nk]`` (float32, >= 0) under ``config``, in one launch.

    num_kv_blocks: the first ``n`` KV blocks compete for levels; the others (text) are level 1
    (default: all compete). num_q_blocks: query blocks from this one on (text) see every block
    at level 1 (default: none). caps: optional ``[B, H, Nk]`` largest allowed factor per KV block
    (the similarity cap). ``kernel_overrides``: overrides of the ``"levels"`` kernel configuration.
    Matches ``reference.choose_levels_reference`` (see the module docstring for the one float32
    caveat in mass mode).
    """
    s = _importance_rows(importance)
    nq, nk = s.shape[-2:]
    nv = nk if num_kv_blocks is None else max(0, min(int(num_kv_blocks), nk))
    qv = nq if num_q_blocks is None else max(0, min(int(num_q_blocks), nq))
    quota = quota_bounds(config, max(nv, 1)) if config.mode == "quota" else [0, 0, 0, 0]
    n_min = max(1, math.ceil(config.min_full_share * nv))
    return _launch_levels(s, caps, config, nv=nv, qv=qv, quota=quota, n_min=n_min, causal=None,
                          kernel_overrides=kernel_overrides)  # fmt: skip


def build_causal_mask_triton(
    importance: torch.Tensor,
    config: PSAConfig,
    *,
    length: int,
    sink_tokens: int,
    recent_tokens: int,
    text_len: int = 0,
    caps: torch.Tensor | None = None,
    kernel_overrides: dict | None = None,
) -> PyramidBlockMask:
    """The causal compact mask for ``importance`` ``[B, H, Nq, Nk]`` (float, >= 0) of ``length`` tokens, in one launch.

    The rule of ``causal.causal_levels_reference`` (its module docstring), the same arguments:
    ``caps`` ``[B, H, Nk]`` lower the competing blocks' levels. Quota mode gives the same mask;
    mass mode the same up to the float32 caveat of the module docstring. No host synchronisation
    and no per-call tensors besides the output: the block relation is computed in the kernel.
    """
    check_causal_rule(config, sink_tokens, recent_tokens)
    s = _importance_rows(importance)
    nq, nk = ceil_div(length, config.block_q), ceil_div(length, config.block_kv)
    if s.shape[-2:] != (nq, nk):
        raise ValueError(f"importance of shape {tuple(importance.shape)} does not match {nq}x{nk} blocks")
    # text rows: query blocks holding one of the last text_len tokens, i * bq + bq > length - text_len
    qv = (int(length) - int(text_len)) // config.block_q if text_len else nq
    causal = (int(length), int(sink_tokens), int(recent_tokens))
    return _launch_levels(s, caps, config, nv=nk, qv=qv, quota=[0, 0, 0, 0], n_min=1, causal=causal,
                          kernel_overrides=kernel_overrides)  # fmt: skip


def compact_levels_triton(
    level_map: torch.Tensor,
    *,
    block_q: int,
    block_kv: int,
    num_kv_blocks: int | None = None,
    num_q_blocks: int | None = None,
    config: dict | None = None,
) -> PyramidBlockMask:
    """The compact mask of ``level_map`` ``[B, H, Nq, Nk]`` (integer, values in {0, 1, 2, 4, 8}), in one launch.

    KV blocks from ``num_kv_blocks`` on and query rows from ``num_q_blocks`` on (text) are set to
    level 1 first; ``config`` overrides the ``"levels"`` kernel configuration. Same result as
    ``reference.compact_levels_reference``.
    """
    if level_map.dim() != 4 or level_map.is_floating_point():
        raise ValueError(f"level_map must be an integer [B, H, Nq, Nk] tensor, got {level_map.dtype} "
                         f"{tuple(level_map.shape)}")  # fmt: skip
    if not HAS_TRITON or (level_map.device.type != "cuda" and not INTERPRETED):
        raise ValueError(f"Triton path unavailable for a tensor on {level_map.device}")
    b, h, nq, nk = level_map.shape
    nv = nk if num_kv_blocks is None else max(0, min(int(num_kv_blocks), nk))
    qv = nq if num_q_blocks is None else max(0, min(int(num_q_blocks), nq))
    lm = level_map if level_map.stride(-1) == 1 else level_map.contiguous()
    counts = triton_support.new_output((b, h, nq, 4), dtype=torch.int32, device=lm.device)
    indices = triton_support.new_output((b, h, nq, nk), dtype=torch.int32, device=lm.device)
    nkp = max(16, next_power_of_2(nk))
    _compact_kernel[(b * h * nq,)](
        lm, counts, indices,
        lm.stride(0), lm.stride(1), lm.stride(2), indices.stride(0), indices.stride(1), indices.stride(2),
        counts.stride(0), counts.stride(1), counts.stride(2),
        h, nq, nk, nv, qv,
        NKP=nkp, num_warps=_row_warps(lm.device, nkp, config),
    )  # fmt: skip
    return PyramidBlockMask(counts, indices, block_q=block_q, block_kv=block_kv)
