"""plan_attention / run_attention: a mask built once, run many times, equals psa_attention."""

from __future__ import annotations

import pytest
import torch

from psa_diffusers import PSAConfig, PyramidBlockMask, plan_attention, psa_attention, run_attention
from psa_diffusers.ops import triton_support
from tests.helpers import random_level_map, rel_err

CONFIG = PSAConfig(block_q=64, block_kv=32, budgets=(0.2, 0.1, 0.1, 0.2))


def _qkv(length=190, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 3, length, d, generator=g).to(dtype) for _ in range(3))


def test_plan_then_run_equals_psa_attention():
    q, k, v = _qkv()
    out, mask = psa_attention(q, k, v, CONFIG, text_len=10, return_mask=True)
    plan = plan_attention(q, k, v, CONFIG, text_len=10)
    assert torch.equal(plan.mask.to_level_map(), mask.to_level_map())
    assert torch.equal(run_attention(plan, q, k, v), out)


def test_a_plan_serves_other_values():
    q, k, v = _qkv()
    plan = plan_attention(q, k, None, CONFIG)
    v2 = torch.randn_like(v)
    assert torch.equal(run_attention(plan, q, k, v2), psa_attention(q, k, v2, mask=plan.mask))


def test_plan_takes_a_ready_mask():
    q, k, v = _qkv(length=128)
    lm = random_level_map(2, 3, 2, 4, generator=torch.Generator().manual_seed(3))
    mask = PyramidBlockMask.from_level_map(lm, block_q=64, block_kv=32)
    plan = plan_attention(q, k, v, mask=mask)
    assert plan.mask is mask
    assert torch.equal(run_attention(plan, q, k, v), psa_attention(q, k, v, mask=mask))


def test_run_refuses_inputs_the_plan_does_not_fit():
    q, k, v = _qkv()
    plan = plan_attention(q, k, v, CONFIG)
    q2, k2, v2 = _qkv(length=300)
    with pytest.raises(ValueError, match="does not fit"):
        run_attention(plan, q2, k2, v2)


@pytest.mark.skipif(
    not (triton_support.HAS_TRITON and triton_support.INTERPRETED),
    reason="needs triton with TRITON_INTERPRET=1 set before import (tests/conftest.py does it on CPU-only machines)",
)
def test_triton_plan_pools_once_and_matches_the_reference():
    q, k, v = _qkv(length=130, dtype=torch.float16)
    plan = plan_attention(q, k, v, CONFIG, backend="triton")
    assert plan.backend == "triton" and plan.pooled_kv is not None
    kp, vp = plan.pooled_kv
    assert kp.shape == (6, 65 + 33 + 17, 16) and not kp.isnan().any()  # levels 2, 4, 8 of 130 tokens
    ref = psa_attention(q.float(), k.float(), v.float(), mask=plan.mask, backend="reference")
    assert rel_err(run_attention(plan, q, k, v), ref) < 3e-3  # fp16 tolerance of tests/ops/test_attention.py
