"""Block statistics of the budget mode: the reference against the exact softmax, the Triton kernels against it.

The kernels run on CPU under Triton's interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1``
when no CUDA device exists, before the kernels are imported). Every launcher output is poisoned
with NaN first (``triton_support.POISON_OUTPUTS``), so an element a kernel forgets to write fails.

Kernel tolerances (max over rows of the row's relative L2 error, against the float32
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
from psa_diffusers.budget.statistics import estimate_pyramid_statistics_reference, estimate_pyramid_statistics_triton
from psa_diffusers.budget.variance import pooled_logit_variance_reference
from psa_diffusers.ops.importance import exact_block_mass
from tests.budget.conftest import BKV, BQ
from tests.helpers import needs_interpreter

TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 1e-2)}  # (mass, sq_mass)


def _row_rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().flatten(0, -2), ref.double().flatten(0, -2)
    return ((out - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()


def _random(b, h, lq, lkv, d, dtype, seed, amp=1.5):
    g = torch.Generator().manual_seed(seed)
    q = (amp * torch.randn(b, h, lq, d, generator=g)).to(dtype)
    k = (amp * torch.randn(b, h, lkv, d, generator=g)).to(dtype)
    return q, k


def _compare(q, k, **kw):
    ref = estimate_pyramid_statistics_reference(q.float(), k.float(), **kw)
    got = estimate_pyramid_statistics_triton(q, k, **kw)
    assert torch.isfinite(got.mass).all() and torch.isfinite(got.sq_mass).all(), "unwritten (NaN) outputs"
    assert got.mass.shape == ref.mass.shape and got.sq_mass.shape == ref.sq_mass.shape
    tol_m, tol_s = TOL[q.dtype]
    em, es = _row_rel(got.mass, ref.mass), _row_rel(got.sq_mass, ref.sq_mass)
    assert em < tol_m, f"mass row error {em:.2e} >= {tol_m}"
    assert es < tol_s, f"sq_mass row error {es:.2e} >= {tol_s}"
    return got, ref


# --------------------------------------------------------------------------- reference
def test_statistics_rows_sum_to_one_and_track_the_exact_mass(qkv, stats):
    q, k, _ = qkv
    assert stats.mass.shape == stats.sq_mass.shape == (1, 2, 32, 64) and stats.logit_var.shape == (1, 2, 32, 64, 3)
    assert torch.allclose(stats.mass.sum(-1), torch.ones(1, 2, 32), atol=1e-4)
    assert bool((stats.sq_mass >= 0).all()) and bool((stats.logit_var >= 0).all())
    exact = exact_block_mass(q, k, block_q=BQ, block_kv=BKV)
    # the estimate's top block carries most of what the exact top block carries
    top_est = exact.gather(-1, stats.mass.argmax(-1, keepdim=True))
    assert (top_est / exact.max(-1, keepdim=True).values).mean() > 0.9
    # and the mass it puts on the exact top 10% of blocks is close to the truth
    top = exact.topk(6, -1).indices
    assert (stats.mass.gather(-1, top).sum(-1) - exact.gather(-1, top).sum(-1)).abs().max() < 0.1


@pytest.mark.parametrize("lq, lkv", [(200, 200), (130, 75)])
def test_statistics_are_exact_when_the_refinement_covers_every_key(lq, lkv):
    """With every KV block ranked and every key group refined, no pooled value is left: mass and squared
    mass must equal the brute-force softmax's (float32 sums, tolerance 1e-5)."""
    g = torch.Generator().manual_seed(lq + lkv)
    q, k = (torch.randn(2, 3, n, 16, generator=g) for n in (lq, lkv))
    bq, bkv = 32, 16
    st = estimate_pyramid_statistics_reference(q, k, block_q=bq, block_kv=bkv, refine_blocks=99, refine_groups=999)
    p = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)  # [2, 3, Lq, Lkv]
    nq, nk = -(-lq // bq), -(-lkv // bkv)
    p = torch.nn.functional.pad(p, (0, nk * bkv - lkv, 0, nq * bq - lq)).view(2, 3, nq, bq, nk, bkv)
    n_q = (lq - torch.arange(nq) * bq).clamp(max=bq).float().view(nq, 1)
    assert torch.allclose(st.mass, p.sum((3, 5)) / n_q, atol=1e-5)
    assert torch.allclose(st.sq_mass, p.square().sum((3, 5)), atol=1e-5)


# --------------------------------------------------------------------------- kernels (interpreted)
@needs_interpreter
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


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_structured_matches_reference(dtype):
    """Peaked, video-like attention (L 280, not a multiple of the blocks): the refinement decides sq_mass."""
    q, k, _ = structured_qkv(2, 10, 14, heads=2, dim=64, seed=1, dtype=dtype)
    got, ref = _compare(q, k, block_q=64, block_kv=32)
    # the ranking the budget allocation uses agrees too
    assert torch.equal(got.mass.argmax(-1), ref.mass.argmax(-1))
    assert torch.equal(got.sq_mass.argmax(-1), ref.sq_mass.argmax(-1))


@needs_interpreter
def test_given_var_is_used_and_returned():
    """``var`` passed in is the one used (a different var changes the result) and returned as logit_var."""
    q, k = _random(1, 1, 160, 160, 64, torch.float32, seed=3)
    var = pooled_logit_variance_reference(q, k, block_q=64, block_kv=32)
    got = estimate_pyramid_statistics_triton(q, k, block_q=64, block_kv=32, var=var)
    assert got.logit_var is var
    ref = estimate_pyramid_statistics_reference(q, k, block_q=64, block_kv=32)
    assert _row_rel(got.mass, ref.mass) < 1e-4
    other = estimate_pyramid_statistics_triton(q, k, block_q=64, block_kv=32, var=var * 4.0)
    assert _row_rel(other.mass, ref.mass) > 1e-2


@needs_interpreter
def test_strided_inputs_and_scale():
    """Non-contiguous q, k (a transposed [B, L, H, D] layout) and an explicit scale."""
    q, k = _random(1, 2, 150, 150, 64, torch.float32, seed=5)
    qs, ks = q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2)
    assert not qs.is_contiguous()
    _compare(qs, ks, block_q=64, block_kv=32, scale=0.2)


@needs_interpreter
def test_deterministic():
    q, k = _random(1, 1, 130, 100, 64, torch.float32, seed=7)
    a = estimate_pyramid_statistics_triton(q, k, block_q=64, block_kv=32)
    b = estimate_pyramid_statistics_triton(q, k, block_q=64, block_kv=32)
    assert torch.equal(a.mass, b.mass) and torch.equal(a.sq_mass, b.sq_mass)


@needs_interpreter
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


@needs_interpreter
def test_float32_pooled_means_option():
    """``config={"pooled_fp32": True}`` keeps qbar, kbar in float32: fp16 inputs then match to float32 rounding."""
    q, k, _ = structured_qkv(2, 10, 14, heads=1, dim=64, seed=2, dtype=torch.float16)
    ref = estimate_pyramid_statistics_reference(q.float(), k.float(), block_q=64, block_kv=32)
    got = estimate_pyramid_statistics_triton(q, k, block_q=64, block_kv=32, config={"pooled_fp32": True})
    assert _row_rel(got.mass, ref.mass) < 1e-4
    assert _row_rel(got.sq_mass, ref.sq_mass) < 1e-4


@needs_interpreter
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
    ref = estimate_pyramid_statistics_reference(q, k, block_q=64, block_kv=32, refine_blocks=5, refine_groups=6)
    assert _row_rel(got.mass, ref.mass) < 1e-4 and _row_rel(got.sq_mass, ref.sq_mass) < 1e-4
