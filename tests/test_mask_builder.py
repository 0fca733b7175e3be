"""build_block_mask, the recipe over the ops: determinism, forced text levels, error against the budget; the
"density" rule: its target, text, hostile inputs, and its Triton path against the reference."""

import math

import pytest
import torch

from benchmarks.structured_qkv import relative_error, structured_qkv
from psa_diffusers.config import PSAConfig
from psa_diffusers.mask_builder import build_block_mask
from psa_diffusers.ops.attention import psa_attention_reference
from tests.helpers import needs_interpreter, video_qkv


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


# --------------------------------------------------------------------------- the "density" rule
DENSITY_CFG = PSAConfig(block_q=64, block_kv=32, mode="density", target_density=0.15)


def test_density_rule_spends_its_target_and_is_deterministic(small_qkv):
    q, k, _ = small_qkv
    a = build_block_mask(q, k, DENSITY_CFG, backend="reference")
    b = build_block_mask(q.clone(), k.clone(), DENSITY_CFG, backend="reference")
    assert torch.equal(a.kv_indices, b.kv_indices) and torch.equal(a.kv_counts, b.kv_counts)
    per_head = a.density_map(2048, 2048)  # [B, H]
    # each row spends at most its budget; the greedy leaves less than one KV block of it unspent
    assert torch.all(per_head <= 0.15 + 1e-9) and torch.all(per_head > 0.15 - 32 / 2048)


def test_density_rule_forces_text_and_keeps_every_row(small_qkv):
    q, k, _ = small_qkv
    lm = build_block_mask(q, k, DENSITY_CFG, text_len=100, backend="reference").to_level_map()
    assert torch.all(lm[..., (2048 - 100) // 32 :] == 1) and torch.all(lm[..., (2048 - 100) // 64 :, :] == 1)
    bad_q, bad_k = q.clone(), k.clone()
    bad_q[0, 0, 10, 3] = float("nan")
    bad_k[0, 1, 500, 7] = float("inf")
    for qq, kk in ((bad_q, k), (q, bad_k), (q * 3, k * 3)):  # NaN, inf, logits up to ~125
        lm = build_block_mask(qq, kk, DENSITY_CFG, backend="reference").to_level_map()
        assert torch.all((lm == 1).any(-1)), "a row lost its best block"


@needs_interpreter
def test_density_rule_triton_path_equals_reference():
    """The whole recipe on the kernels (key statistics, block statistics, allocation, compaction), float16 inputs."""
    q, k, _ = structured_qkv(2, 8, 16, heads=2, dim=64, seed=5, dtype=torch.float16)
    for text in (0, 30):
        ref = build_block_mask(q, k, DENSITY_CFG, text_len=text, backend="reference")
        got = build_block_mask(q, k, DENSITY_CFG, text_len=text, backend="triton")
        assert torch.equal(got.to_level_map(), ref.to_level_map())
