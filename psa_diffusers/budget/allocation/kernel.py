"""The budget mode's level allocation (``reference.allocate_levels_reference``) in one Triton launch.

One program (one warp up to 256 KV blocks) per query-block row ``(b, h, i)`` keeps the row's
error tables (``error_tables``, five options per KV block), option costs and hull steps in
registers and runs the same solves as the reference: ``iterations`` linearised knapsacks,
each re-weighting the mass loss by ``c = 2 (W + s) / (1 - W)`` of the last. The row's blocks
are held in two power-of-two chunks (``row_chunks``: 139 blocks as 128 + 16, not 256).

Each knapsack is the reference's greedy without its sort. Every block walks its lower convex
hull from option 0 (up to 4 steps, each with a rate: error removed per 1/8 token; the rates
between its 10 pairs of options are divided once per solve). The greedy takes the steps by
decreasing rate while the running cost fits, so it takes every step whose rate lies above
some threshold, plus a prefix of the steps tied at it. The threshold is found by bisecting
the int32 bit pattern of the (positive float32) rates: 31 rounds of one row sum each (wider
K-way rounds measured slower, docs/benchmarks.md); the steps tied at it are then
taken in the reference's stable-sort order (hull step, then block) by a cumulative sum,
skipped when the cheapest tied step does not fit. No atomics: the result is deterministic
and equals the reference's up to float32 rounding of the tables (``exp`` and summation order
differ), which can only reorder steps whose rates are within a few ulps of each other
(docs/benchmarks.md compares the maps at real shapes). Costs are int32:
``8 * sum(block_tokens)`` must stay below 2**31.
"""

from __future__ import annotations

import math

import torch

from ...ops import triton_support
from ...ops.kernel_configs import kernel_config
from ...ops.triton_support import HAS_TRITON, INTERPRETED, last_dim_contiguous, next_power_of_2, tl, triton
from ..stats import PyramidStats

_MAX_BUDGET = 1 << 30
"""Budgets are clamped to this (1/8 tokens); a row costs at most ``8 * 128 * Nk``, far below it."""

if HAS_TRITON:

    @triton.jit
    def _rate(e_from, e_to, extra):
        """Error removed per unit of cost going from one option to a costlier one, or -1 where none is removed."""
        gain = e_from - e_to
        return tl.where((gain > 0) & (extra > 0), tl.math.div_rn(gain, tl.maximum(extra, 1).to(tl.float32)), -1.0)

    @triton.jit
    def _hull_step(best, nxt, rate, option: tl.constexpr):
        """One candidate of a hull step: the running maximum rate (first on ties) and its option."""
        nxt = tl.where(rate > best, option, nxt)
        return tl.maximum(rate, best), nxt

    @triton.jit
    def _hull_end(cur, best, nxt, full):
        """(option, rate bits, extra cost) of the hull step from ``cur``: rate bits are the int32 pattern
        of the positive float32 rate, or -1 (and the option stays) where no costlier option removes error."""
        move = best > 0
        nxt = tl.where(move, nxt, cur)
        step = tl.where(nxt > 0, full >> (4 - nxt), 0) - tl.where(cur > 0, full >> (4 - cur), 0)
        return nxt, tl.where(move, best.to(tl.int32, bitcast=True), -1), step

    @triton.jit
    def _hull_walk(e0, e1, e2, e3, e4, full):
        """Every block's lower convex hull from option 0: 4 steps of (option, rate bits, extra cost) ``[NKP]``.

        Each step goes to the costlier option removing the most error per unit of cost, the first
        on ties, as in ``knapsack_options``; option k > 0 costs ``full >> (4 - k)``. The rates
        between the 10 pairs of options are divided once and selected by the current option.
        """
        c1 = full >> 3
        c2 = full >> 2
        c3 = full >> 1
        r01 = _rate(e0, e1, c1)
        r02 = _rate(e0, e2, c2)
        r03 = _rate(e0, e3, c3)
        r04 = _rate(e0, e4, full)
        r12 = _rate(e1, e2, c2 - c1)
        r13 = _rate(e1, e3, c3 - c1)
        r14 = _rate(e1, e4, full - c1)
        r23 = _rate(e2, e3, c3 - c2)
        r24 = _rate(e2, e4, full - c2)
        r34 = _rate(e3, e4, full - c3)
        # step 0, from option 0
        none = r01 * 0.0 - 1.0
        cur = full * 0
        best, nxt = _hull_step(none, cur, r01, 1)
        best, nxt = _hull_step(best, nxt, r02, 2)
        best, nxt = _hull_step(best, nxt, r03, 3)
        best, nxt = _hull_step(best, nxt, r04, 4)
        n0, b0, k0 = _hull_end(cur, best, nxt, full)
        # steps 1..3 from the option reached (a block still at option 0 found nothing from there)
        cur = n0
        best, nxt = _hull_step(none, cur, tl.where(cur == 1, r12, -1.0), 2)
        best, nxt = _hull_step(best, nxt, tl.where(cur == 1, r13, tl.where(cur == 2, r23, -1.0)), 3)
        rate = tl.where(cur == 1, r14, tl.where(cur == 2, r24, tl.where(cur == 3, r34, -1.0)))
        best, nxt = _hull_step(best, nxt, rate, 4)
        n1, b1, k1 = _hull_end(cur, best, nxt, full)
        cur = n1
        best, nxt = _hull_step(none, cur, tl.where(cur == 2, r23, -1.0), 3)
        best, nxt = _hull_step(best, nxt, tl.where(cur == 2, r24, tl.where(cur == 3, r34, -1.0)), 4)
        n2, b2, k2 = _hull_end(cur, best, nxt, full)
        cur = n2
        best, nxt = _hull_step(none, cur, tl.where(cur == 3, r34, -1.0), 4)
        n3, b3, k3 = _hull_end(cur, best, nxt, full)
        return n0, b0, k0, n1, b1, k1, n2, b2, k2, n3, b3, k3

    @triton.jit
    def _over(b0, k0, b1, k1, b2, k2, b3, k3, mid):
        """Cost of the steps of one chunk whose rate bits are at least ``mid``."""
        over = tl.where(b0 >= mid, k0, 0) + tl.where(b1 >= mid, k1, 0) + tl.where(b2 >= mid, k2, 0)
        return tl.sum(over + tl.where(b3 >= mid, k3, 0), 0)

    @triton.jit
    def _tied_min(b0, k0, b1, k1, b2, k2, b3, k3, lo):
        """The cheapest step of one chunk with rate bits ``lo`` (2**31 - 1 if none)."""
        big = 0x7FFFFFFF
        m = tl.minimum(tl.where(b0 == lo, k0, big), tl.where(b1 == lo, k1, big))
        return tl.min(tl.minimum(m, tl.minimum(tl.where(b2 == lo, k2, big), tl.where(b3 == lo, k3, big))), 0)

    @triton.jit
    def _above(b0, b1, b2, b3, targets, hi):
        """The option each block of one chunk reaches taking exactly its steps with rate bits >= hi."""
        chosen = tl.where(b0 >= hi, targets & 7, 0)
        chosen = tl.where(b1 >= hi, (targets >> 3) & 7, chosen)
        chosen = tl.where(b2 >= hi, (targets >> 6) & 7, chosen)
        return tl.where(b3 >= hi, targets >> 9, chosen)

    @triton.jit
    def _take(b_a, k_a, b_b, k_b, lo, hi, room, base):
        """Which steps of one hull step (chunks a, b) the greedy takes, and the tied cost so far.

        All steps with bits >= hi; of those tied at bits lo, the ones whose running cost (after
        ``base``, the tied steps before them in the reference's order) fits ``room``.
        """
        t_a = tl.where(b_a == lo, k_a, 0)
        t_b = tl.where(b_b == lo, k_b, 0)
        sum_a = tl.sum(t_a, 0)
        take_a = (b_a >= hi) | ((b_a == lo) & (tl.cumsum(t_a, 0) + base <= room))
        take_b = (b_b >= hi) | ((b_b == lo) & (tl.cumsum(t_b, 0) + (base + sum_a) <= room))
        return take_a, take_b, base + sum_a + tl.sum(t_b, 0)

    @triton.jit
    def _solve(budget, e0a, e1a, e2a, e3a, e4a, full_a, e0b, e1b, e2b, e3b, e4b, full_b):
        """``knapsack_options(err, cost, budget)`` for one row: the chosen option of every block, per chunk.

        The row's blocks come in two chunks a, b (b after a). e0..e4 float32: the error of options
        skip, 8, 4, 2, 1; full: the cost of option 1 (level 1); budget: the cost allowed, every
        block starting at option 0 (skip).
        """
        n0a, b0a, k0a, n1a, b1a, k1a, n2a, b2a, k2a, n3a, b3a, k3a = _hull_walk(e0a, e1a, e2a, e3a, e4a, full_a)
        n0b, b0b, k0b, n1b, b1b, k1b, n2b, b2b, k2b, n3b, b3b, k3b = _hull_walk(e0b, e1b, e2b, e3b, e4b, full_b)
        targets_a = n0a | (n1a << 3) | (n2a << 6) | (n3a << 9)  # one register array instead of four
        targets_b = n0b | (n1b << 3) | (n2b << 6) | (n3b << 9)
        # the greedy takes the steps by decreasing rate while they fit: all steps with rate bits >= hi,
        # hi the smallest threshold >= 1 whose steps fit (positive floats order as their bits; steps
        # that remove nothing have bits -1). Invariant: lo < hi* <= hi; 31 halvings take hi - lo from
        # 0x7F800000 (above every finite rate) to 1.
        lo = tl.sum(k0a * 0, 0)
        hi = lo + 0x7F800000
        for _ in range(31):
            mid = lo + ((hi - lo) >> 1)
            spent = _over(b0a, k0a, b1a, k1a, b2a, k2a, b3a, k3a, mid)
            fits = spent + _over(b0b, k0b, b1b, k1b, b2b, k2b, b3b, k3b, mid) <= budget
            hi = tl.where(fits & (mid > lo), mid, hi)
            lo = tl.where(fits, lo, mid)
        spent = _over(b0a, k0a, b1a, k1a, b2a, k2a, b3a, k3a, hi)
        room = budget - spent - _over(b0b, k0b, b1b, k1b, b2b, k2b, b3b, k3b, hi)
        # ... and of the steps tied at the rate it stopped at (bits lo = hi - 1), those whose running
        # cost fits, in the order of the reference's stable sort: hull step, then block. Usually the
        # cheapest tied step (often the only one) does not fit: then none does, and no prefix sums
        tied_min = tl.minimum(
            _tied_min(b0a, k0a, b1a, k1a, b2a, k2a, b3a, k3a, lo), _tied_min(b0b, k0b, b1b, k1b, b2b, k2b, b3b, k3b, lo)
        )
        if tied_min > room:
            chosen_a = _above(b0a, b1a, b2a, b3a, targets_a, hi)
            chosen_b = _above(b0b, b1b, b2b, b3b, targets_b, hi)
        else:
            take_a, take_b, base = _take(b0a, k0a, b0b, k0b, lo, hi, room, room * 0)
            chosen_a = tl.where(take_a, targets_a & 7, 0)
            chosen_b = tl.where(take_b, targets_b & 7, 0)
            take_a, take_b, base = _take(b1a, k1a, b1b, k1b, lo, hi, room, base)
            chosen_a = tl.where(take_a, (targets_a >> 3) & 7, chosen_a)
            chosen_b = tl.where(take_b, (targets_b >> 3) & 7, chosen_b)
            take_a, take_b, base = _take(b2a, k2a, b2b, k2b, lo, hi, room, base)
            chosen_a = tl.where(take_a, (targets_a >> 6) & 7, chosen_a)
            chosen_b = tl.where(take_b, (targets_b >> 6) & 7, chosen_b)
            take_a, take_b, base = _take(b3a, k3a, b3b, k3b, lo, hi, room, base)
            chosen_a = tl.where(take_a, targets_a >> 9, chosen_a)
            chosen_b = tl.where(take_b, targets_b >> 9, chosen_b)
        return chosen_a, chosen_b

    @triton.jit
    def _tables(MASS_ROW, SQ_ROW, VAR_ROW, TOKENS, svj, svs, j, NK, NV, mass_total, sq_total):
        """Error tables (``error_tables``) of blocks ``j``: detail lost s0..s3 and mass lost w0..w3 of
        options skip, 8, 4, 2 (full loses nothing), and the cost of option 1 (``option_costs``, 1/8 tokens)."""
        live = j < NV
        w0 = tl.where(live, tl.math.div_rn(tl.load(MASS_ROW + j, mask=j < NK, other=0.0), mass_total), 0.0)
        s0 = tl.where(live, tl.math.div_rn(tl.load(SQ_ROW + j, mask=j < NK, other=0.0), sq_total), 0.0)
        var = VAR_ROW + j * svj
        v2 = tl.maximum(tl.load(var, mask=live, other=0.0), 0.0)
        v4 = tl.maximum(tl.load(var + svs, mask=live, other=0.0), 0.0)
        v8 = tl.maximum(tl.load(var + 2 * svs, mask=live, other=0.0), 0.0)
        s1 = s0 * (1.0 - 2.0 * tl.exp(-1.5 * v8) + tl.exp(-2.0 * v8))
        s2 = s0 * (1.0 - 2.0 * tl.exp(-1.5 * v4) + tl.exp(-2.0 * v4))
        s3 = s0 * (1.0 - 2.0 * tl.exp(-1.5 * v2) + tl.exp(-2.0 * v2))
        w1 = w0 * (1.0 - tl.exp(-0.5 * v8))
        w2 = w0 * (1.0 - tl.exp(-0.5 * v4))
        w3 = w0 * (1.0 - tl.exp(-0.5 * v2))
        full = tl.load(TOKENS + j, mask=live, other=0).to(tl.int32) * 8
        return s0, s1, s2, s3, w0, w1, w2, w3, full

    @triton.jit
    def _blocked(j, best, CAPS_ROW, scj, NV, HAS_CAPS: tl.constexpr):
        """Options forbidden to blocks ``j``: all but full for the best block, coarser than a block's cap."""
        x0 = j == best
        x1 = x0
        x2 = x0
        x3 = x0
        x4 = j < 0
        if HAS_CAPS:
            cap = tl.load(CAPS_ROW + j * scj, mask=j < NV, other=8)
            x1 = x1 | (cap < 8)
            x2 = x2 | (cap < 4)
            x3 = x3 | (cap < 2)
            x4 = cap < 1
        return x0, x1, x2, x3, x4

    @triton.jit
    def _errors(x0, x1, x2, x3, x4, s0, s1, s2, s3, w0, w1, w2, w3, weight):
        """The linearised error ``s + weight * w`` of each option, "infinite" where forbidden."""
        e0 = tl.where(x0, 1e30, s0 + weight * w0)
        e1 = tl.where(x1, 1e30, s1 + weight * w1)
        e2 = tl.where(x2, 1e30, s2 + weight * w2)
        e3 = tl.where(x3, 1e30, s3 + weight * w3)
        return e0, e1, e2, e3, tl.where(x4, 1e30, 0.0)

    @triton.jit
    def _pick(c, t0, t1, t2, t3):
        """Sum of the table entries ``t*`` of the chosen options (full: 0)."""
        return tl.sum(tl.where(c == 0, t0, tl.where(c == 1, t1, tl.where(c == 2, t2, tl.where(c == 3, t3, 0.0)))), 0)

    @triton.jit
    def _allocation_kernel(
        MASS, SQ, VAR, TOKENS, BUDGET, CAPS, OUT,
        smb, smh, smq, ssb, ssh, ssq, svb, svh, svq, svj, svs,
        sbb, sbh, sbq, scb, sch, scj, sob, soh, soq,
        H, NQ, NK, NV, BUDGET_INT, START_LOSS,
        BUDGET_TENSOR: tl.constexpr, HAS_CAPS: tl.constexpr, ROUNDS: tl.constexpr,
        NKA: tl.constexpr, NKB: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        i = (pid % NQ).to(tl.int64)
        bh = pid // NQ
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        # the row's blocks in two chunks of powers of two, a = [0, NKA) and b = [NKA, NKA + NKB), so
        # that e.g. 139 blocks take 128 + 16 lanes, not 256; blocks >= NV (text, padding) get level 0
        ja = tl.arange(0, NKA)
        jb = NKA + tl.arange(0, NKB)
        mass_row = MASS + b * smb + h * smh + i * smq
        sq_row = SQ + b * ssb + h * ssh + i * ssq
        mass_a = tl.load(mass_row + ja, mask=ja < NK, other=0.0)
        mass_b = tl.load(mass_row + jb, mask=jb < NK, other=0.0)
        mass_total = tl.maximum(tl.sum(mass_a, 0) + tl.sum(mass_b, 0), 1e-30)
        sq_total = tl.sum(tl.load(sq_row + ja, mask=ja < NK, other=0.0), 0)
        sq_total = tl.maximum(sq_total + tl.sum(tl.load(sq_row + jb, mask=jb < NK, other=0.0), 0), 1e-30)
        var_row = VAR + b * svb + h * svh + i * svq
        s0a, s1a, s2a, s3a, w0a, w1a, w2a, w3a, full_a = _tables(
            mass_row, sq_row, var_row, TOKENS, svj, svs, ja, NK, NV, mass_total, sq_total
        )
        s0b, s1b, s2b, s3b, w0b, w1b, w2b, w3b, full_b = _tables(
            mass_row, sq_row, var_row, TOKENS, svj, svs, jb, NK, NV, mass_total, sq_total
        )

        # the row's most massive block (first maximum) is level 1; caps forbid coarser factors
        top = tl.maximum(
            tl.max(tl.where(ja < NV, mass_a, -float("inf")), 0), tl.max(tl.where(jb < NV, mass_b, -float("inf")), 0)
        )
        best = tl.minimum(
            tl.min(tl.where((ja < NV) & (mass_a == top), ja, NKA + NKB), 0),
            tl.min(tl.where((jb < NV) & (mass_b == top), jb, NKA + NKB), 0),
        )
        caps_row = CAPS + b * scb + h * sch
        x0a, x1a, x2a, x3a, x4a = _blocked(ja, best, caps_row, scj, NV, HAS_CAPS)
        x0b, x1b, x2b, x3b, x4b = _blocked(jb, best, caps_row, scj, NV, HAS_CAPS)
        if BUDGET_TENSOR:
            budget = tl.load(BUDGET + b * sbb + h * sbh + i * sbq).to(tl.int64)
            budget = tl.maximum(tl.minimum(budget, 1 << 30), -1).to(tl.int32)  # _MAX_BUDGET
        else:
            budget = BUDGET_INT + tl.zeros((), tl.int32)
        budget = tl.maximum(budget, tl.sum(tl.where(x0a, full_a, 0), 0) + tl.sum(tl.where(x0b, full_b, 0), 0))

        # re-linearised solves: each weights the mass loss by the last one's W and s
        loss = START_LOSS + 0.0
        blur = loss * 0.0
        c_a = ja * 0
        c_b = jb * 0
        for it in tl.static_range(ROUNDS):
            weight = tl.math.div_rn(2.0 * (loss + blur), tl.maximum(1.0 - loss, 0.05))
            e0a, e1a, e2a, e3a, e4a = _errors(x0a, x1a, x2a, x3a, x4a, s0a, s1a, s2a, s3a, w0a, w1a, w2a, w3a, weight)
            e0b, e1b, e2b, e3b, e4b = _errors(x0b, x1b, x2b, x3b, x4b, s0b, s1b, s2b, s3b, w0b, w1b, w2b, w3b, weight)
            c_a, c_b = _solve(budget, e0a, e1a, e2a, e3a, e4a, full_a, e0b, e1b, e2b, e3b, e4b, full_b)
            if it < ROUNDS - 1:
                loss = _pick(c_a, w0a, w1a, w2a, w3a) + _pick(c_b, w0b, w1b, w2b, w3b)
                blur = _pick(c_a, s0a, s1a, s2a, s3a) + _pick(c_b, s0b, s1b, s2b, s3b)

        out_row = OUT + b * sob + h * soh + i * soq
        tl.store(out_row + ja, tl.where((ja < NV) & (c_a > 0), 16 >> c_a, 0).to(tl.int64), mask=ja < NK)
        tl.store(out_row + jb, tl.where((jb < NV) & (c_b > 0), 16 >> c_b, 0).to(tl.int64), mask=jb < NK)


def row_chunks(nk: int) -> tuple[int, int]:
    """Two power-of-two chunks covering ``nk`` blocks with little padding: 139 -> (128, 16), 256 -> (128, 128)."""
    a = max(8, 1 << max(0, (nk - 1).bit_length() - 1))  # the largest power of two below nk
    return a, max(8, next_power_of_2(nk - a))


def allocate_levels_triton(
    stats: PyramidStats,
    budget: torch.Tensor | int,
    block_tokens: torch.Tensor,
    *,
    num_blocks: int | None = None,
    caps: torch.Tensor | None = None,
    iterations: int = 2,
    start_loss: float = 0.1,
    config: dict | None = None,
) -> torch.Tensor:
    """Level map ``[B, H, Nq, Nk]`` int64 of ``reference.allocate_levels`` with the same arguments, in one launch.

    stats:        ``mass``, ``sq_mass`` ``[B, H, Nq, Nk]`` and ``logit_var`` ``[B, H, Nq, Nk, 3]`` (float32).
    budget:       work per query-block row in 1/8 tokens: an int or an integer tensor ``[B, H, Nq]``.
    block_tokens: real tokens of each KV block ``[Nk]`` (integers >= 0; not checked, that would synchronise).
    num_blocks:   only the first ``num_blocks`` KV blocks compete; the others get level 0.
    caps:         optional largest allowed pooling factor per KV block ``[B, H, Nk]``.
    config:       overrides the ``"budget.allocation"`` kernel configuration (``blocks_per_warp``).

    Ties between hull steps are broken as in the reference; the tables are float32 as there but
    rounded differently, so steps whose rates agree to a few ulps can be taken in another order
    (see the module docstring).
    """
    mass, sq, var = stats.mass, stats.sq_mass, stats.logit_var
    for name, t in (("mass", mass), ("sq_mass", sq), ("logit_var", var)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"stats.{name} must be a float32 tensor, got {got}")
    if mass.dim() != 4:
        raise ValueError(f"stats.mass must be [B, H, Nq, Nk], got shape {tuple(mass.shape)}")
    if sq.shape != mass.shape or var.shape != (*mass.shape, 3):
        shapes = f"mass {tuple(mass.shape)}, sq_mass {tuple(sq.shape)}, logit_var {tuple(var.shape)}"
        raise ValueError(f"stats shapes disagree (want [B, H, Nq, Nk] twice and [B, H, Nq, Nk, 3]): {shapes}")
    device = mass.device
    if sq.device != device or var.device != device:
        raise ValueError(f"stats tensors are on {device}, {sq.device} and {var.device}; they must share a device")
    b, h, nq, nk = mass.shape
    if num_blocks is None:
        nv = nk
    elif isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or not 0 <= num_blocks <= nk:
        raise ValueError(f"num_blocks must be an int in 0..{nk}, got {num_blocks!r}")
    else:
        nv = num_blocks
    if isinstance(iterations, bool) or not isinstance(iterations, int):
        raise ValueError(f"iterations must be an int, got {iterations!r}")
    if isinstance(start_loss, bool) or not isinstance(start_loss, (int, float)) or not math.isfinite(start_loss):
        raise ValueError(f"start_loss must be a finite float, got {start_loss!r}")
    if not isinstance(block_tokens, torch.Tensor) or block_tokens.shape != (nk,) or block_tokens.is_floating_point():
        got = f"{block_tokens.dtype} {tuple(block_tokens.shape)}" if isinstance(block_tokens, torch.Tensor) else None
        raise ValueError(f"block_tokens must be an integer tensor of shape ({nk},), got {got or block_tokens!r}")
    tokens = block_tokens.to(device).contiguous()
    if not HAS_TRITON or (device.type != "cuda" and not INTERPRETED):
        raise ValueError(f"Triton path unavailable for tensors on {device}")

    if isinstance(budget, torch.Tensor):
        if budget.is_floating_point() or budget.dtype == torch.bool:
            raise ValueError(f"budget must be an integer tensor, got {budget.dtype}")
        try:
            budget_t = budget.to(device).expand(b, h, nq)
        except RuntimeError:
            got = tuple(budget.shape)
            raise ValueError(f"budget must be an int or [B, H, Nq] = {(b, h, nq)}, got shape {got}") from None
        budget_int, sbud = 0, budget_t.stride()
    elif isinstance(budget, int) and not isinstance(budget, bool):
        budget_t, budget_int, sbud = mass, max(-1, min(int(budget), _MAX_BUDGET)), (0, 0, 0)  # budget_t unused
    else:
        raise ValueError(f"budget must be an int or an integer tensor [B, H, Nq], got {budget!r}")
    if caps is not None:
        if not isinstance(caps, torch.Tensor) or caps.shape != (b, h, nk) or caps.is_floating_point():
            got = f"{caps.dtype} {tuple(caps.shape)}" if isinstance(caps, torch.Tensor) else repr(caps)
            raise ValueError(f"caps must be an integer tensor of shape {(b, h, nk)}, got {got}")
        caps_t = caps.to(device)
    else:
        caps_t = mass  # unused
    out = triton_support.new_output((b, h, nq, nk), dtype=torch.int64, device=device)
    if out.numel() == 0:
        return out
    mass, sq = last_dim_contiguous(mass), last_dim_contiguous(sq)
    nka, nkb = row_chunks(nk)
    per_warp = kernel_config("budget.allocation", device=mass.device, dtype=torch.float32, override=config)
    num_warps = max(1, (nka + nkb) // per_warp["blocks_per_warp"])
    _allocation_kernel[(b * h * nq,)](
        mass, sq, var, tokens, budget_t, caps_t, out,
        mass.stride(0), mass.stride(1), mass.stride(2), sq.stride(0), sq.stride(1), sq.stride(2),
        var.stride(0), var.stride(1), var.stride(2), var.stride(3), var.stride(4),
        *sbud, caps_t.stride(0), caps_t.stride(1), caps_t.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        h, nq, nk, nv, budget_int, float(start_loss),
        BUDGET_TENSOR=isinstance(budget, torch.Tensor), HAS_CAPS=caps is not None,
        ROUNDS=max(1, iterations), NKA=nka, NKB=nkb,
        num_warps=num_warps, enable_fp_fusion=False,
    )  # fmt: skip
    return out
