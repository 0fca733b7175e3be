"""The torch.library boundary: the psa ops pass opcheck, and compiled psa_attention equals eager.

opcheck checks each op's schema, its fake (meta) implementation against the real one, its autograd
registration and that AOT dispatch traces it. The compile tests run ``torch.compile(fullgraph=True)``
(a graph break fails them) on the CPU reference; the same on the GPU's Triton path is in
tests/ops/test_kernels_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

import psa_diffusers  # noqa: F401  (registers torch.ops.psa)
from psa_diffusers import PSAConfig, psa_attention
from psa_diffusers.library import config_op_args
from tests.helpers import random_level_map

CONFIGS = {
    "quota": PSAConfig(block_q=64, block_kv=32, budgets=(0.2, 0.1, 0.1, 0.2)),
    "mass": PSAConfig(
        block_q=64, block_kv=32, mode="mass", budgets=(0.4, 0.5, 0.6, 0.8), sim_thresholds=(0.0, 0.0, 0.0)
    ),  # fmt: skip
    "gilbert": PSAConfig(block_q=64, block_kv=32, token_order="gilbert"),
    "budget": PSAConfig(block_q=64, block_kv=32, mode="budget", target_density=0.3),
}


def _qkv(b=2, h=2, length=250, d=16, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, length, d, generator=g).requires_grad_(requires_grad) for _ in range(3))


def test_attention_op_passes_opcheck():
    q, k, v = _qkv(length=200, requires_grad=True)
    lm = random_level_map(2, 2, 4, 7, generator=torch.Generator().manual_seed(1))
    mask = psa_diffusers.PyramidBlockMask.from_level_map(lm, block_q=64, block_kv=32)
    args = (q, k, v, mask.kv_counts, mask.kv_indices, 64, 32, 0.25, "reference")
    torch.library.opcheck(torch.ops.psa.attention.default, args)


def test_attention_op_returns_a_non_differentiable_lse():
    q, k, v = _qkv(length=200, requires_grad=True)
    lm = random_level_map(2, 2, 4, 7, generator=torch.Generator().manual_seed(1))
    mask = psa_diffusers.PyramidBlockMask.from_level_map(lm, block_q=64, block_kv=32)
    out, lse = torch.ops.psa.attention(q, k, v, mask.kv_counts, mask.kv_indices, 64, 32, 0.25, "reference")
    assert out.requires_grad and not lse.requires_grad
    assert lse.shape == (2, 2, 200) and lse.dtype == torch.float32 and lse.is_contiguous()


@pytest.mark.parametrize("saved", [False, True], ids=["recompute", "saved-out-lse"])
def test_attention_backward_op_passes_opcheck(saved):
    q, k, v = _qkv(length=200)
    lm = random_level_map(2, 2, 4, 7, generator=torch.Generator().manual_seed(2))
    mask = psa_diffusers.PyramidBlockMask.from_level_map(lm, block_q=64, block_kv=32)
    args = (torch.randn_like(q), q, k, v, mask.kv_counts, mask.kv_indices, 64, 32, 0.25, "reference")
    if saved:
        args = (*args, False, *torch.ops.psa.attention(q, k, v, *args[4:]))
    torch.library.opcheck(torch.ops.psa.attention_backward.default, args)


@pytest.mark.parametrize("name", ["quota", "mass", "budget"])
def test_build_mask_op_passes_opcheck(name):
    q, k, _ = _qkv()
    args = (q, k, *config_op_args(CONFIGS[name]), 20, 0.25, "reference")
    torch.library.opcheck(torch.ops.psa.build_mask.default, args)


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_permute_tokens_op_passes_opcheck(inverse):
    x = torch.randn(1, 2, 3 * 5 * 7 + 9, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.psa.permute_tokens.default, (x, [3, 5, 7], 9, inverse))


def test_permute_tokens_gradient_is_the_inverse_permutation():
    x = torch.randn(1, 1, 2 * 3 * 4, 2, requires_grad=True)
    y = torch.ops.psa.permute_tokens(x, [2, 3, 4], 0, False)
    grad = torch.arange(y.numel(), dtype=torch.float32).view_as(y)
    (y * grad).sum().backward()
    assert torch.equal(x.grad, torch.ops.psa.permute_tokens(grad, [2, 3, 4], 0, True))


@pytest.mark.parametrize(
    "name, text_len, grid",
    [("quota", 0, None), ("quota", 20, None), ("mass", 20, None), ("gilbert", 20, (2, 5, 23)), ("budget", 20, None)],
    ids=["quota", "quota-text", "mass-text-caps", "gilbert-text", "budget-text"],
)
def test_compiled_psa_attention_equals_eager(name, text_len, grid):
    torch._dynamo.reset()
    config = CONFIGS[name]
    q, k, v = _qkv()

    def fn(q, k, v):
        return psa_attention(q, k, v, config, text_len=text_len, grid=grid)

    eager = fn(q, k, v)
    compiled = torch.compile(fn, fullgraph=True, backend="inductor")(q, k, v)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)  # the same ops on the same inputs


def test_compiled_gradients_equal_eager():
    torch._dynamo.reset()
    config = CONFIGS["gilbert"]

    def loss(q, k, v):
        return (psa_attention(q, k, v, config, text_len=20, grid=(2, 5, 23)) ** 2).sum()

    q, k, v = _qkv(requires_grad=True)
    eager = torch.autograd.grad(loss(q, k, v), (q, k, v))
    compiled_loss = torch.compile(loss, fullgraph=True)
    got = torch.autograd.grad(compiled_loss(q, k, v), (q, k, v))
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # float32: fused vs unfused sums only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the Triton path)")
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize(
    "name, text_len, grid",
    [("quota", 0, None), ("mass", 226, None), ("gilbert", 226, (4, 30, 34))],
    ids=["quota", "mass-text-caps", "gilbert-text"],
)
def test_compiled_psa_attention_equals_eager_on_gpu(name, text_len, grid, dim):
    torch._dynamo.reset()
    config = CONFIGS[name].replace(block_q=128, block_kv=128)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 4, 4 * 30 * 34 + 226, dim, device="cuda", generator=g, dtype=torch.bfloat16)
               for _ in range(3))  # fmt: skip

    def fn(q, k, v):
        return psa_attention(q, k, v, config, text_len=text_len, grid=grid, backend="triton")

    eager = fn(q, k, v)
    compiled = torch.compile(fn, fullgraph=True)(q, k, v)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)  # the same kernels on the same inputs
