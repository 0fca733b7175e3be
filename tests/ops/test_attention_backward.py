"""The Triton backward of sparse pyramid attention against autograd through the PyTorch reference,
and the forward's saved log-sum-exp against a float64 one.

The expected gradients come from ``torch.autograd.grad`` through ``psa_attention_reference`` on float32
copies of the inputs (not from the hand-written ``psa_attention_backward_reference``), so the kernel is
checked against the forward's own math. The backward reads the forward's output and log-sum-exp
(``psa_attention_triton(..., return_lse=True)``), as ``psa.attention``'s autograd does; the expected
log-sum-exp is ``torch.logsumexp`` of the pyramid logits built here in float64 (:func:`pyramid_logits64`).
Under the interpreter (CPU) the sizes are small; the real sizes run on CUDA
(``pytest -m gpu tests/ops/test_attention_backward.py``). Every launcher output (the forward's out and
lse, dq, dk, dv and the internal delta/pooled-gradient buffers) is poisoned with NaN first
(``triton_support.POISON_OUTPUTS``, tests/conftest.py), so an element a kernel forgets fails.

Log-sum-exp tolerances (absolute, natural log; values up to ~15):
- float32: 2e-5, about 10 float32 ulps of 16: rounding of the logits' sums (observed ~3e-6).
- float16 (and the GPU's fp16): 5e-3. The pooled keys are stored in fp16 (one rounding of at most 2**-12
  relative per element), which moves a pooled logit by ~3e-4 (one standard deviation at these scales);
  observed ~1.3e-3. bfloat16 (GPU): 2e-2, the same rounding at 2**-9 (8x).

Gradient tolerances (relative L2 error per gradient, against the float32 reference):
- float32 (interpreter): 1e-5. Only the summation order differs (observed ~5e-7).
- float16 (interpreter): 5e-3. The kernels round P and dS to fp16 before their products (as every
  FlashAttention backward does), and pooled K/V and the gradients are stored in fp16: a few
  roundings of 2**-11 each (observed ~4e-4).
- GPU, bf16/fp16: at most ``2 * e_sdpa + 2e-3``, where ``e_sdpa`` is the error of the same-dtype
  dense SDPA backward against float32 dense on the same inputs (what the dtype itself costs); the
  2e-3 covers pooled K/V stored in the low dtype (one rounding of a mean, 2**-9 relative in bf16).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import psa_diffusers  # noqa: F401  (registers torch.ops.psa)
import psa_diffusers.ops.attention.backward_kernel as backward_kernel
from psa_diffusers.mask import PyramidBlockMask
from psa_diffusers.ops import triton_support
from psa_diffusers.ops.attention import (
    psa_attention_backward_reference,
    psa_attention_backward_triton,
    psa_attention_reference,
    psa_attention_triton,
    sparse_attention_backward,
    transposed_mask,
)
from tests.helpers import DT_IDS, needs_interpreter, random_level_map, rel_err
from tests.ops.test_causal import causal_map

TOL = {torch.float32: 1e-5, torch.float16: 5e-3}
LSE_ATOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def pyramid_logits64(q, k, level_map, bq, bkv, scale, causal=False):
    """``[B, H, Lq, L1+L2+L4+L8]`` float64: every query's logit against every pooled token of every level
    (``scale * q . kbar + ln(c)``, ``c`` real tokens in the group), -inf where the level map (or, with
    ``causal``, a group ending after the query) hides it."""
    b, h, lq, d = q.shape
    lkv = k.shape[2]
    rows = torch.arange(lq, device=q.device)
    lm = level_map.to(q.device)
    parts = []
    for s in (1, 2, 4, 8):
        groups = -(-lkv // s)
        first = torch.arange(groups, device=q.device) * s
        count = (lkv - first).clamp(max=s)
        ksum = F.pad(k.double(), (0, 0, 0, groups * s - lkv)).view(b, h, groups, s, d).sum(3)
        z = scale * q.double() @ (ksum / count[:, None]).transpose(-1, -2) + count.double().log()
        seen = lm[:, :, rows // bq][..., first // bkv] == s
        if causal:
            seen = seen & (first + count - 1 <= rows[:, None])
        parts.append(z.masked_fill(~seen, -math.inf))
    return torch.cat(parts, -1)


def reference_grads(q, k, v, mask, scale, grad_out):
    """(dq, dk, dv) by autograd through the float32 reference forward."""
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = psa_attention_reference(qf, kf, vf, mask, scale)
    return torch.autograd.grad(out, (qf, kf, vf), grad_out.float())


def _inputs(b, h, lq, lkv, d, bq, bkv, dtype, seed, device="cpu", p_skip=0.3):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g).to(dtype)
    k, v = (torch.randn(b, h, lkv, d, generator=g).to(dtype) for _ in range(2))
    grad_out = torch.randn(b, h, lq, d, generator=g).to(dtype)
    lm = random_level_map(b, h, -(-lq // bq), -(-lkv // bkv), generator=g, p_skip=p_skip)
    mask = PyramidBlockMask.from_level_map(lm, block_q=bq, block_kv=bkv)
    return [t.to(device) for t in (q, k, v, grad_out)], mask.to(device)


def _check(got, expected, tol):
    for name, g, e in zip(("dq", "dk", "dv"), got, expected):
        assert torch.isfinite(g).all(), f"{name}: unwritten (NaN) or non-finite elements"
        err = rel_err(g.float(), e)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


# --------------------------------------------------------------------------- the saved log-sum-exp
LSE_CASES = [
    (2, 1, 130, 77, 64, 64, 32),  # batch 2, partial tails, Lq != Lkv, pooled blocks of 4 rows, last groups of 1-5
    (2, 2, 100, 203, 128, 32, 64),  # batch 2, tails with a last group of 3 tokens at levels 4 and 8
]
LSE_IDS = ["d64-tails-b2", "d128-tails-b2"]


def _expected_lse(q, k, mask, lm, scale, causal=False):
    return torch.logsumexp(pyramid_logits64(q, k, lm, mask.block_q, mask.block_kv, scale, causal=causal), -1)


def _check_lse(lse, expected, atol):
    assert lse.dtype == torch.float32 and lse.shape == expected.shape and lse.is_contiguous()
    assert torch.isfinite(lse).all(), "unwritten (NaN) or non-finite log-sum-exp"
    err = (lse.double() - expected).abs().max().item()
    assert err < atol, f"log-sum-exp: largest error {err:.2e} >= {atol:.0e}"


@pytest.mark.parametrize("b, h, lq, lkv, d, bq, bkv", LSE_CASES, ids=LSE_IDS)
def test_reference_lse_is_the_logsumexp_of_the_pyramid_logits(b, h, lq, lkv, d, bq, bkv):
    """``psa_attention_reference(..., return_lse=True)``: the natural log-sum-exp, and the same output."""
    (q, k, v, _), mask = _inputs(b, h, lq, lkv, d, bq, bkv, torch.float32, seed=lq + d)
    out, lse = psa_attention_reference(q, k, v, mask, 0.3, return_lse=True)
    assert torch.equal(out, psa_attention_reference(q, k, v, mask, 0.3))
    _check_lse(lse, _expected_lse(q, k, mask, mask.to_level_map(), 0.3), LSE_ATOL[torch.float32])


def test_reference_causal_lse_is_the_logsumexp_of_the_causal_logits():
    (q, k, v, _), _ = _inputs(2, 1, 200, 200, 16, 64, 32, torch.float32, seed=3)
    lm = causal_map(2, 1, 200, 64, 32, seed=3)
    mask = PyramidBlockMask.from_level_map(lm, block_q=64, block_kv=32)
    _, lse = psa_attention_reference(q, k, v, mask, causal=True, return_lse=True)
    _check_lse(lse, _expected_lse(q, k, mask, lm, 16**-0.5, causal=True), LSE_ATOL[torch.float32])


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DT_IDS.get)
@pytest.mark.parametrize("b, h, lq, lkv, d, bq, bkv", LSE_CASES, ids=LSE_IDS)
def test_triton_forward_saves_the_logsumexp(b, h, lq, lkv, d, bq, bkv, dtype):
    """The forward kernel's lse (``return_lse=True``) against float64 logits of the same (rounded) inputs;
    the output is the one the plain call returns."""
    (q, k, v, _), mask = _inputs(b, h, lq, lkv, d, bq, bkv, dtype, seed=lq + d)
    out, lse = psa_attention_triton(q, k, v, mask, 0.3, return_lse=True)
    assert torch.equal(out, psa_attention_triton(q, k, v, mask, 0.3))
    _check_lse(lse, _expected_lse(q, k, mask, mask.to_level_map(), 0.3), LSE_ATOL[dtype])


@needs_interpreter
def test_triton_lse_with_pool_chunks_and_causal():
    """The lse of every (b, h) slice when pooling in chunks, and of the causal forward."""
    (q, k, v, _), mask = _inputs(2, 3, 70, 90, 16, 32, 32, torch.float32, seed=8)
    _, lse = psa_attention_triton(q, k, v, mask, return_lse=True, pool_chunk=4)
    _check_lse(lse, _expected_lse(q, k, mask, mask.to_level_map(), 0.25), LSE_ATOL[torch.float32])
    (q, k, v, _), _ = _inputs(2, 1, 200, 200, 16, 64, 32, torch.float32, seed=3)
    lm = causal_map(2, 1, 200, 64, 32, seed=3)
    mask = PyramidBlockMask.from_level_map(lm, block_q=64, block_kv=32)
    _, lse = psa_attention_triton(q, k, v, mask, causal=True, return_lse=True)
    _check_lse(lse, _expected_lse(q, k, mask, lm, 0.25, causal=True), LSE_ATOL[torch.float32])


# --------------------------------------------------------------------------- interpreter
@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DT_IDS.get)
@pytest.mark.parametrize(
    "b, h, lq, lkv, d, bq, bkv",
    [
        (1, 2, 128, 128, 16, 64, 64),  # whole blocks
        (2, 1, 130, 77, 16, 64, 32),  # batch 2, partial tails, Lq != Lkv, pooled blocks of 4 rows
        (2, 1, 100, 203, 32, 32, 64),  # tails with a last group of 3 tokens at levels 4 and 8
        (1, 1, 96, 160, 64, 32, 128),  # head dim 64, KV blocks of two tiles at level 1
        (1, 1, 64, 97, 128, 64, 64),  # head dim 128
        (1, 1, 50, 70, 24, 32, 32),  # head dim padded to the next power of two
    ],
    ids=["whole", "tails-b2", "tails-groups", "d64", "d128", "d24"],
)
def test_triton_gradients_match_reference_autograd(b, h, lq, lkv, d, bq, bkv, dtype):
    (q, k, v, grad_out), mask = _inputs(b, h, lq, lkv, d, bq, bkv, dtype, seed=lq + lkv + d)
    out, lse = psa_attention_triton(q, k, v, mask, 0.3, return_lse=True)
    got = psa_attention_backward_triton(grad_out, q, k, v, mask, 0.3, out=out, lse=lse)
    assert [g.dtype for g in got] == [dtype] * 3 and [g.shape for g in got] == [q.shape, k.shape, v.shape]
    _check(got, reference_grads(q, k, v, mask, 0.3, grad_out), TOL[dtype])


@needs_interpreter
@pytest.mark.parametrize("level", [1, 2, 4, 8])
def test_each_level_alone(level):
    """Every block at one level: each column kernel (and the row kernel's path for that level) on its own."""
    (q, k, v, grad_out), _ = _inputs(1, 1, 64, 83, 16, 32, 32, torch.float32, seed=level)
    mask = PyramidBlockMask.from_level_map(torch.full((1, 1, 2, 3), level), block_q=32, block_kv=32)
    out, lse = psa_attention_triton(q, k, v, mask, return_lse=True)
    got = psa_attention_backward_triton(grad_out, q, k, v, mask, out=out, lse=lse)
    _check(got, reference_grads(q, k, v, mask, None, grad_out), TOL[torch.float32])


@needs_interpreter
@pytest.mark.parametrize("row_n", [16, 64])
def test_row_tiles_shorter_and_longer_than_a_block(row_n):
    """ROW_N 16 (a level-1 block of 32 is two contiguous tiles, levels 2-8 packed) and 64 (every level packed,
    two level-1 blocks per tile), with a partial tail block and packing padding."""
    (q, k, v, grad_out), mask = _inputs(2, 1, 70, 83, 16, 32, 32, torch.float32, seed=row_n, p_skip=0.2)
    out, lse = psa_attention_triton(q, k, v, mask, return_lse=True)
    got = psa_attention_backward_triton(grad_out, q, k, v, mask, out=out, lse=lse, config={"ROW_N": row_n})
    _check(got, reference_grads(q, k, v, mask, None, grad_out), TOL[torch.float32])


@needs_interpreter
def test_outputs_are_poisoned_before_the_kernels_write(monkeypatch):
    """The launcher's buffers come from new_output, which (tests/conftest.py) fills them with NaN first."""
    made = []
    real = triton_support.new_output

    def spy(shape, *, dtype, device):
        t = real(shape, dtype=dtype, device=device)
        made.append(bool(torch.isnan(t).all()))
        return t

    monkeypatch.setattr(triton_support, "new_output", spy)
    (q, k, v, grad_out), mask = _inputs(2, 1, 70, 90, 16, 32, 32, torch.float32, seed=5, p_skip=0.6)
    out, lse = psa_attention_triton(q, k, v, mask, return_lse=True)
    assert len(made) == 4 and all(made)  # pooled K, pooled V, out, lse
    got = psa_attention_backward_triton(grad_out, q, k, v, mask, out=out, lse=lse)
    assert len(made) == 12 and all(made)  # pooled K, pooled V, dq, dk, dv, delta, pooled dK, pooled dV
    _check(got, reference_grads(q, k, v, mask, None, grad_out), TOL[torch.float32])


@needs_interpreter
def test_backward_without_saved_lse_reruns_the_forward(monkeypatch):
    """Without ``out``/``lse`` the backward runs the forward kernel first: the same gradients, bit for bit."""
    (q, k, v, grad_out), mask = _inputs(2, 1, 100, 90, 16, 32, 32, torch.float16, seed=6)
    out, lse = psa_attention_triton(q, k, v, mask, return_lse=True)
    saved = psa_attention_backward_triton(grad_out, q, k, v, mask, out=out, lse=lse)
    forwards = []
    real = backward_kernel.psa_attention_triton

    def spy(*args, **kwargs):
        forwards.append(kwargs.get("return_lse"))
        return real(*args, **kwargs)

    monkeypatch.setattr(backward_kernel, "psa_attention_triton", spy)
    again = psa_attention_backward_triton(grad_out, q, k, v, mask)
    assert forwards == [True]
    assert all(torch.equal(a, e) for a, e in zip(again, saved))
    _check(again, reference_grads(q, k, v, mask, None, grad_out), TOL[torch.float16])


def test_backward_checks_out_and_lse():
    (q, k, v, grad_out), mask = _inputs(1, 1, 64, 64, 16, 32, 32, torch.float32, seed=0)
    if triton_support.unsupported_reason(q, k, v, names=("q", "k", "v")) is not None:
        pytest.skip("the Triton path cannot run here")
    lse = torch.zeros(1, 1, 64)
    with pytest.raises(ValueError, match="together"):
        psa_attention_backward_triton(grad_out, q, k, v, mask, lse=lse)
    with pytest.raises(ValueError, match="together"):
        psa_attention_backward_triton(grad_out, q, k, v, mask, out=q)
    with pytest.raises(ValueError, match="lse must be"):
        psa_attention_backward_triton(grad_out, q, k, v, mask, out=q, lse=lse.double())
    with pytest.raises(ValueError, match="lse must be"):
        psa_attention_backward_triton(grad_out, q, k, v, mask, out=q, lse=lse[..., :10])
    with pytest.raises(ValueError, match="out must be"):
        psa_attention_backward_triton(grad_out, q, k, v, mask, out=q.half(), lse=lse)


def test_transposed_mask_is_the_transposed_level_map():
    lm = random_level_map(2, 3, 5, 7, generator=torch.Generator().manual_seed(3), p_skip=0.5)
    mask = PyramidBlockMask.from_level_map(lm, block_q=64, block_kv=32)
    t = transposed_mask(mask)
    assert (t.block_q, t.block_kv) == (32, 64)
    assert torch.equal(t.to_level_map(), lm.transpose(-1, -2))


@needs_interpreter
def test_op_backward_runs_the_triton_kernels(monkeypatch):
    """psa.attention with backend "triton": autograd reaches the Triton backward, which reads the op's saved
    output and lse (no second forward) and matches the reference's gradients."""
    calls, forwards = [], []
    real, real_forward = backward_kernel.launch_attention_backward, backward_kernel.psa_attention_triton

    def spy(grad_out, q, k, v, kp, vp, mask, scale, out, lse, config=None):
        calls.append((out, lse))
        return real(grad_out, q, k, v, kp, vp, mask, scale, out, lse, config)

    def forward_spy(*args, **kwargs):
        forwards.append(1)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(backward_kernel, "launch_attention_backward", spy)
    monkeypatch.setattr(backward_kernel, "psa_attention_triton", forward_spy)
    (q, k, v, grad_out), mask = _inputs(2, 1, 100, 100, 16, 32, 32, torch.float32, seed=9)
    grads, lses = {}, {}
    for backend in ("triton", "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = torch.ops.psa.attention(*leaves, mask.kv_counts, mask.kv_indices, 32, 32, 0.25, backend)
        assert out.requires_grad and not lse.requires_grad  # lse is not differentiable
        assert lse.shape == (2, 1, 100) and lse.dtype == torch.float32
        out.backward(grad_out)
        grads[backend], lses[backend] = [t.grad for t in leaves], lse
        if backend == "triton":
            assert len(calls) == 1 and not forwards
            assert calls[0][1].data_ptr() == lse.data_ptr() and calls[0][0].data_ptr() == out.data_ptr()
    _check(grads["triton"], grads["reference"], TOL[torch.float32])
    torch.testing.assert_close(lses["triton"], lses["reference"], rtol=0, atol=LSE_ATOL[torch.float32])


@needs_interpreter
def test_psa_attention_trains_through_the_triton_path():
    """psa_attention(backend="triton") on inputs that require grad: the kernels run forward and backward."""
    (q, k, v, grad_out), mask = _inputs(1, 2, 96, 96, 16, 32, 32, torch.float32, seed=4)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = psa_diffusers.psa_attention(*leaves, mask=mask, backend="triton")
    out.backward(grad_out)
    _check([t.grad for t in leaves], reference_grads(q, k, v, mask, None, grad_out), TOL[torch.float32])


def test_compiled_op_gradients_equal_eager():
    """torch.compile(fullgraph=True) of psa.attention with autograd: the same gradients as eager (reference)."""
    torch._dynamo.reset()
    (q, k, v, grad_out), mask = _inputs(2, 2, 100, 90, 16, 32, 32, torch.float32, seed=11)
    args = (mask.kv_counts, mask.kv_indices, 32, 32, 0.25, "reference")

    def loss(q, k, v):
        return (torch.ops.psa.attention(q, k, v, *args)[0] * grad_out).sum()

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    eager = torch.autograd.grad(loss(*leaves), leaves)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True)(*leaves), leaves)
    for a, e in zip(got, eager):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)  # float32, the same op: fused sums only
    _check(eager, reference_grads(q, k, v, mask, 0.25, grad_out), TOL[torch.float32])


def test_bad_grad_out_raises_value_error():
    (q, k, v, grad_out), mask = _inputs(1, 1, 64, 64, 16, 32, 32, torch.float32, seed=0)
    if triton_support.unsupported_reason(q, k, v, names=("q", "k", "v")) is not None:
        pytest.skip("the Triton path cannot run here")
    with pytest.raises(ValueError, match="grad_out"):
        psa_attention_backward_triton(grad_out[:, :, :10], q, k, v, mask)


def test_reference_backend_dispatch_matches_autograd():
    (q, k, v, grad_out), mask = _inputs(2, 1, 70, 90, 16, 32, 32, torch.float32, seed=2)
    got = sparse_attention_backward(grad_out, q, k, v, mask, 0.3, backend="reference")
    assert all(torch.equal(a, e) for a, e in zip(got, psa_attention_backward_reference(grad_out, q, k, v, mask, 0.3)))
    _check(got, reference_grads(q, k, v, mask, 0.3, grad_out), TOL[torch.float32])


# --------------------------------------------------------------------------- GPU, real sizes
def _dense_backward_error(q, k, v, grad_out) -> float:
    """Largest relative error of the same-dtype dense SDPA gradients against float32 dense ones."""

    def grads(*ts):
        leaves = [t.detach().requires_grad_() for t in ts]
        return torch.autograd.grad(F.scaled_dot_product_attention(*leaves), leaves, grad_out.to(ts[0].dtype))

    low = grads(q, k, v)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION):
        high = grads(q.float(), k.float(), v.float())
    return max(rel_err(a, b) for a, b in zip(low, high))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the Triton kernels at real sizes)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DT_IDS.get)
@pytest.mark.parametrize(
    "b, h, length, d, bq, bkv",
    [(1, 4, 32760, 128, 128, 128), (2, 3, 4096 + 226, 64, 128, 128), (2, 2, 3001, 128, 64, 32)],
    ids=["wan13-d128", "cogx-b2-d64", "tails-128x32"],
)
def test_triton_gradients_at_real_sizes(b, h, length, d, bq, bkv, dtype):
    """The forward's saved lse against the float32 reference's, then the backward that reads it."""
    (q, k, v, grad_out), mask = _inputs(b, h, length, length, d, bq, bkv, dtype, seed=d, device="cuda", p_skip=0.7)
    out, lse = psa_attention_triton(q, k, v, mask, return_lse=True)
    _, expected_lse = psa_attention_reference(q, k, v, mask, return_lse=True)  # float32, chunked
    _check_lse(lse, expected_lse.double(), LSE_ATOL[dtype])
    got = psa_attention_backward_triton(grad_out, q, k, v, mask, out=out, lse=lse)
    # the hand-written reference backward (float32, chunked): autograd through the reference forward would keep
    # every chunk's logits alive (tens of GB at 32k tokens); the CPU tests check the two references agree
    expected = psa_attention_backward_reference(grad_out.float(), q.float(), k.float(), v.float(), mask)
    bound = 2 * _dense_backward_error(q, k, v, grad_out) + 2e-3
    _check(got, expected, bound)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the Triton kernels at real sizes)")
def test_op_autograd_reads_the_saved_lse_on_gpu():
    """psa.attention's autograd at the Wan 480p length: the gradients equal, bit for bit, those of the backward
    called directly (which reruns the forward for its lse): the op saved the right output and lse."""
    (q, k, v, grad_out), mask = _inputs(1, 2, 32760, 32760, 128, 128, 128, torch.bfloat16, seed=1, device="cuda",
                                        p_skip=0.7)  # fmt: skip
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = torch.ops.psa.attention(*leaves, mask.kv_counts, mask.kv_indices, 128, 128, 128**-0.5, "triton")
    assert not lse.requires_grad and lse.shape == (1, 2, 32760) and torch.isfinite(lse).all()
    got = torch.autograd.grad(out, leaves, grad_out)
    direct = psa_attention_backward_triton(grad_out, q, k, v, mask, 128**-0.5)
    for a, e in zip(got, direct):
        assert torch.isfinite(a).all() and torch.equal(a, e)  # the same kernels on the same out and lse


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the Triton kernels)")
def test_compiled_gradients_equal_eager_on_gpu():
    """torch.compile(fullgraph=True) of psa_attention on the Triton path: the same kernels, the same gradients."""
    torch._dynamo.reset()
    config = psa_diffusers.PSAConfig(block_q=128, block_kv=128, token_order="gilbert")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 4, 4 * 30 * 34 + 226, 128, device="cuda", generator=g, dtype=torch.bfloat16)
               for _ in range(3))  # fmt: skip

    def loss(q, k, v):
        out = psa_diffusers.psa_attention(q, k, v, config, text_len=226, grid=(4, 30, 34), backend="triton")
        return out.float().pow(2).sum()

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    eager = torch.autograd.grad(loss(*leaves), leaves)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True)(*leaves), leaves)
    for a, e in zip(got, eager):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.float(), e.float(), rtol=1e-2, atol=1e-2)  # the same kernels; bf16 loss sums
