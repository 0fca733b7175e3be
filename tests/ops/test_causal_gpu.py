"""Causal PSA at real sizes on a CUDA GPU: the Triton kernel against the float32 causal reference.

Skipped where no CUDA device exists. Run with ``pytest -m gpu tests/ops/test_causal_gpu.py``.
Tolerance as in tests/ops/test_kernels_gpu.py: within ``2 * e_sdpa + 1e-3`` of the reference, where
``e_sdpa`` is the error of bf16 causal SDPA against float32 causal SDPA on the same inputs (the 1e-3
covers the pooled K/V stored in bf16). The one-launch causal levels kernel at 32768 tokens against the
PyTorch rule on the CPU (quota exact; mass at most 1 row in 1000, the float32 cumulative-sum caveat of
``ops/levels/kernel.py``), and the whole causal mask build under ``torch.cuda.set_sync_debug_mode("error")``.
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
from psa_diffusers.ops.caps import similarity_caps_triton
from psa_diffusers.ops.importance import estimate_block_importance_triton
from psa_diffusers.ops.levels import build_causal_mask_triton, causal_density, causal_levels_reference
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


def _long_qk(length=32768, heads=4):
    q, k, _ = structured_qkv(length // 1024, 32, 32, heads=heads, dim=128, seed=2, dtype=torch.bfloat16)
    return q.cuda(), k.cuda()


@pytest.mark.parametrize("mode", ["quota", "mass"])
def test_causal_levels_kernel_matches_torch_rule_32k(mode):
    q, k = _long_qk()
    q, k = q[:, :, 7:], k[:, :, 7:]  # 32761 tokens: partial tail blocks
    length = q.shape[2]
    budgets = (0.1, 0.05, 0.05, 0.2) if mode == "quota" else (0.5, 0.6, 0.7, 0.8)
    config = PSAConfig(block_q=128, block_kv=128, mode=mode, budgets=budgets, sim_thresholds=(0.7, 0.65, 0.6))
    imp = estimate_block_importance_triton(q, k, block_q=128, block_kv=128, stride=8)
    caps = similarity_caps_triton(k, block_kv=128, thresholds=config.sim_thresholds)
    kwargs = dict(length=length, sink_tokens=128, recent_tokens=1024, text_len=300)
    got = build_causal_mask_triton(imp, config, caps=caps, **kwargs).to_level_map().cpu()
    ref = causal_levels_reference(imp.cpu(), config, caps=caps.cpu(), **kwargs).to_level_map()
    assert (ref == 0).any() and (ref > 1).any()
    bad = (got != ref).any(-1)
    # quota: exact. mass: a cumulative sum in another order may move a block whose predecessors' mass sits
    # within float32 rounding of a threshold by one level
    assert int(bad.sum()) == 0 if mode == "quota" else int(bad.sum()) <= bad.numel() // 1000


def test_causal_mask_build_makes_no_host_synchronisation():
    q, k = _long_qk()
    config = PSAConfig(block_q=128, block_kv=128, mode="quota", budgets=(0.1, 0.05, 0.05, 0.2),
                       sim_thresholds=(0.7, 0.65, 0.6))  # fmt: skip
    kwargs = dict(sink_tokens=128, recent_tokens=1024, text_len=64, backend="triton")
    first = build_causal_block_mask(q, k, config, **kwargs)  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mask = build_causal_block_mask(q, k, config, **kwargs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(mask.kv_counts, first.kv_counts) and torch.equal(mask.kv_indices, first.kv_indices)
