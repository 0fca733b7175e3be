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
"""

from __future__ import annotations

import math

import torch

from ...config import PSAConfig
from ...mask import PyramidBlockMask
from .. import triton_support
from ..kernel_configs import kernel_config
from ..triton_support import HAS_TRITON, INTERPRETED, next_power_of_2, tl, triton
from .rules import quota_bounds

if HAS_TRITON:

    @triton.jit
    def _row_of_program(NQ, H):
        """``(i, b, h)`` of this program's query-block row (one program per row, rows in ``[B, H, Nq]`` order)."""
        pid = tl.program_id(0)
        bh = pid // NQ
        return pid % NQ, (bh // H).to(tl.int64), (bh % H).to(tl.int64)

    @triton.jit
    def _levels_kernel(
        S, CAPS, COUNTS, INDICES,
        ssb, ssh, ssq, scb, sch, sib, sih, siq, sob, soh, soq,
        H, NQ, NK, NV, QV,
        B1, B2, B4, B8, T1, T2, T4, T8, NMIN,
        MASS: tl.constexpr, HAS_CAPS: tl.constexpr, NKP: tl.constexpr,
    ):  # fmt: skip
        i, b, h = _row_of_program(NQ, H)
        j = tl.arange(0, NKP)

        # 1. stable descending sort of the competing blocks by one ascending sort of packed int64 keys:
        #    high word -bits(S) (S >= 0, so larger S -> smaller key; padding S=-1 -> positive -> last),
        #    low word the block id (ties -> lower id first)
        s = tl.load(S + b * ssb + h * ssh + i * ssq + j, mask=j < NV, other=-1.0)
        bits = s.to(tl.int32, bitcast=True).to(tl.int64)
        key = tl.sort(((-bits) << 32) + j.to(tl.int64))
        hi = key >> 32
        jj = (key - (hi << 32)).to(tl.int32)  # block id at each rank
        rank = j

        # 2. level group by rank (0..3 -> 1, 2, 4, 8; 4 -> skipped)
        if MASS:
            vals = (-hi).to(tl.int32).to(tl.float32, bitcast=True)
            vals = tl.where(rank < NV, vals, 0.0)
            mass = vals / tl.maximum(tl.sum(vals, 0), 1e-30)
            before = tl.cumsum(mass, 0) - mass
            group = (
                (before >= T1).to(tl.int32) + (before >= T2).to(tl.int32)
                + (before >= T4).to(tl.int32) + (before >= T8).to(tl.int32)
            )  # fmt: skip
            group = tl.where(rank < NMIN, 0, group)
        else:
            group = (
                (rank >= B1).to(tl.int32) + (rank >= B2).to(tl.int32)
                + (rank >= B4).to(tl.int32) + (rank >= B8).to(tl.int32)
            )  # fmt: skip
        group = tl.where(rank == 0, 0, group)
        group = tl.where(rank < NV, group, 4)
        level = tl.where(group < 4, 1 << group, 0)

        # 3. similarity cap, 4. forced text levels
        if HAS_CAPS:
            cap = tl.load(CAPS + b * scb + h * sch + jj, mask=jj < NK, other=1)
            level = tl.where(level > 0, tl.minimum(level, cap), level)
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
    if importance.dim() != 4 or not importance.is_floating_point():
        got = f"{importance.dtype} {tuple(importance.shape)}"
        raise ValueError(f"importance must be a float [B, H, Nq, Nk] tensor, got {got}")
    if not HAS_TRITON or (importance.device.type != "cuda" and not INTERPRETED):
        raise ValueError(f"Triton path unavailable for a tensor on {importance.device}")
    b, h, nq, nk = importance.shape
    nv = nk if num_kv_blocks is None else max(0, min(int(num_kv_blocks), nk))
    qv = nq if num_q_blocks is None else max(0, min(int(num_q_blocks), nq))
    s = importance.float()
    if s.stride(-1) != 1:
        s = s.contiguous()
    counts = triton_support.new_output((b, h, nq, 4), dtype=torch.int32, device=s.device)
    indices = triton_support.new_output((b, h, nq, nk), dtype=torch.int32, device=s.device)
    if caps is not None:
        if caps.shape != (b, h, nk):
            raise ValueError(f"caps must have shape {(b, h, nk)}, got {tuple(caps.shape)}")
        caps_t = caps.to(device=s.device, dtype=torch.int32).contiguous()
    else:
        caps_t = counts  # unused
    bounds = quota_bounds(config, max(nv, 1)) if config.mode == "quota" else [0, 0, 0, 0]
    thresholds = config.budgets if config.mode == "mass" else (0.0, 0.0, 0.0, 0.0)
    n_min = max(1, math.ceil(config.min_full_share * nv))
    nkp = max(16, next_power_of_2(nk))
    _levels_kernel[(b * h * nq,)](
        s, caps_t, counts, indices,
        s.stride(0), s.stride(1), s.stride(2), caps_t.stride(0), caps_t.stride(1),
        indices.stride(0), indices.stride(1), indices.stride(2),
        counts.stride(0), counts.stride(1), counts.stride(2),
        h, nq, nk, nv, qv,
        *bounds, *(float(t) for t in thresholds), n_min,
        MASS=config.mode == "mass", HAS_CAPS=caps is not None, NKP=nkp,
        num_warps=_row_warps(s.device, nkp, kernel_overrides),
    )  # fmt: skip
    return PyramidBlockMask(counts, indices, block_q=config.block_q, block_kv=config.block_kv)


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
