"""Sparse pyramid attention: the reference against SDPA and a brute force, the Triton kernel against the reference.

The reference (``psa_attention_reference``) is checked against SDPA at full budget and against a
per-row brute force of docs/design.md, section 1. The kernel (``psa_attention_triton``) runs on CPU under
Triton's interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1`` when no CUDA device exists,
before the kernels are imported). Sizes are small: the interpreter costs about 10 ms per loop
iteration of a program. Every launcher output is poisoned with NaN first
(``triton_support.POISON_OUTPUTS``), so an element the kernel forgets to write fails the comparison.

Kernel tolerances (relative L2 error against the float32 reference unless noted):
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
from hypothesis import given, settings
from hypothesis import strategies as st

import psa_diffusers.ops.attention.kernel as attention_kernel
from psa_diffusers.mask import PyramidBlockMask
from psa_diffusers.ops import triton_support
from psa_diffusers.ops.attention import psa_attention_reference, psa_attention_triton
from psa_diffusers.ops.pooling import pool_pyramid_reference
from psa_diffusers.ops.triton_support import triton_unsupported_reason
from tests.helpers import DT_IDS, needs_interpreter, random_level_map, random_qkv, rel_err

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


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


def _reference_qkv(b, h, lq, lkv, d, dtype, seed=0):
    """q, k, v drawn directly in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, h, lq, d, generator=g, dtype=dtype),
        torch.randn(b, h, lkv, d, generator=g, dtype=dtype),
        torch.randn(b, h, lkv, d, generator=g, dtype=dtype),
    )


def _run(q, k, v, lm, bq, bkv, **kw):
    mask = PyramidBlockMask.from_level_map(lm, block_q=bq, block_kv=bkv)
    out = torch.full_like(q, float("nan"))
    got = psa_attention_triton(q, k, v, mask, out=out, **kw)
    assert got is out
    assert torch.isfinite(out).all(), "unwritten (NaN) or non-finite output elements"
    ref = psa_attention_reference(q.float(), k.float(), v.float(), mask, kw.get("scale"))
    return out, ref, mask


# --------------------------------------------------------------------------- reference
@pytest.mark.parametrize("d", [16, 32, 64, 72, 128])
@pytest.mark.parametrize("b, lq, lkv", [(1, 128, 128), (2, 200, 200), (2, 130, 77), (3, 63, 259)])
def test_full_budget_equals_sdpa(b, lq, lkv, d):
    bq, bkv = 64, 32
    ones = torch.ones(b, 2, -(-lq // bq), -(-lkv // bkv), dtype=torch.int64)
    mask = PyramidBlockMask.from_level_map(ones, block_q=bq, block_kv=bkv)
    q, k, v = _reference_qkv(b, 2, lq, lkv, d, torch.float64)
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
    q, k, v = _reference_qkv(b, 2, lq, lkv, d, torch.float64, seed)
    lm = random_level_map(b, 2, -(-lq // bq), -(-lkv // bkv), generator=torch.Generator().manual_seed(seed))
    mask = PyramidBlockMask.from_level_map(lm, block_q=bq, block_kv=bkv)
    scale = 0.3
    expected = brute_force(q, k, v, lm, bq, bkv, scale)
    assert rel_err(psa_attention_reference(q, k, v, mask, scale=scale), expected) < 1e-12


def test_identical_keys_in_a_group_make_pooling_exact():
    """ln(c) makes one pooled token weigh as much as the c identical tokens it replaces."""
    q, k, v = _reference_qkv(1, 2, 96, 128, 16, torch.float64)
    k = k[:, :, ::8].repeat_interleave(8, dim=2)  # groups of 8 identical keys
    v = v[:, :, ::8].repeat_interleave(8, dim=2)
    for level in (2, 4, 8):
        lm = torch.full((1, 2, 2, 4), level, dtype=torch.int64)
        mask = PyramidBlockMask.from_level_map(lm, block_q=64, block_kv=32)
        assert rel_err(psa_attention_reference(q, k, v, mask), F.scaled_dot_product_attention(q, k, v)) < 1e-12


def test_skipped_blocks_are_not_seen():
    q, k, v = _reference_qkv(1, 1, 64, 64, 16, torch.float64)
    lm = torch.tensor([[[[1, 0]]]])
    mask = PyramidBlockMask.from_level_map(lm, block_q=64, block_kv=32)
    expected = F.scaled_dot_product_attention(q, k[:, :, :32], v[:, :, :32])
    assert rel_err(psa_attention_reference(q, k, v, mask), expected) < 1e-12


def test_half_precision_inputs_give_their_dtype():
    q, k, v = _reference_qkv(1, 2, 100, 100, 32, torch.float32)
    mask = PyramidBlockMask.from_level_map(torch.ones(1, 2, 2, 4, dtype=torch.int64), block_q=64, block_kv=32)
    out = psa_attention_reference(q.half(), k.half(), v.half(), mask)
    assert out.dtype == torch.float16
    # fp16 inputs (11-bit mantissa) against the fp32 result: ~1e-3 relative.
    assert rel_err(out, F.scaled_dot_product_attention(q, k, v)) < 5e-3


@pytest.mark.slow
def test_long_sequence_runs_in_chunks():
    """L = 32760 would need a 4 GiB [L, L] fp32 matrix per head; the reference works in chunks."""
    length = 32760
    q, k, v = _reference_qkv(1, 1, length, length, 16, torch.float32)
    nq, nk = -(-length // 128), -(-length // 128)
    lm = random_level_map(1, 1, nq, nk, p_skip=0.8)
    mask = PyramidBlockMask.from_level_map(lm, block_q=128, block_kv=128)
    out = psa_attention_reference(q, k, v, mask)
    assert out.shape == q.shape and torch.isfinite(out).all()
    rows = torch.arange(0, length, 8191)  # spot-check some rows against the brute force
    expected = brute_force(q[:, :, rows], k, v, lm[:, :, rows // 128].unsqueeze(2).squeeze(2), 1, 128, 16**-0.5)
    assert rel_err(out[:, :, rows], expected) < 1e-5


# --------------------------------------------------------------------------- kernel (interpreted)
@needs_interpreter
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
    q, k, v, g = random_qkv(1, 2, lq, lkv, d, dtype, seed=d)
    lm = random_level_map(1, 2, -(-lq // bq), -(-lkv // bkv), generator=g)
    out, ref, _ = _run(q, k, v, lm, bq, bkv)
    assert rel_err(out, ref) < TOL[dtype]


@needs_interpreter
def test_attention_batch_and_heads():
    q, k, v, g = random_qkv(2, 3, 96, 96, 32, torch.float32, seed=1)
    lm = random_level_map(2, 3, 2, 3, generator=g)
    out, ref, mask = _run(q, k, v, lm, 64, 32, scale=0.3)
    assert rel_err(out, ref) < TOL[torch.float32]
    chunked = psa_attention_triton(q, k, v, mask, scale=0.3, pool_chunk=4)  # slices 0-3, then 4-5
    assert torch.equal(chunked, out)


@needs_interpreter
def test_attention_single_block_rows_and_all_level8_rows():
    q, k, v, g = random_qkv(1, 2, 192, 200, 32, torch.float32, seed=2)
    nq, nk = 3, 7
    lm = torch.zeros(1, 2, nq, nk, dtype=torch.int64)
    lm[0, 0, 0, 3] = 1  # one full block
    lm[0, 0, 1, 6] = 8  # one pooled tail block (200 = 6*32 + 8: a single 8-token group)
    lm[0, 0, 2, 0] = 4
    lm[0, 1, :, :] = 8  # every block at 8x
    lm[0, 1, 1, :] = 2
    out, ref, _ = _run(q, k, v, lm, 64, 32)
    assert rel_err(out, ref) < TOL[torch.float32]


@needs_interpreter
def test_attention_block_spans_several_tiles():
    """block_kv=128 with BLOCK_N=32: a level-1 block is 4 tiles, the tail block (20 tokens) leaves whole tiles empty."""
    q, k, v, g = random_qkv(1, 1, 64, 276, 16, torch.float32, seed=3)
    lm = torch.tensor([[[[1, 2, 1]]]])
    out, ref, _ = _run(q, k, v, lm, 64, 128, config={"BLOCK_M": 32, "BLOCK_N": 32})
    assert rel_err(out, ref) < TOL[torch.float32]
    lm = torch.tensor([[[[4, 0, 8]]]])  # pooled tiles packed 2 (4x) and 4 (8x... 16 rows) per 32-row tile
    out, ref, _ = _run(q, k, v, lm, 64, 128, config={"BLOCK_M": 32, "BLOCK_N": 32})
    assert rel_err(out, ref) < TOL[torch.float32]


@needs_interpreter
def test_attention_dense_map_equals_sdpa_and_strided_inputs():
    x = torch.randn(1, 130, 3, 2, 24, generator=torch.Generator().manual_seed(4))  # [B, L, 3, H, D]
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))  # non-contiguous [B, H, L, D]
    lm = torch.ones(1, 2, 3, 5, dtype=torch.int64)
    out, _, _ = _run(q, k, v, lm, 64, 32)
    assert rel_err(out, F.scaled_dot_product_attention(q, k, v)) < TOL[torch.float32]


@needs_interpreter
def test_interpreted_path_really_ran():
    """The kernel ran in the interpreter (not a silent fallback): it tracks the mask, not a near miss of it."""
    assert os.environ.get("TRITON_INTERPRET") == "1" and triton_support.INTERPRETED
    assert type(attention_kernel._psa_fwd_kernel).__name__ == "InterpretedFunction"
    q, k, v, g = random_qkv(1, 1, 64, 96, 16, torch.float32, seed=5)
    lm = torch.tensor([[[[1, 2, 8]]]])
    out, ref, mask = _run(q, k, v, lm, 64, 32)
    wrong = psa_attention_reference(q, k, v, PyramidBlockMask.from_level_map(torch.tensor([[[[1, 4, 8]]]]),
                                                                           block_q=64, block_kv=32))  # fmt: skip
    assert rel_err(out, ref) < TOL[torch.float32]
    assert rel_err(out, wrong) > 100 * TOL[torch.float32]


@needs_interpreter
def test_attention_rejects_mismatched_mask():
    q, k, v, _ = random_qkv(1, 1, 64, 64, 16, torch.float32, seed=6)
    mask = PyramidBlockMask.from_level_map(torch.ones(1, 1, 1, 3, dtype=torch.int64), block_q=64, block_kv=32)
    with pytest.raises(ValueError, match="does not fit"):
        psa_attention_triton(q, k, v, mask)
    mask = PyramidBlockMask.from_level_map(torch.ones(1, 2, 1, 2, dtype=torch.int64), block_q=64, block_kv=32)
    with pytest.raises(ValueError, match="batch/heads"):
        psa_attention_triton(q, k, v, mask)


@needs_interpreter
def test_unsupported_reasons():
    q = torch.randn(1, 2, 16, 32)
    assert triton_unsupported_reason(q, q, q) is None  # fp32 allowed under the interpreter
    assert triton_unsupported_reason(q.half(), q.half(), q.half()) is None
    assert "head dim" in triton_unsupported_reason(*(torch.randn(1, 1, 4, 8),) * 3)
    assert "head dim" in triton_unsupported_reason(*(torch.randn(1, 1, 4, 264),) * 3)
    assert "dtype" in triton_unsupported_reason(q.double(), q.double(), q.double())
    assert "float32" in triton_unsupported_reason(q, q.half(), q.half())
    assert "4-D" in triton_unsupported_reason(q[0], q[0], q[0])
    assert "lengths" in triton_unsupported_reason(q, q, q[:, :, :8])
    with pytest.raises(ValueError, match="head dim"):
        psa_attention_triton(*(torch.randn(1, 1, 4, 8),) * 3, None)  # type: ignore[arg-type]


@needs_interpreter
def test_log_count_bias_matters():
    """A pooled tail group of c < s tokens gets ln(c): with identical keys in a group the result is exact."""
    q, _, v, _ = random_qkv(1, 1, 64, 61, 16, torch.float32, seed=7)
    k = torch.randn(1, 1, 8, 16).repeat_interleave(8, dim=2)[:, :, :61]  # groups of 8 identical keys
    lm = torch.tensor([[[[8, 8]]]])
    out, ref, _ = _run(q, k, v, lm, 64, 32)
    assert rel_err(out, ref) < TOL[torch.float32]
    vbar = pool_pyramid_reference(v)[8][0]
    # exact pooled attention: softmax over 8 pooled keys with ln(count) bias
    z = (q @ k[:, :, ::8].transpose(-1, -2)) / math.sqrt(16) + torch.tensor([8.0] * 7 + [5.0]).log()
    assert rel_err(out, torch.softmax(z, -1) @ vbar) < TOL[torch.float32]
