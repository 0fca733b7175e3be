"""Budget mode: block statistics, the knapsack allocation, and quality against binary block-sparse attention."""

import itertools

import pytest
import torch

from benchmarks.structured_qkv import relative_error, structured_qkv
from psa_diffusers.allocation import (
    COST_UNIT,
    OPTIONS,
    allocate_levels,
    detail_loss,
    knapsack_options,
    mass_loss,
    option_costs,
    row_budget,
)
from psa_diffusers.config import PSAConfig
from psa_diffusers.importance import (
    PyramidStats,
    estimate_pyramid_statistics,
    exact_block_mass,
    pooled_logit_variance,
)
from psa_diffusers.mask import PyramidBlockMask
from psa_diffusers.mask_builder import build_block_mask, similarity_caps
from psa_diffusers.reference import psa_attention_reference

BQ, BKV = 64, 32


@pytest.fixture(scope="module")
def qkv():
    """8x16x16 video tokens (L 2048), 2 heads, dim 64: 32x64 blocks of 64x32."""
    return structured_qkv(8, 16, 16, heads=2, dim=64, seed=0, dtype=torch.float32)


@pytest.fixture(scope="module")
def stats(qkv):
    q, k, _ = qkv
    return estimate_pyramid_statistics(q, k, block_q=BQ, block_kv=BKV)


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


# ---------------------------------------------------------------- statistics


def test_logit_variance_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 150, 16, generator=g), torch.randn(1, 2, 100, 16, generator=g)  # partial last blocks
    var = pooled_logit_variance(q, k, block_q=64, block_kv=32, scale=0.3)
    for s_i, s in enumerate((2, 4, 8)):
        for i, j in [(0, 0), (2, 3), (1, 2)]:
            qi = q[0, 1, i * 64 : (i + 1) * 64]
            kj = k[0, 1, j * 32 : (j + 1) * 32]
            groups = torch.split(kj, s)
            dev = torch.cat([grp - grp.mean(0) for grp in groups])
            want = ((0.3 * qi @ dev.T) ** 2).mean()
            assert torch.allclose(var[0, 1, i, j, s_i], want, rtol=1e-4, atol=1e-6)


def test_statistics_rows_sum_to_one_and_track_the_exact_mass(qkv, stats):
    q, k, _ = qkv
    assert stats.mass.shape == stats.sq_mass.shape == (1, 2, 32, 64) and stats.logit_var.shape == (1, 2, 32, 64, 3)
    assert torch.allclose(stats.mass.sum(-1), torch.ones(1, 2, 32), atol=1e-4)
    assert bool((stats.sq_mass >= 0).all()) and bool((stats.logit_var >= 0).all())
    exact = exact_block_mass(q, k, block_q=BQ, block_kv=BKV)
    # the estimate's top block carries most of what the exact top block carries
    top_est = exact.gather(-1, stats.mass.argmax(-1, keepdim=True))
    assert (top_est / exact.max(-1, keepdim=True).values).mean() > 0.9
    # and the mass it puts on the exact top 10% of blocks is close to the truth
    top = exact.topk(6, -1).indices
    assert (stats.mass.gather(-1, top).sum(-1) - exact.gather(-1, top).sum(-1)).abs().max() < 0.1


@pytest.mark.parametrize("lq, lkv", [(200, 200), (130, 75)])
def test_statistics_are_exact_when_the_refinement_covers_every_key(lq, lkv):
    """With every KV block ranked and every key group refined, no pooled value is left: mass and squared
    mass must equal the brute-force softmax's (float32 sums, tolerance 1e-5)."""
    g = torch.Generator().manual_seed(lq + lkv)
    q, k = (torch.randn(2, 3, n, 16, generator=g) for n in (lq, lkv))
    bq, bkv = 32, 16
    st = estimate_pyramid_statistics(q, k, block_q=bq, block_kv=bkv, refine_blocks=99, refine_groups=999)
    p = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)  # [2, 3, Lq, Lkv]
    nq, nk = -(-lq // bq), -(-lkv // bkv)
    p = torch.nn.functional.pad(p, (0, nk * bkv - lkv, 0, nq * bq - lq)).view(2, 3, nq, bq, nk, bkv)
    n_q = (lq - torch.arange(nq) * bq).clamp(max=bq).float().view(nq, 1)
    assert torch.allclose(st.mass, p.sum((3, 5)) / n_q, atol=1e-5)
    assert torch.allclose(st.sq_mass, p.square().sum((3, 5)), atol=1e-5)


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
    sa = estimate_pyramid_statistics(q, k, block_q=BQ, block_kv=BKV)
    sb = estimate_pyramid_statistics(q.clone(), k.clone(), block_q=BQ, block_kv=BKV)
    assert all(torch.equal(x, y) for x, y in zip(sa, sb))


def test_budget_mode_honours_similarity_caps_and_text(qkv, stats):
    q, k, _ = qkv
    cfg = budget_config(0.2, sim_thresholds=(0.7, 0.65, 0.6))
    lm = build_block_mask(q, k, cfg, stats=stats).to_level_map()
    caps = similarity_caps(k, cfg).unsqueeze(2)
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
    lm = allocate_levels(PyramidStats(mass, sq, var), (128 + 128 + 16) * COST_UNIT, tokens)
    assert lm.tolist() == [[[[1, 8, 1]]]]
    var_rough = torch.tensor([[[[[9.0, 9.0, 9.0], [0.05, 0.1, 0.2], [6.0, 8.0, 9.0]]]]])
    sq_flat = torch.tensor([[[[0.5, 0.05, 0.05]]]])
    lm = allocate_levels(PyramidStats(mass, sq_flat, var_rough), (128 + 128 + 16) * COST_UNIT, tokens)
    assert lm.tolist() == [[[[1, 8, 1]]]]
    caps = torch.tensor([[[1, 2, 1]]])
    lm = allocate_levels(PyramidStats(mass, sq, var), (128 + 128 + 64) * COST_UNIT, tokens, caps=caps)
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
    lm = allocate_levels(PyramidStats(mass, sq, var), (128 + 128) * COST_UNIT, tokens)[0, 0, 0]
    assert lm[0] == 1 and lm[1] == 0 and int((lm[2:] == 8).sum()) == 8
