"""The Triton kernels against their PyTorch references, on CPU under Triton's interpreter.

tests/conftest.py sets ``TRITON_INTERPRET=1`` (when no CUDA device exists)
before the kernels are imported. Sizes are small: the interpreter costs about
10 ms per loop iteration of a program. Every launcher output is poisoned with
NaN first (``_triton.POISON_OUTPUTS``), so an element the kernel forgets to
write fails the comparison.

Tolerances (relative L2 error against the float32 reference unless noted):
- float32: 1e-5. The interpreter's ``tl.dot`` is numpy float32 matmul; only
  summation order differs from the reference (observed ~2e-7).
- float16: 3e-3. The kernel rounds P to fp16 before ``P @ V`` (as every flash
  kernel does) and stores pooled K/V and the output in fp16: a few roundings of
  2**-11 each (observed ~5e-4).
- bfloat16: 2e-2. Same roundings at 2**-8, and the interpreter's fp32->bf16 cast
  truncates instead of rounding (observed ~5e-3).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from psa_diffusers import kernels
from psa_diffusers.importance import estimate_block_importance
from psa_diffusers.kernels import _triton
from psa_diffusers.mask import PyramidBlockMask
from psa_diffusers.pooling import pool_pyramid
from psa_diffusers.reference import psa_attention_reference
from tests.helpers import random_level_map, rel_err

pytestmark = pytest.mark.skipif(
    not (kernels.HAS_TRITON and kernels.INTERPRETED),
    reason="needs triton with TRITON_INTERPRET=1 set before import (tests/conftest.py does it on CPU-only machines)",
)

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
DT_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(_triton, "POISON_OUTPUTS", True)


def _qkv(b, h, lq, lkv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g).to(dtype)
    k = torch.randn(b, h, lkv, d, generator=g).to(dtype)
    v = torch.randn(b, h, lkv, d, generator=g).to(dtype)
    return q, k, v, g


def _run(q, k, v, lm, bq, bkv, **kw):
    mask = PyramidBlockMask.from_level_map(lm, block_q=bq, block_kv=bkv)
    out = torch.full_like(q, float("nan"))
    got = kernels.psa_attention_triton(q, k, v, mask, out=out, **kw)
    assert got is out
    assert torch.isfinite(out).all(), "unwritten (NaN) or non-finite output elements"
    ref = psa_attention_reference(q.float(), k.float(), v.float(), mask, kw.get("scale"))
    return out, ref, mask


# --------------------------------------------------------------------------- attention
@pytest.mark.parametrize(
    "d,dtype,bq,bkv,lq,lkv",
    [
        (16, torch.float32, 64, 32, 150, 181),
        (64, torch.float16, 64, 64, 200, 200),
        (72, torch.float32, 64, 32, 130, 200),
        (128, torch.float16, 128, 128, 200, 300),
        (32, torch.bfloat16, 64, 32, 100, 150),
    ],
    ids=lambda x: DT_IDS.get(x, str(x)),
)
def test_attention_random_levels(d, dtype, bq, bkv, lq, lkv):
    """Random level maps, partial tail blocks on both sides, Lq != Lkv, padded head dims."""
    q, k, v, g = _qkv(1, 2, lq, lkv, d, dtype, seed=d)
    lm = random_level_map(1, 2, -(-lq // bq), -(-lkv // bkv), generator=g)
    out, ref, _ = _run(q, k, v, lm, bq, bkv)
    assert rel_err(out, ref) < TOL[dtype]


def test_attention_batch_and_heads():
    q, k, v, g = _qkv(2, 3, 96, 96, 32, torch.float32, seed=1)
    lm = random_level_map(2, 3, 2, 3, generator=g)
    out, ref, mask = _run(q, k, v, lm, 64, 32, scale=0.3)
    assert rel_err(out, ref) < TOL[torch.float32]
    chunked = kernels.psa_attention_triton(q, k, v, mask, scale=0.3, pool_chunk=4)  # slices 0-3, then 4-5
    assert torch.equal(chunked, out)


def test_attention_single_block_rows_and_all_level8_rows():
    q, k, v, g = _qkv(1, 2, 192, 200, 32, torch.float32, seed=2)
    nq, nk = 3, 7
    lm = torch.zeros(1, 2, nq, nk, dtype=torch.int64)
    lm[0, 0, 0, 3] = 1  # one full block
    lm[0, 0, 1, 6] = 8  # one pooled tail block (200 = 6*32 + 8: a single 8-token group)
    lm[0, 0, 2, 0] = 4
    lm[0, 1, :, :] = 8  # every block at 8x
    lm[0, 1, 1, :] = 2
    out, ref, _ = _run(q, k, v, lm, 64, 32)
    assert rel_err(out, ref) < TOL[torch.float32]


def test_attention_block_spans_several_tiles():
    """block_kv=128 with BLOCK_N=32: a level-1 block is 4 tiles, the tail block (20 tokens) leaves whole tiles empty."""
    q, k, v, g = _qkv(1, 1, 64, 276, 16, torch.float32, seed=3)
    lm = torch.tensor([[[[1, 2, 1]]]])
    out, ref, _ = _run(q, k, v, lm, 64, 128, config={"BLOCK_M": 32, "BLOCK_N": 32})
    assert rel_err(out, ref) < TOL[torch.float32]
    lm = torch.tensor([[[[4, 0, 8]]]])  # pooled tiles packed 2 (4x) and 4 (8x... 16 rows) per 32-row tile
    out, ref, _ = _run(q, k, v, lm, 64, 128, config={"BLOCK_M": 32, "BLOCK_N": 32})
    assert rel_err(out, ref) < TOL[torch.float32]


def test_attention_dense_map_equals_sdpa_and_strided_inputs():
    x = torch.randn(1, 130, 3, 2, 24, generator=torch.Generator().manual_seed(4))  # [B, L, 3, H, D]
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))  # non-contiguous [B, H, L, D]
    lm = torch.ones(1, 2, 3, 5, dtype=torch.int64)
    out, _, _ = _run(q, k, v, lm, 64, 32)
    assert rel_err(out, F.scaled_dot_product_attention(q, k, v)) < TOL[torch.float32]


def test_interpreted_path_really_ran():
    """The kernel ran in the interpreter (not a silent fallback): it tracks the mask, not a near miss of it."""
    assert os.environ.get("TRITON_INTERPRET") == "1" and kernels.INTERPRETED
    assert type(kernels.attention._psa_fwd_kernel).__name__ == "InterpretedFunction"
    q, k, v, g = _qkv(1, 1, 64, 96, 16, torch.float32, seed=5)
    lm = torch.tensor([[[[1, 2, 8]]]])
    out, ref, mask = _run(q, k, v, lm, 64, 32)
    wrong = psa_attention_reference(q, k, v, PyramidBlockMask.from_level_map(torch.tensor([[[[1, 4, 8]]]]),
                                                                           block_q=64, block_kv=32))  # fmt: skip
    assert rel_err(out, ref) < TOL[torch.float32]
    assert rel_err(out, wrong) > 100 * TOL[torch.float32]


def test_attention_rejects_mismatched_mask():
    q, k, v, _ = _qkv(1, 1, 64, 64, 16, torch.float32, seed=6)
    mask = PyramidBlockMask.from_level_map(torch.ones(1, 1, 1, 3, dtype=torch.int64), block_q=64, block_kv=32)
    with pytest.raises(ValueError, match="does not fit"):
        kernels.psa_attention_triton(q, k, v, mask)
    mask = PyramidBlockMask.from_level_map(torch.ones(1, 2, 1, 2, dtype=torch.int64), block_q=64, block_kv=32)
    with pytest.raises(ValueError, match="batch/heads"):
        kernels.psa_attention_triton(q, k, v, mask)


# --------------------------------------------------------------------------- pooling
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DT_IDS.get)
@pytest.mark.parametrize("length", [203, 64, 9])
def test_pooling_matches_reference(dtype, length):
    x = torch.randn(2, 2, length, 40, generator=torch.Generator().manual_seed(length)).to(dtype)
    got = kernels.pool_pyramid_triton(x)
    ref = pool_pyramid(x)
    assert sorted(got) == [1, 2, 4, 8]
    for s in (1, 2, 4, 8):
        assert got[s][0].shape == ref[s][0].shape and got[s][0].dtype == dtype
        assert torch.equal(got[s][1], ref[s][1])
        # fp32 sums in another order; for fp16 then one rounding: at most one fp16 ulp apart
        tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-10, atol=1e-4)
        torch.testing.assert_close(got[s][0], ref[s][0], **tol)


# --------------------------------------------------------------------------- importance
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
    q, k, _, _ = _qkv(2, 2, lq, lkv, d, dtype, seed=stride + d)
    q = q * 2  # sharper softmax than unit-variance inputs
    got = kernels.estimate_block_importance_triton(q, k, block_q=bq, block_kv=bkv, stride=stride)
    ref = estimate_block_importance(q, k, block_q=bq, block_kv=bkv, stride=stride)
    assert got.shape == ref.shape and got.dtype == torch.float32
    # probabilities in [0, 1], rows summing to 1: absolute tolerance (fp16 products are exact in fp32)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6 if dtype == torch.float32 else 1e-5)
    torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:-1]), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- support checks
def test_unsupported_reasons():
    q = torch.randn(1, 2, 16, 32)
    assert kernels.triton_unsupported_reason(q, q, q) is None  # fp32 allowed under the interpreter
    assert kernels.triton_unsupported_reason(q.half(), q.half(), q.half()) is None
    assert "head dim" in kernels.triton_unsupported_reason(*(torch.randn(1, 1, 4, 8),) * 3)
    assert "head dim" in kernels.triton_unsupported_reason(*(torch.randn(1, 1, 4, 264),) * 3)
    assert "dtype" in kernels.triton_unsupported_reason(q.double(), q.double(), q.double())
    assert "float32" in kernels.triton_unsupported_reason(q, q.half(), q.half())
    assert "4-D" in kernels.triton_unsupported_reason(q[0], q[0], q[0])
    assert "lengths" in kernels.triton_unsupported_reason(q, q, q[:, :, :8])
    with pytest.raises(ValueError, match="head dim"):
        kernels.psa_attention_triton(*(torch.randn(1, 1, 4, 8),) * 3, None)  # type: ignore[arg-type]


def test_log_count_bias_matters():
    """A pooled tail group of c < s tokens gets ln(c): with identical keys in a group the result is exact."""
    q, _, v, _ = _qkv(1, 1, 64, 61, 16, torch.float32, seed=7)
    k = torch.randn(1, 1, 8, 16).repeat_interleave(8, dim=2)[:, :, :61]  # groups of 8 identical keys
    lm = torch.tensor([[[[8, 8]]]])
    out, ref, _ = _run(q, k, v, lm, 64, 32)
    assert rel_err(out, ref) < TOL[torch.float32]
    vbar = pool_pyramid(v)[8][0]
    # exact pooled attention: softmax over 8 pooled keys with ln(count) bias
    z = (q @ k[:, :, ::8].transpose(-1, -2)) / math.sqrt(16) + torch.tensor([8.0] * 7 + [5.0]).log()
    assert rel_err(out, torch.softmax(z, -1) @ vbar) < TOL[torch.float32]


# --------------------------------------------------------------------------- levels + compaction
@pytest.mark.parametrize(
    "mode,budgets,sims,text_len",
    [
        ("quota", (0.10, 0.05, 0.05, 0.20), None, 0),
        ("quota", (0.20, 0.10, 0.0, 0.30), (0.7, 0.65, 0.6), 70),
        ("mass", (0.5, 0.6, 0.7, 0.8), None, 0),
        ("mass", (0.4, 0.5, 0.6, 0.8), (0.7, 0.65, 0.6), 70),
    ],
    ids=lambda x: str(x),
)
def test_levels_kernel_matches_mask_builder(mode, budgets, sims, text_len):
    from psa_diffusers.config import PSAConfig
    from psa_diffusers.kernels.levels import build_mask_triton
    from psa_diffusers.mask_builder import build_block_mask, similarity_caps

    cfg = PSAConfig(block_q=64, block_kv=32, mode=mode, budgets=budgets, sim_thresholds=sims)
    q, k, _, _ = _qkv(1, 2, 450, 450, 16, torch.float32, seed=11)
    k = k + torch.linspace(0, 3, 450).view(1, 1, -1, 1)  # some smooth keys, so the caps vary
    imp = estimate_block_importance(q * 2, k, block_q=64, block_kv=32, stride=8)
    imp[0, 1, 1] = imp[0, 1, 1].round(decimals=2)  # exact ties: the stable order must match
    ref = build_block_mask(q, k, cfg, text_len=text_len, importance=imp)
    caps = similarity_caps(k, cfg) if sims is not None else None
    video = dict(num_kv_blocks=(450 - text_len) // 32, num_q_blocks=(450 - text_len) // 64) if text_len else {}
    got = build_mask_triton(imp, cfg, caps=caps, **video)
    assert torch.equal(got.kv_counts, ref.kv_counts.to(torch.int32))
    assert torch.equal(got.kv_indices, ref.kv_indices.to(torch.int32))


@pytest.mark.parametrize("nv,qv", [(None, None), (9, 5)], ids=["no-text", "text"])
def test_compact_kernel_matches_compact(nv, qv):
    from psa_diffusers.kernels.levels import compact_levels_triton

    lm = random_level_map(2, 3, 7, 13, generator=torch.Generator().manual_seed(5))  # Nk=13: padded to 16
    got = compact_levels_triton(lm, block_q=64, block_kv=32, num_kv_blocks=nv, num_q_blocks=qv)
    forced = lm.clone()
    if nv is not None:
        forced[..., nv:] = 1
        forced[..., qv:, :] = 1
    ref = PyramidBlockMask._compact(forced, block_q=64, block_kv=32)
    assert not torch.equal(forced, lm) or nv is None  # the text case really changes the map
    assert torch.equal(got.kv_counts, ref.kv_counts) and torch.equal(got.kv_indices, ref.kv_indices)
    assert torch.equal(got.to_level_map(), forced)


@pytest.mark.parametrize("sims", [None, (0.7, 0.65, 0.6)], ids=["no-cap", "cap"])
def test_budget_mask_on_the_kernels_matches_pytorch(sims, monkeypatch):
    """The GPU path of the budget mode (moments, statistics, allocation, compaction kernels) end to end."""
    from psa_diffusers import mask_builder
    from psa_diffusers.config import PSAConfig

    cfg = PSAConfig(block_q=64, block_kv=32, mode="budget", target_density=0.3, sim_thresholds=sims)
    q, k, _, _ = _qkv(1, 2, 300, 300, 16, torch.float32, seed=3)
    k = k + torch.linspace(0, 3, 300).view(1, 1, -1, 1)  # smooth keys: caps and pooled levels vary
    ref = mask_builder.build_block_mask(q * 2, k, cfg, text_len=40)
    monkeypatch.setattr(mask_builder, "_on_triton", lambda q, k, what: True)  # CPU tensors, interpreted kernels
    got = mask_builder.build_block_mask(q * 2, k, cfg, text_len=40)
    assert len(torch.unique(ref.kv_counts[..., 1:])) > 1  # pooled levels are in use
    assert torch.equal(got.kv_counts, ref.kv_counts.to(torch.int32))
    assert torch.equal(got.kv_indices, ref.kv_indices.to(torch.int32))


@pytest.mark.parametrize("d,bkv,length", [(16, 32, 203), (72, 64, 130)])
def test_smoothness_and_caps_match_reference(d, bkv, length):
    from psa_diffusers.config import PSAConfig
    from psa_diffusers.importance import block_smoothness
    from psa_diffusers.kernels.smoothness import smoothness_and_caps_triton
    from psa_diffusers.mask_builder import similarity_caps

    g = torch.Generator().manual_seed(d)
    k = torch.randn(2, 2, length, d, generator=g) * 0.3 + torch.linspace(-2, 2, length).view(1, 1, -1, 1)
    k[1, 1] = torch.randn(length, d, generator=g)  # a rough head: caps at 1
    sims = (0.7, 0.65, 0.6)
    smooth, caps = smoothness_and_caps_triton(k, block_kv=bkv, thresholds=sims)
    torch.testing.assert_close(smooth, block_smoothness(k, block_kv=bkv), rtol=1e-5, atol=1e-6)
    cfg = PSAConfig(block_q=64, block_kv=bkv, sim_thresholds=sims)
    ref_caps = similarity_caps(k, cfg)
    assert torch.equal(caps.long(), ref_caps) and len(ref_caps.unique()) > 1
