"""Causal PSA at real sizes on a CUDA GPU: the Triton kernel against the float32 causal reference.

Skipped where no CUDA device exists. Run with ``pytest -m gpu tests/ops/test_causal_gpu.py``.
Tolerance as in tests/ops/test_kernels_gpu.py: within ``2 * e_sdpa + 1e-3`` of the reference, where
``e_sdpa`` is the error of bf16 causal SDPA against float32 causal SDPA on the same inputs (the 1e-3
covers the pooled K/V stored in bf16).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.structured_qkv import structured_qkv
from psa_diffusers.attention import psa_attention
from psa_diffusers.config import PSAConfig
from psa_diffusers.mask_builder import build_causal_block_mask
from psa_diffusers.ops.attention import psa_attention_reference, psa_attention_triton
from psa_diffusers.ops.levels import causal_density
from tests.helpers import rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (Triton kernels at real sizes)"),
]


@pytest.mark.parametrize(
    "frames,dim,bq,bkv", [(8, 128, 128, 128), (5, 64, 128, 32), (3, 128, 64, 128)],
    ids=["L8192-d128-128x128", "L5120-d64-128x32", "L3072-d128-64x128"],
)  # fmt: skip
def test_causal_kernel_matches_reference(frames, dim, bq, bkv):
    q, k, v = (t.cuda() for t in structured_qkv(frames, 32, 32, heads=4, dim=dim, seed=0, dtype=torch.bfloat16))
    q, k, v = (t[:, :, 5:] for t in (q, k, v))  # an odd length: partial tail blocks
    config = PSAConfig(block_q=bq, block_kv=bkv, mode="quota", budgets=(0.1, 0.1, 0.1, 0.2), min_full_share=0.0)
    mask = build_causal_block_mask(q, k, config, sink_tokens=128, recent_tokens=512)
    assert causal_density(mask, q.shape[2]).mean() < 0.7
    out = psa_attention_triton(q, k, v, mask, causal=True)
    ref = psa_attention_reference(q.float(), k.float(), v.float(), mask, causal=True)
    e_sdpa = rel_err(F.scaled_dot_product_attention(q, k, v, is_causal=True),
                     F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True))  # fmt: skip
    assert rel_err(out, ref) <= 2 * e_sdpa + 1e-3


def test_causal_full_budget_equals_causal_sdpa():
    q, k, v = (t.cuda() for t in structured_qkv(4, 32, 32, heads=4, dim=128, seed=1, dtype=torch.bfloat16))
    config = PSAConfig(block_q=128, block_kv=64, mode="quota", budgets=(1.0, 0.0, 0.0, 0.0))
    out = psa_attention(q, k, v, config, causal=True, backend="triton")
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    e_sdpa = rel_err(F.scaled_dot_product_attention(q, k, v, is_causal=True), ref)
    assert rel_err(out, ref) <= 2 * e_sdpa + 1e-3
