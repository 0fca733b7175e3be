"""Shared test helpers: random level maps and inputs, error measures, the interpreter guard."""

from __future__ import annotations

import pytest
import torch

from benchmarks.structured_qkv import structured_qkv
from psa_diffusers.ops.triton_support import HAS_TRITON, INTERPRETED

LEVEL_VALUES = torch.tensor([0, 1, 2, 4, 8])

DT_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
"""Short parametrize ids of the dtypes."""

needs_interpreter = pytest.mark.skipif(
    not (HAS_TRITON and INTERPRETED),
    reason="needs triton with TRITON_INTERPRET=1 set before import (tests/conftest.py does it on CPU-only machines)",
)
"""The guard of the kernel tests that run under Triton's interpreter on CPU."""


def random_level_map(b, h, nq, nk, *, generator=None, p_skip=0.3) -> torch.Tensor:
    """A random valid level map ``[B, H, Nq, Nk]`` (every row keeps at least one block)."""
    g = generator or torch.Generator().manual_seed(0)
    probs = torch.tensor([p_skip] + [(1 - p_skip) / 4] * 4)
    idx = torch.multinomial(probs, b * h * nq * nk, replacement=True, generator=g).view(b, h, nq, nk)
    lm = LEVEL_VALUES[idx]
    keep = torch.randint(0, nk, (b, h, nq), generator=g)
    row_empty = (lm == 0).all(-1)
    forced = LEVEL_VALUES[torch.randint(1, 5, (b, h, nq), generator=g)]
    kept = torch.where(row_empty, forced, lm.gather(-1, keep.unsqueeze(-1)).squeeze(-1))
    lm.scatter_(-1, keep.unsqueeze(-1), kept.unsqueeze(-1))
    return lm


def random_qkv(b, h, lq, lkv, d, dtype, seed):
    """q ``[B, H, Lq, D]``, k, v ``[B, H, Lkv, D]``: unit normal in float32, cast to ``dtype``; and the generator."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g).to(dtype)
    k = torch.randn(b, h, lkv, d, generator=g).to(dtype)
    v = torch.randn(b, h, lkv, d, generator=g).to(dtype)
    return q, k, v, g


def video_qkv():
    """8x16x16 video tokens (L 2048), 2 heads, dim 64, raster order, float32."""
    return structured_qkv(8, 16, 16, heads=2, dim=64, seed=0, dtype=torch.float32)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()
