"""psa_attention_reference against SDPA (full budget) and against a per-row brute force of DESIGN section 1."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from psa_diffusers.mask import PyramidBlockMask
from psa_diffusers.reference import psa_attention_reference
from tests.helpers import random_level_map, rel_err


def brute_force(q, k, v, level_map, block_q, block_kv, scale):
    """One query row at a time, pooled tokens listed explicitly (float64)."""
    b, h, lq, d = q.shape
    lkv = k.shape[2]
    out = torch.empty(b, h, lq, d, dtype=torch.float64)
    for bb in range(b):
        for hh in range(h):
            for r in range(lq):
                logits, values = [], []
                for j in range(level_map.shape[-1]):
                    s = int(level_map[bb, hh, r // block_q, j])
                    if s == 0:
                        continue
                    for g0 in range(j * block_kv, min(lkv, (j + 1) * block_kv), s):
                        g1 = min(g0 + s, lkv)
                        kbar = k[bb, hh, g0:g1].double().mean(0)
                        vbar = v[bb, hh, g0:g1].double().mean(0)
                        logits.append(scale * (q[bb, hh, r].double() @ kbar) + math.log(g1 - g0))
                        values.append(vbar)
                p = torch.softmax(torch.stack(logits), 0)
                out[bb, hh, r] = p @ torch.stack(values)
    return out


def _qkv(b, h, lq, lkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, h, lq, d, generator=g, dtype=dtype),
        torch.randn(b, h, lkv, d, generator=g, dtype=dtype),
        torch.randn(b, h, lkv, d, generator=g, dtype=dtype),
    )


@pytest.mark.parametrize("d", [16, 32, 64, 72, 128])
@pytest.mark.parametrize("b, lq, lkv", [(1, 128, 128), (2, 200, 200), (2, 130, 77), (3, 63, 259)])
def test_full_budget_equals_sdpa(b, lq, lkv, d):
    bq, bkv = 64, 32
    ones = torch.ones(b, 2, -(-lq // bq), -(-lkv // bkv), dtype=torch.int64)
    mask = PyramidBlockMask.from_level_map(ones, block_q=bq, block_kv=bkv)
    q, k, v = _qkv(b, 2, lq, lkv, d, torch.float64)
    # float64: both sides do the same math in double precision.
    assert rel_err(psa_attention_reference(q, k, v, mask), F.scaled_dot_product_attention(q, k, v)) < 1e-12
    q, k, v = (t.float() for t in (q, k, v))
    # float32: different summation orders, a few ulps of fp32 (1.2e-7) amplified by the softmax sums.
    assert rel_err(psa_attention_reference(q, k, v, mask), F.scaled_dot_product_attention(q, k, v)) < 1e-5


@settings(max_examples=12, deadline=None)
@given(
    b=st.integers(1, 2),
    lq=st.integers(1, 150),
    lkv=st.integers(1, 150),
    d=st.sampled_from([16, 24]),
    bq=st.sampled_from([64, 128]),
    bkv=st.sampled_from([32, 64]),
    seed=st.integers(0, 1000),
)
def test_matches_brute_force_on_random_level_maps(b, lq, lkv, d, bq, bkv, seed):
    q, k, v = _qkv(b, 2, lq, lkv, d, torch.float64, seed)
    lm = random_level_map(b, 2, -(-lq // bq), -(-lkv // bkv), generator=torch.Generator().manual_seed(seed))
    mask = PyramidBlockMask.from_level_map(lm, block_q=bq, block_kv=bkv)
    scale = 0.3
    expected = brute_force(q, k, v, lm, bq, bkv, scale)
    assert rel_err(psa_attention_reference(q, k, v, mask, scale=scale), expected) < 1e-12


def test_identical_keys_in_a_group_make_pooling_exact():
    """ln(c) makes one pooled token weigh as much as the c identical tokens it replaces."""
    q, k, v = _qkv(1, 2, 96, 128, 16, torch.float64)
    k = k[:, :, ::8].repeat_interleave(8, dim=2)  # groups of 8 identical keys
    v = v[:, :, ::8].repeat_interleave(8, dim=2)
    for level in (2, 4, 8):
        lm = torch.full((1, 2, 2, 4), level, dtype=torch.int64)
        mask = PyramidBlockMask.from_level_map(lm, block_q=64, block_kv=32)
        assert rel_err(psa_attention_reference(q, k, v, mask), F.scaled_dot_product_attention(q, k, v)) < 1e-12


def test_skipped_blocks_are_not_seen():
    q, k, v = _qkv(1, 1, 64, 64, 16, torch.float64)
    lm = torch.tensor([[[[1, 0]]]])
    mask = PyramidBlockMask.from_level_map(lm, block_q=64, block_kv=32)
    expected = F.scaled_dot_product_attention(q, k[:, :, :32], v[:, :, :32])
    assert rel_err(psa_attention_reference(q, k, v, mask), expected) < 1e-12


def test_half_precision_inputs_give_their_dtype():
    q, k, v = _qkv(1, 2, 100, 100, 32, torch.float32)
    mask = PyramidBlockMask.from_level_map(torch.ones(1, 2, 2, 4, dtype=torch.int64), block_q=64, block_kv=32)
    out = psa_attention_reference(q.half(), k.half(), v.half(), mask)
    assert out.dtype == torch.float16
    # fp16 inputs (11-bit mantissa) against the fp32 result: ~1e-3 relative.
    assert rel_err(out, F.scaled_dot_product_attention(q, k, v)) < 5e-3


@pytest.mark.slow
def test_long_sequence_runs_in_chunks():
    """L = 32760 would need a 4 GiB [L, L] fp32 matrix per head; the reference works in chunks."""
    length = 32760
    q, k, v = _qkv(1, 1, length, length, 16, torch.float32)
    nq, nk = -(-length // 128), -(-length // 128)
    lm = random_level_map(1, 1, nq, nk, p_skip=0.8)
    mask = PyramidBlockMask.from_level_map(lm, block_q=128, block_kv=128)
    out = psa_attention_reference(q, k, v, mask)
    assert out.shape == q.shape and torch.isfinite(out).all()
    rows = torch.arange(0, length, 8191)  # spot-check some rows against the brute force
    expected = brute_force(q[:, :, rows], k, v, lm[:, :, rows // 128].unsqueeze(2).squeeze(2), 1, 128, 16**-0.5)
    assert rel_err(out[:, :, rows], expected) < 1e-5
