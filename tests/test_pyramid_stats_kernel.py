"""The pyramid-statistics kernels against ``importance.estimate_pyramid_statistics``, under Triton's interpreter.

tests/conftest.py sets ``TRITON_INTERPRET=1`` (when no CUDA device exists) before
the kernels are imported. Every launcher output is poisoned with NaN first
(``_triton.POISON_OUTPUTS``), so an element a kernel forgets to write fails.

Tolerances (max over rows of the row's relative L2 error, against the float32
reference on the same inputs):
- float32: 1e-4 for ``mass`` and ``sq_mass``. The interpreter's ``tl.dot`` is a
  numpy float32 matmul and the kernels sum the same terms as the reference, in
  another order and in log2 units (exp2 instead of exp), and never by subtraction:
  only float32 rounding differs (observed <= 1e-6).
- float16: 2e-3 for ``mass`` and 1e-2 for ``sq_mass``. The pooled means ``qbar``,
  ``kbar`` are rounded to fp16 before ``tl.dot`` (2**-11 relative); with logits up to
  ~10 that is ~5e-3 on a single pooled logit, averaged down in a row (observed
  ~2e-5 / 2e-4 on the structured inputs). ``sq_mass`` squares the probabilities, so
  its error doubles, and its row is dominated by few peaks, so little averages out.
bfloat16 is not tested here: the interpreter multiplies bf16 as integers (the
kernels upcast) and truncates casts; it runs on the GPU only.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.structured_qkv import structured_qkv
from psa_diffusers import kernels
from psa_diffusers.importance import estimate_pyramid_statistics, pooled_logit_variance
from psa_diffusers.kernels import _triton

pytestmark = pytest.mark.skipif(
    not (kernels.HAS_TRITON and kernels.INTERPRETED),
    reason="needs triton with TRITON_INTERPRET=1 set before import (tests/conftest.py does it on CPU-only machines)",
)

if kernels.HAS_TRITON:
    from psa_diffusers.kernels.pyramid_stats import estimate_pyramid_statistics_triton

TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 1e-2)}  # (mass, sq_mass)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(_triton, "POISON_OUTPUTS", True)


def _row_rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().flatten(0, -2), ref.double().flatten(0, -2)
    return ((out - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()


def _random(b, h, lq, lkv, d, dtype, seed, amp=1.5):
    g = torch.Generator().manual_seed(seed)
    q = (amp * torch.randn(b, h, lq, d, generator=g)).to(dtype)
    k = (amp * torch.randn(b, h, lkv, d, generator=g)).to(dtype)
    return q, k


def _compare(q, k, **kw):
    ref = estimate_pyramid_statistics(q.float(), k.float(), **kw)
    got = estimate_pyramid_statistics_triton(q, k, **kw)
    assert torch.isfinite(got.mass).all() and torch.isfinite(got.sq_mass).all(), "unwritten (NaN) outputs"
    assert got.mass.shape == ref.mass.shape and got.sq_mass.shape == ref.sq_mass.shape
    tol_m, tol_s = TOL[q.dtype]
    em, es = _row_rel(got.mass, ref.mass), _row_rel(got.sq_mass, ref.sq_mass)
    assert em < tol_m, f"mass row error {em:.2e} >= {tol_m}"
    assert es < tol_s, f"sq_mass row error {es:.2e} >= {tol_s}"
    return got, ref


@pytest.mark.parametrize(
    "b,h,lq,lkv,d,dtype,bq,bkv,rb,rg",
    [
        (1, 1, 200, 150, 64, torch.float32, 64, 32, 16, 16),  # partial blocks and groups, Lq != Lkv
        (2, 1, 130, 300, 64, torch.float32, 64, 64, 3, 5),  # B > 1, few refined blocks/groups
        (1, 2, 100, 100, 128, torch.float32, 32, 32, 40, 16),  # refine_blocks > Nk, D = 128
        (1, 1, 260, 250, 128, torch.float16, 128, 128, 16, 40),  # refine_groups > groups of the ranked blocks
        (1, 1, 129, 77, 64, torch.float16, 128, 64, 2, 7),  # one query block, last group of 1 query
    ],
)
def test_random_matches_reference(b, h, lq, lkv, d, dtype, bq, bkv, rb, rg):
    _compare(
        *_random(b, h, lq, lkv, d, dtype, seed=lq + lkv), block_q=bq, block_kv=bkv, refine_blocks=rb, refine_groups=rg
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_structured_matches_reference(dtype):
    """Peaked, video-like attention (L 280, not a multiple of the blocks): the refinement decides sq_mass."""
    q, k, _ = structured_qkv(2, 10, 14, heads=2, dim=64, seed=1, dtype=dtype)
    got, ref = _compare(q, k, block_q=64, block_kv=32)
    # the ranking the budget allocation uses agrees too
    assert torch.equal(got.mass.argmax(-1), ref.mass.argmax(-1))
    assert torch.equal(got.sq_mass.argmax(-1), ref.sq_mass.argmax(-1))


def test_given_var_is_used_and_returned():
    """``var`` passed in is the one used (a different var changes the result) and returned as logit_var."""
    q, k = _random(1, 1, 160, 160, 64, torch.float32, seed=3)
    var = pooled_logit_variance(q, k, block_q=64, block_kv=32)
    got = estimate_pyramid_statistics_triton(q, k, block_q=64, block_kv=32, var=var)
    assert got.logit_var is var
    ref = estimate_pyramid_statistics(q, k, block_q=64, block_kv=32)
    assert _row_rel(got.mass, ref.mass) < 1e-4
    other = estimate_pyramid_statistics_triton(q, k, block_q=64, block_kv=32, var=var * 4.0)
    assert _row_rel(other.mass, ref.mass) > 1e-2


def test_strided_inputs_and_scale():
    """Non-contiguous q, k (a transposed [B, L, H, D] layout) and an explicit scale."""
    q, k = _random(1, 2, 150, 150, 64, torch.float32, seed=5)
    qs, ks = q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2)
    assert not qs.is_contiguous()
    _compare(qs, ks, block_q=64, block_kv=32, scale=0.2)


def test_deterministic():
    q, k = _random(1, 1, 130, 100, 64, torch.float32, seed=7)
    a = estimate_pyramid_statistics_triton(q, k, block_q=64, block_kv=32)
    b = estimate_pyramid_statistics_triton(q, k, block_q=64, block_kv=32)
    assert torch.equal(a.mass, b.mass) and torch.equal(a.sq_mass, b.sq_mass)


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(block_q=48, block_kv=32), ["block_q=48", "power of two"]),
        (dict(block_q=64, block_kv=32, group=4), ["group=4", "at least 8"]),
        (dict(block_q=64, block_kv=32, group=64), ["group=64", "block_kv=32"]),
        (dict(block_q=64, block_kv=32, refine_blocks=0), ["refine_blocks=0"]),
        (dict(block_q=64, block_kv=32, refine_groups=2.0), ["refine_groups=2.0"]),
        (dict(block_q=64, block_kv=32, var=torch.zeros(1, 1, 2, 2, 3)), ["var", "(1, 1, 2, 4, 3)"]),
    ],
)
def test_rejects_bad_arguments(kw, words):
    q, k = _random(1, 1, 100, 100, 64, torch.float32, seed=0)
    with pytest.raises(ValueError) as err:
        estimate_pyramid_statistics_triton(q, k, **kw)
    for w in words:
        assert w in str(err.value)


def test_float32_pooled_means_option():
    """``config={"pooled_fp32": True}`` keeps qbar, kbar in float32: fp16 inputs then match to float32 rounding."""
    q, k, _ = structured_qkv(2, 10, 14, heads=1, dim=64, seed=2, dtype=torch.float16)
    ref = estimate_pyramid_statistics(q.float(), k.float(), block_q=64, block_kv=32)
    got = estimate_pyramid_statistics_triton(q, k, block_q=64, block_kv=32, config={"pooled_fp32": True})
    assert _row_rel(got.mass, ref.mass) < 1e-4
    assert _row_rel(got.sq_mass, ref.sq_mass) < 1e-4


@pytest.mark.parametrize(
    "config",
    [
        {"rank_warps": 4, "select_warps": 8, "exact_warps": 8, "exact_pairs": 3},
        {"split": 3, "BLOCK_N": 16},
    ],
    ids=["warps", "split"],
)
def test_config_variants_give_the_same_result(config):
    """Other warp counts, the key tiles over three programs."""
    q, k = _random(1, 1, 200, 300, 64, torch.float32, seed=11)
    got = estimate_pyramid_statistics_triton(
        q, k, block_q=64, block_kv=32, refine_blocks=5, refine_groups=6, config=config
    )
    ref = estimate_pyramid_statistics(q, k, block_q=64, block_kv=32, refine_blocks=5, refine_groups=6)
    assert _row_rel(got.mass, ref.mass) < 1e-4 and _row_rel(got.sq_mass, ref.sq_mass) < 1e-4
