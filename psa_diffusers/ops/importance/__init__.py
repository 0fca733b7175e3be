"""The importance estimate: how much attention each query block pays to each KV block."""

from __future__ import annotations

import torch

from ..triton_support import resolve_backend
from .kernel import estimate_block_importance_triton, estimate_block_statistics_triton
from .reference import (
    SPIKE_SHARE,
    BlockStatistics,
    estimate_block_importance_reference,
    estimate_block_statistics_reference,
    exact_block_mass,
    key_sample_stride,
    sample_positions,
)

__all__ = [
    "SPIKE_SHARE",
    "BlockStatistics",
    "estimate_block_importance",
    "estimate_block_importance_reference",
    "estimate_block_importance_triton",
    "estimate_block_statistics",
    "estimate_block_statistics_reference",
    "estimate_block_statistics_triton",
    "exact_block_mass",
    "key_sample_stride",
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
    past_only: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Sampled block attention mass ``[B, H, Nq, Nk]`` float32, rows summing to 1, for q ``[B, H, Lq, D]``, k.

    ``past_only``: only the entries of KV blocks wholly before their query block (the rest 0), cheaper
    (what the causal rule reads)."""
    kwargs = dict(block_q=block_q, block_kv=block_kv, stride=stride, scale=scale, past_only=past_only)
    if resolve_backend(backend, q, k, names=("q", "k")) == "triton":
        return estimate_block_importance_triton(q, k, **kwargs)
    return estimate_block_importance_reference(q, k, **kwargs)


def estimate_block_statistics(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_q: int,
    block_kv: int,
    stride: int = 8,
    sinks: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> BlockStatistics:
    """Sampled block mass, squared mass, spike blocks and query norms (:class:`BlockStatistics`) of q against k."""
    kwargs = dict(block_q=block_q, block_kv=block_kv, stride=stride, sinks=sinks, scale=scale)
    if resolve_backend(backend, q, k, names=("q", "k")) == "triton":
        return estimate_block_statistics_triton(q, k, **kwargs)
    return estimate_block_statistics_reference(q, k, **kwargs)
