"""The importance estimate: the sampled block mass against the exact one, and the Triton kernel against the reference.

The kernel runs on CPU under Triton's interpreter; every launcher output is poisoned with NaN
first (``triton_support.POISON_OUTPUTS``), so an element the kernel forgets to write fails.
"""

from __future__ import annotations

import pytest
import torch

from psa_diffusers.ops.importance import (
    estimate_block_importance_reference,
    estimate_block_importance_triton,
    exact_block_mass,
)
from tests.helpers import DT_IDS, needs_interpreter, random_qkv, video_qkv


@pytest.fixture(scope="module")
def small_qkv():
    """8x16x16 video tokens (L 2048), 2 heads, dim 64, raster order."""
    return video_qkv()


def test_importance_rows_sum_to_one_and_track_the_exact_block_mass(small_qkv):
    q, k, _ = small_qkv
    est = estimate_block_importance_reference(q, k, block_q=64, block_kv=32, stride=8)
    exact = exact_block_mass(q, k, block_q=64, block_kv=32)
    assert torch.allclose(est.sum(-1), torch.ones(est.shape[:-1]), atol=1e-5)
    assert torch.allclose(exact.sum(-1), torch.ones(exact.shape[:-1]), atol=1e-5)
    # the estimate's top block carries most of what the exact top block carries
    top_est = exact.gather(-1, est.argmax(-1, keepdim=True))
    top_exact = exact.max(-1, keepdim=True).values
    assert (top_est / top_exact).mean() > 0.8


@needs_interpreter
@pytest.mark.parametrize(
    "d,dtype,bq,bkv,stride,lq,lkv",
    [
        (16, torch.float32, 64, 32, 8, 300, 270),
        (72, torch.float32, 128, 64, 4, 260, 200),
        (64, torch.float16, 64, 32, 8, 200, 200),
        (32, torch.float32, 64, 32, 3, 130, 100),  # stride not dividing the block: padded sample slots
        (16, torch.float32, 64, 32, 1, 70, 90),  # stride 1 = the exact block mass
    ],
    ids=lambda x: DT_IDS.get(x, str(x)),
)
def test_importance_matches_reference(d, dtype, bq, bkv, stride, lq, lkv):
    q, k, _, _ = random_qkv(2, 2, lq, lkv, d, dtype, seed=stride + d)
    q = q * 2  # sharper softmax than unit-variance inputs
    got = estimate_block_importance_triton(q, k, block_q=bq, block_kv=bkv, stride=stride)
    ref = estimate_block_importance_reference(q, k, block_q=bq, block_kv=bkv, stride=stride)
    assert got.shape == ref.shape and got.dtype == torch.float32
    # probabilities in [0, 1], rows summing to 1: absolute tolerance (fp16 products are exact in fp32)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6 if dtype == torch.float32 else 1e-5)
    torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:-1]), rtol=0, atol=1e-5)
