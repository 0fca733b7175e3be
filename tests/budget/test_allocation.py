"""Budget mode: its settings, the knapsack allocation, the budget mask against binary block-sparse attention, and the
fused allocation kernel against ``allocate_levels_reference``.

The kernel runs on CUDA, or on CPU under Triton's interpreter. What is asserted of it, per case, and why:

(a) every row's cost stays within ``max(budget, cost of its best block at level 1)``: the
    reference's guarantee, which no rounding can loosen (costs are integers);
(b) the modelled error ``(s + W**2) / (1 - W)**2`` of every row (from ``error_tables``) is
    within 1e-4 relative of the reference's: the kernel computes the same float32 tables but
    with its own ``exp`` and summation order, so a hull step whose rate lies within a few ulps
    of another's can be taken instead of it; such a swap costs a negligible share of the
    error (observed: none in these cases, all maps are equal);
(c) at least 99.5% of the levels agree (in these small cases that leaves no room for a
    single difference, so they are in fact exact); and exact ties (identical blocks) are
    broken as the reference's stable sort breaks them, which a pure threshold search would not.

Outputs are poisoned (``triton_support.POISON_OUTPUTS``): a row the kernel does not write holds -1.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from benchmarks.structured_qkv import relative_error, structured_qkv
from psa_diffusers.budget import PyramidStats
from psa_diffusers.budget.allocation import (
    COST_UNIT,
    OPTIONS,
    allocate_levels_reference,
    allocate_levels_triton,
    detail_loss,
    error_tables,
    knapsack_options,
    mass_loss,
    option_costs,
    row_budget,
)
from psa_diffusers.budget.statistics import estimate_pyramid_statistics_reference
from psa_diffusers.config import PSAConfig
from psa_diffusers.mask import PyramidBlockMask
from psa_diffusers.mask_builder import build_block_mask
from psa_diffusers.ops import triton_support
from psa_diffusers.ops.attention import psa_attention_reference
from psa_diffusers.ops.caps import similarity_caps_reference
from psa_diffusers.ops.importance import exact_block_mass
from tests.budget.conftest import BKV, BQ
from tests.helpers import needs_interpreter, random_qkv

DEVICE = "cuda" if torch.cuda.is_available() and not triton_support.INTERPRETED else "cpu"

needs_kernels = pytest.mark.skipif(
    not (triton_support.HAS_TRITON and (triton_support.INTERPRETED or torch.cuda.is_available())),
    reason="needs triton with CUDA, or TRITON_INTERPRET=1 set before import (tests/conftest.py does it on CPU)",
)


def budget_config(density, **kw):
    return PSAConfig(block_q=BQ, block_kv=BKV, mode="budget", target_density=density, **kw)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(mode="budget"), ["target_density", "None"]),
        (dict(mode="budget", target_density=0.0), ["target_density", "0.0"]),
        (dict(mode="budget", target_density=1.5), ["target_density", "1.5"]),
        (dict(mode="budget", target_density=float("nan")), ["target_density", "nan"]),
        (dict(mode="budget", target_density="0.1"), ["target_density", "'0.1'"]),
        (dict(mode="budget", target_density=True), ["target_density", "True"]),
        (dict(mode="quota", target_density=0.1), ["target_density", "0.1", "budget"]),
    ],
    ids=lambda x: str(x) if isinstance(x, dict) else "",
)
def test_invalid_budget_settings_name_field_and_value(kwargs, words):
    with pytest.raises(ValueError) as info:
        PSAConfig(**kwargs)
    for w in words:
        assert w in str(info.value)


def test_budget_config_round_trips_and_ignores_budgets():
    cfg = PSAConfig(mode="budget", target_density=0.12)
    assert cfg.target_density == 0.12 and cfg.budgets == (0.10, 0.05, 0.0, 0.20)
    assert PSAConfig.from_dict(cfg.to_dict()) == cfg
    assert PSAConfig(mode="budget", target_density=1).target_density == 1.0


# ---------------------------------------------------------------- knapsack


def _brute_force(err, cost, budget):
    """The least total error of any choice within the budget, by enumeration."""
    n = err.shape[0]
    combos = torch.tensor(list(itertools.product(range(len(OPTIONS)), repeat=n)))  # [5**n, n]
    blocks = torch.arange(n)
    spent = cost[blocks, combos].sum(-1)
    total = err[blocks, combos].sum(-1)
    return float(total[spent <= budget].min())


def test_knapsack_is_near_the_brute_force_optimum():
    """The hull greedy is within one step's gain of the optimum (it is exact for the relaxed problem)."""
    g = torch.Generator().manual_seed(3)
    cost = option_costs(torch.full((5,), 32))  # 0, 32, 64, 128, 256 per block
    for trial in range(30):
        err = torch.rand(5, 5, generator=g).double().sort(-1, descending=True).values
        err[:, -1] = 0
        budget = 32 * int(torch.randint(1, 40, (1,), generator=g))
        chosen = knapsack_options(err, cost, torch.tensor(budget))
        spent = int(cost.gather(-1, chosen.unsqueeze(-1)).sum())
        assert spent <= budget
        got = float(err.gather(-1, chosen.unsqueeze(-1)).sum())
        want = _brute_force(err, cost, budget)
        assert want - 1e-12 <= got <= want + float(err[:, 0].max()), (trial, got, want)
    # blocks whose only useful step is to full: a 0/1 knapsack of equal items, solved exactly
    err = torch.tensor([[9.0, 9, 9, 9, 0], [5, 5, 5, 5, 0], [4, 4, 4, 4, 0]]).double()
    for budget in (0, 256, 512, 768):
        chosen = knapsack_options(err, cost[:3], torch.tensor(budget))
        got = float(err.gather(-1, chosen.unsqueeze(-1)).sum())
        assert got == _brute_force(err, cost[:3], budget)


def test_knapsack_respects_budget_and_improves_with_it():
    g = torch.Generator().manual_seed(1)
    err = torch.rand(3, 40, 5, generator=g).double().sort(-1, descending=True).values
    err[..., -1] = 0
    cost = option_costs(torch.full((40,), 128))
    previous = None
    for budget in (0, 128, 1024, 4000, 20000, 40 * 1024):
        chosen = knapsack_options(err, cost, torch.full((3,), budget))
        spent = cost.expand(3, 40, 5).gather(-1, chosen.unsqueeze(-1)).squeeze(-1).sum(-1)
        assert bool((spent <= budget).all())
        total = err.gather(-1, chosen.unsqueeze(-1)).squeeze(-1).sum(-1)
        if previous is not None:
            assert bool((total <= previous + 1e-12).all())
        previous = total
    assert bool((chosen == len(OPTIONS) - 1).all())  # the whole budget: everything full


def test_error_model_limits():
    v = torch.tensor([0.0, 1e-4, 1.0, 50.0])
    assert detail_loss(v)[0] == 0 and mass_loss(v)[0] == 0
    assert abs(float(detail_loss(v)[1]) - 1e-4) < 1e-6  # f(V) ~ V for small V
    assert float(detail_loss(v)[3]) == pytest.approx(1.0) and float(mass_loss(v)[3]) == pytest.approx(1.0)
    assert bool((detail_loss(v).diff() > 0).all()) and bool((mass_loss(v).diff() > 0).all())


# ---------------------------------------------------------------- allocation


@pytest.mark.parametrize("density", [0.05, 0.1, 0.2, 0.3])
def test_budget_mode_meets_its_density_target(qkv, stats, density):
    q, k, _ = qkv
    mask = build_block_mask(q, k, budget_config(density), stats=stats)
    got = mask.density(2048, 2048)
    # never above the target; below it by less than half a block per row (the greedy stops within one step)
    assert density - 0.5 / 64 <= got <= density + 1e-9
    lm = mask.to_level_map()
    assert bool((lm > 0).any(-1).all())
    assert bool((lm.gather(-1, stats.mass.argmax(-1, keepdim=True)) == 1).all())  # best block kept in full


def _row_work(mask, length, rows=None):
    """Tokens each query-block row sees, counting a pooled token as one: ``[B, H, Nq]``."""
    lm = mask.to_level_map() if rows is None else mask.to_level_map()[..., :rows, :]
    n = (length - torch.arange(lm.shape[-1]) * mask.block_kv).clamp(max=mask.block_kv).double()
    return (torch.where(lm > 0, n / lm.clamp(min=1), torch.zeros((), dtype=torch.float64))).sum(-1)


def test_density_target_holds_with_partial_blocks_and_text(qkv):
    q, k, _ = (t[:, :, :2000] for t in qkv)  # the last query and KV blocks are partial
    mask = build_block_mask(q, k, budget_config(0.1))
    work = _row_work(mask, 2000)
    assert bool((work <= 0.1 * 2000).all()) and bool((work > 0.1 * 2000 - 0.5 * BKV).all())
    text = 100  # text KV blocks count against the budget of every video row; text rows are dense
    mask = build_block_mask(q, k, budget_config(0.1), text_len=text)
    work = _row_work(mask, 2000, rows=(2000 - text) // BQ)
    assert bool((work <= 0.1 * 2000).all()) and bool((work > 0.1 * 2000 - 0.5 * BKV).all())


def test_row_budget_leaves_room_for_forced_blocks():
    assert row_budget(0.1, 1000) == 100 * COST_UNIT
    assert row_budget(0.1, 1000, forced_tokens=30) == 70 * COST_UNIT
    assert row_budget(0.01, 1000, forced_tokens=30) == 0


def test_budget_mode_beats_binary_block_sparse_with_oracle_blocks(qkv, stats):
    """At equal FLOP density, pyramid levels chosen by estimated error lose less than binary
    block-sparse attention that keeps the blocks of largest exact mass."""
    q, k, v = qkv
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    oracle = exact_block_mass(q, k, block_q=BQ, block_kv=BKV)
    for density, most in ((0.1, 0.55), (0.25, 0.68)):  # measured: 0.44 and 0.62
        mask = build_block_mask(q, k, budget_config(density), stats=stats)
        d = mask.density(2048, 2048)
        keep = max(1, round(d * 64))
        top = oracle.topk(keep, dim=-1).indices
        binary = PyramidBlockMask.from_level_map(
            torch.zeros(oracle.shape, dtype=torch.int64).scatter_(-1, top, 1), block_q=BQ, block_kv=BKV
        )
        err_psa = relative_error(psa_attention_reference(q, k, v, mask), dense)
        err_bin = relative_error(psa_attention_reference(q, k, v, binary), dense)
        assert err_psa < most * err_bin, (density, err_psa, err_bin)


def test_budget_mask_is_bit_identical_across_calls(qkv):
    q, k, _ = qkv
    cfg = budget_config(0.15)
    a = build_block_mask(q, k, cfg)
    b = build_block_mask(q.clone(), k.clone(), cfg)
    assert torch.equal(a.kv_indices, b.kv_indices) and torch.equal(a.kv_counts, b.kv_counts)
    sa = estimate_pyramid_statistics_reference(q, k, block_q=BQ, block_kv=BKV)
    sb = estimate_pyramid_statistics_reference(q.clone(), k.clone(), block_q=BQ, block_kv=BKV)
    assert all(torch.equal(x, y) for x, y in zip(sa, sb))


def test_budget_mode_honours_similarity_caps_and_text(qkv, stats):
    q, k, _ = qkv
    cfg = budget_config(0.2, sim_thresholds=(0.7, 0.65, 0.6))
    lm = build_block_mask(q, k, cfg, stats=stats).to_level_map()
    caps = similarity_caps_reference(k, block_kv=cfg.block_kv, thresholds=cfg.sim_thresholds).unsqueeze(2)
    assert bool((lm <= caps).all()) and bool((lm > 0).any(-1).all())
    text = 100
    lm = build_block_mask(q, k, budget_config(0.2), text_len=text).to_level_map()
    first_text_kv, first_text_q = (2048 - text) // BKV, (2048 - text) // BQ
    assert bool((lm[..., first_text_kv:] == 1).all()) and bool((lm[..., first_text_q:, :] == 1).all())
    video = lm[..., :first_text_q, :]
    assert (video == 0).float().mean() > 0.5


def test_allocation_keeps_peaked_blocks_and_pools_flat_ones():
    """Equal mass and blur: the block whose probability is concentrated (large squared mass) is
    kept in full, the flat one pooled; a block whose logits pooling would blur badly is not pooled."""
    mass = torch.tensor([[[[0.5, 0.25, 0.25]]]])
    sq = torch.tensor([[[[0.5, 0.02, 0.3]]]])
    var = torch.tensor([[[[[9.0, 9.0, 9.0], [0.05, 0.1, 0.2], [0.05, 0.1, 0.2]]]]])
    tokens = torch.full((3,), 128)
    lm = allocate_levels_reference(PyramidStats(mass, sq, var), (128 + 128 + 16) * COST_UNIT, tokens)
    assert lm.tolist() == [[[[1, 8, 1]]]]
    var_rough = torch.tensor([[[[[9.0, 9.0, 9.0], [0.05, 0.1, 0.2], [6.0, 8.0, 9.0]]]]])
    sq_flat = torch.tensor([[[[0.5, 0.05, 0.05]]]])
    lm = allocate_levels_reference(PyramidStats(mass, sq_flat, var_rough), (128 + 128 + 16) * COST_UNIT, tokens)
    assert lm.tolist() == [[[[1, 8, 1]]]]
    caps = torch.tensor([[[1, 2, 1]]])
    lm = allocate_levels_reference(PyramidStats(mass, sq, var), (128 + 128 + 64) * COST_UNIT, tokens, caps=caps)
    assert lm.tolist() == [[[[1, 2, 1]]]]


def test_allocation_covers_spread_mass_when_much_of_it_would_be_lost():
    """Skipping many small blocks loses their mass together (the renormalisation error): with
    55% of the mass spread over 30 smooth blocks, covering some at 8x beats keeping a peaked,
    rough (not poolable) but light block in full."""
    n_small = 30
    mass = torch.tensor([0.4, 0.05] + [0.55 / n_small] * n_small).view(1, 1, 1, -1)
    sq = torch.tensor([0.5, 0.1] + [0.0005] * n_small).view(1, 1, 1, -1)
    var = torch.full((1, 1, 1, n_small + 2, 3), 0.01)
    var[..., 1, :] = torch.tensor([6.0, 8.0, 9.0])
    tokens = torch.full((n_small + 2,), 128)
    lm = allocate_levels_reference(PyramidStats(mass, sq, var), (128 + 128) * COST_UNIT, tokens)[0, 0, 0]
    assert lm[0] == 1 and lm[1] == 0 and int((lm[2:] == 8).sum()) == 8


# ---------------------------------------------------------------- kernel


def _structured_stats(batch: int) -> PyramidStats:
    """Statistics of 4x9x10 video tokens (360: 23 KV blocks of 16, the last with 8), 2 heads, 2 query blocks."""
    parts = []
    for seed in range(batch):
        q, k, _ = structured_qkv(4, 9, 10, heads=2, dim=32, seed=seed, dtype=torch.float32)
        parts.append(estimate_pyramid_statistics_reference(q[:, :, 100:228], k, block_q=64, block_kv=16))
    return PyramidStats(*(torch.cat(t).to(DEVICE) for t in zip(*parts)))


def _random_stats(b, h, nq, nk, seed) -> PyramidStats:
    """Positive statistics with a heavy-tailed mass, a few zero blocks and blur growing with the factor."""
    g = torch.Generator().manual_seed(seed)
    mass = torch.rand(b, h, nq, nk, generator=g) ** 6
    mass[torch.rand(b, h, nq, nk, generator=g) < 0.1] = 0.0
    sq = mass**2 * (0.5 + torch.rand(b, h, nq, nk, generator=g))
    var = (torch.rand(b, h, nq, nk, 3, generator=g) * torch.tensor([0.3, 0.8, 2.0])).cumsum(-1)
    return PyramidStats(mass.to(DEVICE), sq.to(DEVICE), var.to(DEVICE))


def _tokens(nk: int, block: int, last: int) -> torch.Tensor:
    t = torch.full((nk,), block, dtype=torch.int64)
    t[-1] = last
    return t.to(DEVICE)


def _row_cost(levels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    per = torch.where(levels > 0, tokens * COST_UNIT // levels.clamp(min=1), torch.zeros_like(levels))
    return per.sum(-1)


def _modelled_error(stats: PyramidStats, levels: torch.Tensor, n: int) -> torch.Tensor:
    """``(s + W**2) / (1 - W)**2`` per row, float64, from the reference's error tables."""
    sep, lost = error_tables(stats, n)
    index = torch.zeros_like(levels[..., :n])
    for k, level in enumerate(OPTIONS):
        index[levels[..., :n] == level] = k
    s = sep.gather(-1, index.unsqueeze(-1)).squeeze(-1).double().sum(-1)
    w = lost.gather(-1, index.unsqueeze(-1)).squeeze(-1).double().sum(-1)
    return (s + w**2) / (1 - w).clamp(min=1e-6) ** 2


def _check(stats, budget, tokens, *, n=None, caps=None, **kw):
    """Run both, assert (a)-(c) of the module docstring; returns (kernel map, reference map)."""
    nk = stats.mass.shape[-1]
    n = nk if n is None else n
    ref = allocate_levels_reference(stats, budget, tokens, num_blocks=n, caps=caps, **kw)
    out = allocate_levels_triton(stats, budget, tokens, num_blocks=None if n == nk else n, caps=caps, **kw)
    assert out.shape == ref.shape and out.dtype == torch.int64
    assert bool(torch.isin(out, torch.tensor(OPTIONS, device=out.device)).all())  # poison (-1) fails here
    assert bool((out[..., n:] == 0).all())
    # (a) cost within the budget, raised to the best block's full cost where smaller
    best_cost = tokens[:n][stats.mass[..., :n].argmax(-1)] * COST_UNIT
    limit = torch.maximum(torch.as_tensor(budget, device=out.device).expand_as(best_cost), best_cost)
    assert bool((_row_cost(out[..., :n], tokens[:n]) <= limit).all())
    # the best block is level 1 unless a cap below 1 forbids it
    if caps is None:
        assert bool((out[..., :n].gather(-1, stats.mass[..., :n].argmax(-1, keepdim=True)) == 1).all())
    # (b) modelled error
    e_out, e_ref = _modelled_error(stats, out, n), _modelled_error(stats, ref, n)
    assert bool(((e_out - e_ref).abs() <= 1e-4 * e_ref.abs() + 1e-9).all())
    # (c) level agreement
    assert (out == ref).double().mean().item() >= 0.995
    return out, ref


@needs_kernels
def test_structured_statistics_int_budget():
    stats = _structured_stats(batch=1)  # [1, 2, 2, 23]
    tokens = _tokens(23, 16, 8)
    out, _ = _check(stats, 900, tokens)  # ~30% of the 2944 of a dense row
    assert bool((out == 0).any()) and len(torch.unique(out)) >= 3


@needs_kernels
def test_structured_statistics_caps_text_columns_and_row_budgets():
    stats = PyramidStats(*(t[:, 1:] for t in _structured_stats(batch=2)))  # [2, 1, 2, 23]
    tokens = _tokens(23, 16, 8)
    g = torch.Generator().manual_seed(1)
    caps = torch.tensor([1, 2, 4, 8])[torch.randint(0, 4, (2, 1, 23), generator=g)].to(DEVICE)
    budget = torch.randint(0, 2500, (2, 1, 2), generator=g).to(DEVICE)
    budget[0, 0, 0] = 0  # raised to the best block's cost
    out, _ = _check(stats, budget, tokens, n=20, caps=caps)
    pooled = out[..., :20] > 0
    assert bool((out[..., :20][pooled] <= caps[..., :20].unsqueeze(-2).expand_as(out[..., :20])[pooled]).all())


@needs_kernels
@pytest.mark.parametrize(
    "nk, last, n, budgets",
    [
        (37, 5, 37, [0, 2000, 8000, 2**40]),  # zero .. beyond the full 9256
        (29, 32, 25, [700, 10**9, 1, 3000]),
    ],
)
def test_random_statistics_row_budgets(nk, last, n, budgets):
    stats = _random_stats(2, 1, 2, nk, seed=nk)
    tokens = _tokens(nk, 32, last)
    budget = torch.tensor(budgets, dtype=torch.int64).view(2, 1, 2).to(DEVICE)
    out, _ = _check(stats, budget, tokens, n=n)
    # a budget above the full cost buys every block with any mass whole
    rich = (budget >= tokens[:n].sum() * COST_UNIT).unsqueeze(-1) & (stats.mass[..., :n] > 0)
    assert bool(rich.any()) and bool((out[..., :n][rich] == 1).all())


@needs_kernels
@pytest.mark.parametrize(
    "budget, iterations, start_loss", [(0, 2, 0.1), (3000, 1, 0.1), (2500, 4, 0.3), (10**12, 2, 0.0)]
)
def test_random_statistics_int_budgets_and_iterations(budget, iterations, start_loss):
    stats = _random_stats(1, 1, 2, 31, seed=iterations)
    _check(stats, budget, _tokens(31, 32, 17), iterations=iterations, start_loss=start_loss)


@needs_kernels
def test_exact_ties_follow_the_reference_order():
    # every block alike except the best: all hull steps tie across blocks, the reference's stable
    # sort takes them block by block, and the budget runs out in the middle of a hull level
    nk = 24
    mass = torch.full((1, 1, 1, nk), 0.04)
    mass[..., 3] = 0.5
    sq = mass**2
    var = torch.tensor([0.05, 0.4, 3.0]).expand(1, 1, 1, nk, 3).clone()
    stats = PyramidStats(mass.to(DEVICE), sq.to(DEVICE), var.to(DEVICE))
    tokens = _tokens(nk, 32, 32)
    for budget in (256 + 5 * 32 + 3 * 64, 256 + 23 * 32 + 7 * 32):
        out, ref = _check(stats, budget, tokens)
        assert bool((out == ref).all())
        assert len(torch.unique(out[0, 0, 0])) > 2  # the tie was cut part-way: levels differ among alike blocks
    # room for exactly one step of a tied level: the first tied step fits with nothing to spare
    for budget in (256 + 32, 256 + 64, 256 + 128, 256 + 256):
        out, ref = _check(stats, budget, tokens)
        assert bool((out == ref).all())


@needs_kernels
@pytest.mark.parametrize(
    "change, words",
    [
        (dict(num_blocks=24), ["num_blocks", "24"]),
        (dict(num_blocks=-1), ["num_blocks", "-1"]),
        (dict(budget=1.5), ["budget", "1.5"]),
        (dict(budget=torch.zeros(3, 3, dtype=torch.int64)), ["budget", "(3, 3)"]),
        (dict(budget=torch.zeros(1, 2, 2)), ["budget", "float32"]),
        (dict(caps=torch.ones(1, 2, 22, dtype=torch.int64)), ["caps", "(1, 2, 22)"]),
        (dict(block_tokens=torch.ones(22, dtype=torch.int64)), ["block_tokens", "(22,)"]),
        (dict(block_tokens=torch.ones(23)), ["block_tokens", "float32"]),
        (dict(iterations=2.0), ["iterations", "2.0"]),
        (dict(start_loss=float("nan")), ["start_loss", "nan"]),
        (dict(stats=PyramidStats(torch.zeros(1, 2, 2, 23, dtype=torch.float64), None, None)), ["mass", "float64"]),
        (dict(stats=PyramidStats(torch.zeros(1, 2, 2, 23), torch.zeros(1, 2, 2, 23), torch.zeros(1, 2, 2, 23, 2))),
         ["logit_var", "(1, 2, 2, 23, 2)"]),
    ],
    ids=lambda x: "" if isinstance(x, list) else ",".join(x),
)  # fmt: skip
def test_bad_arguments_name_the_value(change, words):
    zeros = torch.zeros(1, 2, 2, 23, device=DEVICE)
    stats = PyramidStats(zeros, zeros, torch.zeros(1, 2, 2, 23, 3, device=DEVICE))
    kw = dict(stats=stats, budget=100, block_tokens=torch.full((23,), 16, dtype=torch.int64, device=DEVICE))
    kw.update(change)
    with pytest.raises(ValueError) as info:
        allocate_levels_triton(kw.pop("stats"), kw.pop("budget"), kw.pop("block_tokens"), **kw)
    for w in words:
        assert w in str(info.value)


@needs_interpreter
@pytest.mark.parametrize("sims", [None, (0.7, 0.65, 0.6)], ids=["no-cap", "cap"])
def test_budget_mask_on_the_kernels_matches_pytorch(sims):
    """The kernel path of the budget mode (moments, statistics, allocation, compaction kernels) end to end."""
    cfg = PSAConfig(block_q=64, block_kv=32, mode="budget", target_density=0.3, sim_thresholds=sims)
    q, k, _, _ = random_qkv(1, 2, 300, 300, 16, torch.float32, seed=3)
    k = k + torch.linspace(0, 3, 300).view(1, 1, -1, 1)  # smooth keys: caps and pooled levels vary
    ref = build_block_mask(q * 2, k, cfg, text_len=40, backend="reference")
    got = build_block_mask(q * 2, k, cfg, text_len=40, backend="triton")  # CPU tensors, interpreted kernels
    assert len(torch.unique(ref.kv_counts[..., 1:])) > 1  # pooled levels are in use
    assert torch.equal(got.kv_counts, ref.kv_counts.to(torch.int32))
    assert torch.equal(got.kv_indices, ref.kv_indices.to(torch.int32))
