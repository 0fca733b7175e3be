"""Within-group logit variance: the reference against a brute force, the Triton kernel against the reference.

The kernel runs on CPU under Triton's interpreter; every launcher output is poisoned with NaN
first (``triton_support.POISON_OUTPUTS``), so an element the kernel forgets to write fails.

Kernel tolerances (relative L2 error of the whole ``[B, H, Nq, Nk, 3]`` tensor):
- float32: 1e-5. Moments and the GEMM stay float32; only summation order differs (observed ~2e-7).
- float16: 2e-2. The moments are stored in bfloat16 (2**-9 relative per entry, chosen for range:
  a sum of 128 squared activations can exceed float16's 65504), and the trace sums entries of
  both signs, so cancellation can amplify it a few times (observed ~6e-3).
"""

from __future__ import annotations

import pytest
import torch

from psa_diffusers.budget.variance import (
    block_moments_triton,
    packed_size,
    pooled_logit_variance_reference,
    pooled_logit_variance_triton,
)
from tests.helpers import needs_interpreter, rel_err


def test_logit_variance_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 150, 16, generator=g), torch.randn(1, 2, 100, 16, generator=g)  # partial last blocks
    var = pooled_logit_variance_reference(q, k, block_q=64, block_kv=32, scale=0.3)
    for s_i, s in enumerate((2, 4, 8)):
        for i, j in [(0, 0), (2, 3), (1, 2)]:
            qi = q[0, 1, i * 64 : (i + 1) * 64]
            kj = k[0, 1, j * 32 : (j + 1) * 32]
            groups = torch.split(kj, s)
            dev = torch.cat([grp - grp.mean(0) for grp in groups])
            want = ((0.3 * qi @ dev.T) ** 2).mean()
            assert torch.allclose(var[0, 1, i, j, s_i], want, rtol=1e-4, atol=1e-6)


@needs_interpreter
@pytest.mark.parametrize(
    "b,h,lq,lkv,d,bq,bkv",
    [
        (1, 2, 200, 170, 32, 64, 32),  # partial last blocks on both sides, Lq != Lkv
        (2, 1, 130, 257, 64, 128, 128),  # batch > 1, a KV block with a single token
        (1, 1, 128, 128, 80, 64, 64),  # head dim that is not a power of two
        (1, 1, 96, 136, 128, 64, 128),
    ],
)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-2)], ids=["fp32", "fp16"])
def test_variance_matches_reference(b, h, lq, lkv, d, bq, bkv, dtype, tol):
    g = torch.Generator().manual_seed(lq + lkv + d)
    q = torch.randn(b, h, lq, d, generator=g)
    # keys with a smooth part, so groups are partly alike as in video (and the scatter is not all noise)
    k = torch.randn(b, h, lkv, d, generator=g) + 2 * torch.randn(b, h, 1, d, generator=g)
    ref = pooled_logit_variance_reference(q.to(dtype).float(), k.to(dtype).float(), block_q=bq, block_kv=bkv)
    out = pooled_logit_variance_triton(q.to(dtype), k.to(dtype), block_q=bq, block_kv=bkv)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert bool(torch.isfinite(out).all())
    assert rel_err(out, ref) < tol


@needs_interpreter
def test_packed_moments_hold_the_upper_triangle():
    x = torch.randn(1, 1, 70, 24)  # two blocks of 64, the second with 6 tokens
    out = block_moments_triton(x, block=64, centred=False)
    p = 24 * 25 // 2
    assert out.shape == (1, 2, 1, packed_size(24)) and packed_size(24) % 8 == 0
    assert bool((out[..., p:] == 0).all())  # padding is written as zeros, not left poisoned
    a, b = torch.triu_indices(24, 24)
    for blk, rows in enumerate((x[0, 0, :64], x[0, 0, 64:])):
        full = rows.T @ rows
        torch.testing.assert_close(out[0, blk, 0, :p], full[a, b], rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_bad_block_sizes_raise():
    q = torch.randn(1, 1, 64, 32)
    with pytest.raises(ValueError, match="block_q=96"):
        pooled_logit_variance_triton(q, q, block_q=96, block_kv=64)
    with pytest.raises(ValueError, match="block=48"):
        block_moments_triton(q, block=48, centred=True)
