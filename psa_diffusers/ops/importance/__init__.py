"""The importance estimate: how much attention each query block pays to each KV block."""

from __future__ import annotations

import torch

from ..triton_support import resolve_backend
from .kernel import estimate_block_importance_triton
from .reference import estimate_block_importance_reference, exact_block_mass, sample_positions

__all__ = [
    "estimate_block_importance",
    "estimate_block_importance_reference",
    "estimate_block_importance_triton",
    "exact_block_mass",
    "sample_positions",
]


def estimate_block_importance(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_q: int,
    block_kv: int,
    stride: int = 8,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Sampled block attention mass ``[B, H, Nq, Nk]`` float32, rows summing to 1, for q ``[B, H, Lq, D]``, k."""
    kwargs = dict(block_q=block_q, block_kv=block_kv, stride=stride, scale=scale)
    if resolve_backend(backend, q, k, names=("q", "k")) == "triton":
        return estimate_block_importance_triton(q, k, **kwargs)
    return estimate_block_importance_reference(q, k, **kwargs)
