"""build_block_mask, the recipe over the ops: determinism, forced text levels, error against the budget."""

import math

import pytest
import torch

from benchmarks.structured_qkv import relative_error
from psa_diffusers.config import PSAConfig
from psa_diffusers.mask_builder import build_block_mask
from psa_diffusers.ops.attention import psa_attention_reference
from tests.helpers import video_qkv


@pytest.fixture(scope="module")
def small_qkv():
    """8x16x16 video tokens (L 2048), 2 heads, dim 64, raster order."""
    return video_qkv()


def test_mask_is_bit_identical_across_calls(small_qkv):
    q, k, _ = small_qkv
    cfg = PSAConfig(block_q=64, block_kv=32, mode="mass", budgets=(0.5, 0.6, 0.7, 0.8), sim_thresholds=(0.7, 0.65, 0.6))
    a, b = build_block_mask(q, k, cfg), build_block_mask(q.clone(), k.clone(), cfg)
    assert torch.equal(a.kv_indices, b.kv_indices) and torch.equal(a.kv_counts, b.kv_counts)


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
