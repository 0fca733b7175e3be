"""Within-group logit variance of every block pair: how much pooling a KV block blurs a query block's logits."""

from __future__ import annotations

import torch

from ...ops.triton_support import resolve_backend
from .kernel import block_moments_triton, packed_size, pooled_logit_variance_triton
from .reference import pad_tokens, pooled_logit_variance_reference

__all__ = [
    "block_moments_triton",
    "packed_size",
    "pad_tokens",
    "pooled_logit_variance",
    "pooled_logit_variance_reference",
    "pooled_logit_variance_triton",
]


def pooled_logit_variance(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_q: int,
    block_kv: int,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Within-group logit variance ``[B, H, Nq, Nk, 3]`` float32 for pooling factors 2, 4, 8."""
    kwargs = dict(block_q=block_q, block_kv=block_kv, scale=scale)
    if resolve_backend(backend, q, k, names=("q", "k")) == "triton":
        return pooled_logit_variance_triton(q, k, **kwargs)
    return pooled_logit_variance_reference(q, k, **kwargs)
