import math

import pytest
import torch

from benchmarks.structured_qkv import relative_error, structured_qkv
from psa_diffusers.config import PSAConfig
from psa_diffusers.importance import block_smoothness, estimate_block_importance, exact_block_mass
from psa_diffusers.mask_builder import build_block_mask, levels_from_importance
from psa_diffusers.reference import psa_attention_reference


@pytest.fixture(scope="module")
def small_qkv():
    """8x16x16 video tokens (L 2048), 2 heads, dim 64, raster order."""
    return structured_qkv(8, 16, 16, heads=2, dim=64, seed=0, dtype=torch.float32)


def test_importance_rows_sum_to_one_and_track_the_exact_block_mass(small_qkv):
    q, k, _ = small_qkv
    est = estimate_block_importance(q, k, block_q=64, block_kv=32, stride=8)
    exact = exact_block_mass(q, k, block_q=64, block_kv=32)
    assert torch.allclose(est.sum(-1), torch.ones(est.shape[:-1]), atol=1e-5)
    assert torch.allclose(exact.sum(-1), torch.ones(exact.shape[:-1]), atol=1e-5)
    # the estimate's top block carries most of what the exact top block carries
    top_est = exact.gather(-1, est.argmax(-1, keepdim=True))
    top_exact = exact.max(-1, keepdim=True).values
    assert (top_est / top_exact).mean() > 0.8


def test_mask_is_bit_identical_across_calls(small_qkv):
    q, k, _ = small_qkv
    cfg = PSAConfig(block_q=64, block_kv=32, mode="mass", budgets=(0.5, 0.6, 0.7, 0.8), sim_thresholds=(0.7, 0.65, 0.6))
    a, b = build_block_mask(q, k, cfg), build_block_mask(q.clone(), k.clone(), cfg)
    assert torch.equal(a.kv_indices, b.kv_indices) and torch.equal(a.kv_counts, b.kv_counts)


def test_quota_levels_follow_the_importance_ranking():
    g = torch.Generator().manual_seed(0)
    imp = torch.rand(2, 3, 5, 40, generator=g)
    cfg = PSAConfig(budgets=(0.1, 0.05, 0.1, 0.2), min_full_share=0.0)
    lm = levels_from_importance(imp, cfg)
    counts = torch.stack([(lm == s).sum(-1) for s in (1, 2, 4, 8)], -1)
    assert torch.all(counts == torch.tensor([4, 2, 4, 8]))
    # finer levels always hold more important blocks than coarser ones, skipped blocks the least
    order = {1: 0, 2: 1, 4: 2, 8: 3, 0: 4}
    rank_of = lm.clone().apply_(lambda s: order[s])
    for idx in [(0, 0, 0), (1, 2, 4)]:
        ranks = rank_of[idx][imp[idx].argsort(descending=True)]
        assert torch.all(ranks[1:] >= ranks[:-1])
    assert torch.all(lm.gather(-1, imp.argmax(-1, keepdim=True)) == 1)


def test_min_full_share_and_best_block_rule():
    imp = torch.rand(1, 1, 4, 50, generator=torch.Generator().manual_seed(1))
    lm = levels_from_importance(imp, PSAConfig(budgets=(0.0, 0.0, 0.0, 0.5), min_full_share=0.1))
    assert torch.all((lm == 1).sum(-1) == 5)
    lm = levels_from_importance(imp, PSAConfig(budgets=(0.0, 0.0, 0.0, 0.0), min_full_share=0.0))
    assert torch.all((lm == 1).sum(-1) == 1) and torch.all((lm > 0).sum(-1) == 1)


def test_mass_levels_follow_cumulative_thresholds():
    # one row, importance already sorted: masses 0.4, 0.2, 0.15, 0.1, 0.1, 0.05
    imp = torch.tensor([[[[0.4, 0.2, 0.15, 0.1, 0.1, 0.05]]]])
    cfg = PSAConfig(mode="mass", budgets=(0.5, 0.6, 0.7, 0.8), min_full_share=0.0)
    # predecessors' mass: 0, .4, .6, .75, .85, .95 -> levels 1, 1, 4, 0, 0, 0
    # (.6 reaches 0.6 so not 2x, is below 0.7 so 4x; .75 reaches 0.7 but not 0.8 -> 8x)
    assert levels_from_importance(imp, cfg).tolist() == [[[[1, 1, 4, 8, 0, 0]]]]


def test_similarity_cap_limits_rough_blocks():
    g = torch.Generator().manual_seed(0)
    smooth = torch.randn(1, 1, 1, 16, generator=g).expand(1, 1, 64, 16)  # identical keys: cos 1
    rough = torch.randn(1, 1, 64, 16, generator=g)  # random keys: cos ~ 0
    k = torch.cat([smooth, rough], dim=2).contiguous()
    s = block_smoothness(k, block_kv=64)
    assert torch.allclose(s[0, 0, 0], torch.ones(3)) and torch.all(s[0, 0, 1].abs() < 0.5)
    q = torch.randn(1, 1, 128, 16, generator=g)
    cfg = PSAConfig(
        block_q=64, block_kv=64, budgets=(0.0, 0.0, 0.0, 1.0), min_full_share=0.0, sim_thresholds=(0.7, 0.65, 0.6)
    )
    lm = build_block_mask(q, k, cfg, importance=torch.tensor([[[[0.9, 0.1], [0.1, 0.9]]]])).to_level_map()
    # row 0: best block 0 at level 1, block 1 wants 8x but is rough -> capped to 1
    # row 1: best block 1 at level 1, block 0 wants 8x and is smooth -> stays 8
    assert lm.tolist() == [[[[1, 1], [8, 1]]]]


def test_text_tokens_are_forced_to_full(small_qkv):
    q, k, _ = small_qkv
    text = 100
    cfg = PSAConfig(block_q=64, block_kv=32, budgets=(0.05, 0.0, 0.0, 0.1))
    lm = build_block_mask(q, k, cfg, text_len=text).to_level_map()
    first_text_kv = (q.shape[2] - text) // 32
    first_text_q = (q.shape[2] - text) // 64
    assert torch.all(lm[..., first_text_kv:] == 1)
    assert torch.all(lm[..., first_text_q:, :] == 1)
    assert (lm[..., :first_text_q, :first_text_kv] == 0).float().mean() > 0.5


def test_error_falls_as_the_budget_grows(small_qkv):
    q, k, v = small_qkv
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    points = []
    for budgets in [(0.04, 0.02, 0.02, 0.04), (0.1, 0.05, 0.0, 0.2), (0.2, 0.1, 0.1, 0.2), (0.4, 0.2, 0.2, 0.2)]:
        cfg = PSAConfig(block_q=64, block_kv=32, budgets=budgets)
        mask = build_block_mask(q, k, cfg)
        points.append((mask.density(2048, 2048), relative_error(psa_attention_reference(q, k, v, mask), dense)))
    densities, errors = zip(*points)
    assert all(d2 > d1 for d1, d2 in zip(densities, densities[1:]))
    assert all(e2 < e1 for e1, e2 in zip(errors, errors[1:]))
    assert errors[-1] < 0.05 and not math.isnan(errors[0])
