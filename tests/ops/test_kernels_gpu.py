"""The Triton kernels of the ops at real sizes on a CUDA GPU (bf16/fp16), against the float32 references.

Skipped, with the reason shown, where no CUDA device exists. Run on an H100 with
``pytest -m gpu tests/ops/test_kernels_gpu.py``.

Tolerance: the kernel's error against the float32 reference (computed from the
same bf16 inputs) must stay within ``2 * e_sdpa + 1e-3``, where ``e_sdpa`` is the
error of bf16 dense SDPA against float32 dense attention on the same inputs --
a bound relative to what the dtype itself costs, not a magic number. The extra
1e-3 covers the pooled K/V being stored in bf16 (the reference keeps them in
float32): one rounding of a mean, about 2**-9 relative.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.structured_qkv import structured_qkv
from psa_diffusers.config import PSAConfig
from psa_diffusers.mask import PyramidBlockMask
from psa_diffusers.mask_builder import build_block_mask
from psa_diffusers.ops.attention import psa_attention_reference, psa_attention_triton
from psa_diffusers.ops.caps import block_smoothness_reference, similarity_caps_reference, smoothness_and_caps_triton
from psa_diffusers.ops.importance import estimate_block_importance_reference, estimate_block_importance_triton
from psa_diffusers.ops.levels import build_mask_triton
from psa_diffusers.ops.pooling import pool_pyramid_reference, pool_pyramid_triton
from psa_diffusers.ops.triton_support import triton_unsupported_reason
from tests.helpers import random_level_map, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (Triton kernels at real sizes)"),
]


def _dense_error(q, k, v) -> float:
    """Relative error of bf16/fp16 dense SDPA against float32 dense SDPA on the same inputs."""
    low = F.scaled_dot_product_attention(q, k, v)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION):
        high = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    return rel_err(low, high)


def _quota_mask(q, k, block_q, block_kv, fracs=(0.10, 0.05, 0.05, 0.20)):
    s = estimate_block_importance_triton(q, k, block_q=block_q, block_kv=block_kv, stride=8)
    b, h, nq, nk = s.shape
    order = s.argsort(-1, descending=True)
    by_rank = torch.zeros(nk, dtype=torch.int64, device=q.device)
    start = 0
    for level, f in zip((1, 2, 4, 8), fracs):
        c = max(1, round(f * nk)) if level == 1 else round(f * nk)
        by_rank[start : start + c] = level
        start += c
    lm = torch.empty_like(order).scatter_(-1, order, by_rank.expand(b, h, nq, nk))
    return PyramidBlockMask.from_level_map(lm, block_q=block_q, block_kv=block_kv)


def _check(q, k, v, mask, *, extra=1e-3):
    assert triton_unsupported_reason(q, k, v) is None
    out = torch.full_like(q, float("nan"))
    psa_attention_triton(q, k, v, mask, out=out)
    assert torch.isfinite(out).all(), "kernel left elements unwritten or produced NaN/inf"
    ref = psa_attention_reference(q.float(), k.float(), v.float(), mask)
    err = rel_err(out, ref)
    bound = 2 * _dense_error(q, k, v) + extra
    assert err <= bound, f"error {err:.2e} above bound {bound:.2e}"
    return err, bound


def test_wan13_structured_quota_bf16():
    q, k, v = (t[:, :4].cuda() for t in structured_qkv(21, 30, 52, heads=12, dim=128, seed=0))
    mask = _quota_mask(q, k, 128, 128)
    _check(q, k, v, mask)


def test_cogvideox_shape_random_levels_text_batch2():
    g = torch.Generator().manual_seed(1)
    b, h, length, d = 2, 6, 17550 + 226, 64
    q, k, v = (torch.randn(b, h, length, d, generator=g).mul(1.5).to(torch.bfloat16).cuda() for _ in range(3))
    nq = nk = -(-length // 128)
    lm = random_level_map(b, h, nq, nk, generator=g, p_skip=0.7)
    _check(q, k, v, PyramidBlockMask.from_level_map(lm.cuda(), block_q=128, block_kv=128))


@pytest.mark.parametrize("d", [16, 72, 96, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_head_dims_and_dtypes(d, dtype):
    g = torch.Generator().manual_seed(d)
    b, h, lq, lkv = 1, 3, 2000, 2333  # Lq != Lkv, partial tail blocks
    q = torch.randn(b, h, lq, d, generator=g).to(dtype).cuda()
    k, v = (torch.randn(b, h, lkv, d, generator=g).to(dtype).cuda() for _ in range(2))
    lm = random_level_map(b, h, -(-lq // 64), -(-lkv // 32), generator=g)
    _check(q, k, v, PyramidBlockMask.from_level_map(lm.cuda(), block_q=64, block_kv=32))


def test_all_level1_equals_dense_sdpa_strided_input():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 5000, 3, 3, 128, generator=g).to(torch.bfloat16).cuda()  # [B, L, 3, H, D]
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))  # non-contiguous [B, H, L, D] views
    nq = nk = -(-5000 // 128)
    mask = PyramidBlockMask.from_level_map(torch.ones(1, 3, nq, nk, dtype=torch.int64, device="cuda"), block_q=128,
                                           block_kv=128)  # fmt: skip
    out = psa_attention_triton(q, k, v, mask)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION):
        high = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert rel_err(out, high) <= 2 * _dense_error(q, k, v) + 1e-4


def test_pooling_real_size_bf16():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 12, 32760 + 5, 128, generator=g).to(torch.bfloat16).cuda()
    got = pool_pyramid_triton(x)
    ref = pool_pyramid_reference(x)
    for s in (1, 2, 4, 8):
        assert torch.equal(got[s][1], ref[s][1])
        # fp32 sums in another order, then one rounding to bf16: at most one bf16 ulp apart
        torch.testing.assert_close(got[s][0].float(), ref[s][0].float(), rtol=2**-7, atol=1e-6)


def test_importance_real_size_bf16():
    q, k, _ = (t[:, :3].cuda() for t in structured_qkv(21, 30, 52, heads=12, dim=128, seed=1))
    got = estimate_block_importance_triton(q, k, block_q=128, block_kv=128, stride=8)
    ref = estimate_block_importance_reference(q, k, block_q=128, block_kv=128, stride=8)
    # same bf16 products, float32 sums in another order: rows sum to 1, differences ~1e-6
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=2e-5)
    torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)), rtol=0, atol=1e-4)


@pytest.mark.parametrize("mode", ["quota", "mass"])
def test_fused_mask_kernel_matches_mask_builder(mode):
    g = torch.Generator().manual_seed(5)
    b, h, length, text_len = 2, 8, 17550 + 226, 226
    q, k = (torch.randn(b, h, length, 64, generator=g).to(torch.bfloat16).cuda() for _ in range(2))
    budgets = (0.1, 0.05, 0.0, 0.2) if mode == "quota" else (0.5, 0.6, 0.7, 0.8)
    cfg = PSAConfig(block_q=128, block_kv=128, mode=mode, budgets=budgets, sim_thresholds=(0.7, 0.65, 0.6))
    imp = estimate_block_importance_triton(q, k, block_q=128, block_kv=128, stride=8)
    # the PyTorch builder on the CPU (on CUDA build_block_mask itself uses the fused kernel)
    ref = build_block_mask(q.cpu(), k.cpu(), cfg, text_len=text_len, importance=imp.cpu())
    video = (length - text_len) // 128
    caps = similarity_caps_reference(k, block_kv=cfg.block_kv, thresholds=cfg.sim_thresholds)
    got = build_mask_triton(imp, cfg, num_kv_blocks=video, num_q_blocks=video, caps=caps)
    got_map, ref_map = got.to_level_map().cpu(), ref.to_level_map()
    bad = (got_map != ref_map).any(-1).nonzero()
    detail = ""
    if len(bad):
        b0, h0, i0 = bad[0].tolist()
        row = imp[b0, h0, i0]
        detail = (
            f"{len(bad)} rows differ; first {(b0, h0, i0)}: kernel {got_map[b0, h0, i0].tolist()} "
            f"builder {ref_map[b0, h0, i0].tolist()} importance {row.tolist()}"
        )
    # quota: exact. mass: a cumulative sum in another order may move a block whose predecessors' mass
    # sits within float32 rounding of a threshold by one level (at most 1 row in 1000)
    assert len(bad) == 0 if mode == "quota" else len(bad) <= got_map[..., 0].numel() // 1000, detail


def test_smoothness_and_caps_real_size():
    _, k, _ = (t[:, :4].cuda() for t in structured_qkv(21, 30, 52, heads=12, dim=128, seed=0))
    sims = (0.7, 0.65, 0.6)
    smooth, caps = smoothness_and_caps_triton(k, block_kv=128, thresholds=sims)
    ref = block_smoothness_reference(k, block_kv=128)
    torch.testing.assert_close(smooth, ref, rtol=1e-4, atol=1e-5)
    ref_caps = similarity_caps_reference(k, block_kv=128, thresholds=sims)
    # index_add_ on CUDA sums in a nondeterministic order: allow flips only where the reference sits at a threshold
    near = (ref - torch.tensor(sims, device=k.device)).abs().min(-1).values < 1e-5
    assert bool(((caps.long() == ref_caps) | near).all())


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("block_kv", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_descriptor_loads_match_pointer_loads(d, block_kv, dtype):
    """Level-1 tiles through tensor descriptors (TMA) give the same bits as pointer loads, on strided
    ``[B, L, H, D]`` views with a partial tail block, batch 2, and stay within the reference bound."""
    from psa_diffusers.ops.attention.kernel import descriptors_apply

    g = torch.Generator().manual_seed(d + block_kv)
    length = 3000  # 23.4 blocks of 128: a partial tail block
    x = torch.randn(2, length, 3, 4, d, generator=g).to(dtype).cuda()  # [B, L, 3, H, D]
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
    if not descriptors_apply(k, v):
        pytest.skip("tensor descriptors need compute capability 9+")
    lm = random_level_map(2, 4, -(-length // 128), -(-length // block_kv), generator=g, p_skip=0.5)
    mask = PyramidBlockMask.from_level_map(lm.cuda(), block_q=128, block_kv=block_kv)
    base = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8 if d == 128 else 4, "num_stages": 3, "WARP_SPEC": False}
    plain = psa_attention_triton(q, k, v, mask, config={**base, "DESC": False})
    out = torch.full_like(q, float("nan"))
    psa_attention_triton(q, k, v, mask, out=out, config={**base, "DESC": True})
    assert torch.equal(out, plain), "descriptor loads changed the result"
    _check(q, k, v, mask)  # the table's configuration (descriptors on where the table says so) vs the reference
