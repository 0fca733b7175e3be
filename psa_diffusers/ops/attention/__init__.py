"""Sparse pyramid attention over a compact level mask: the reference and the Triton forward."""

from __future__ import annotations

import torch

from ...mask import PyramidBlockMask
from ..pooling import pool_kv_triton
from ..triton_support import resolve_backend, triton_unsupported_reason
from .kernel import launch_attention, psa_attention_triton
from .reference import psa_attention_backward_reference, psa_attention_reference

__all__ = [
    "launch_attention",
    "pool_kv_triton",
    "psa_attention_backward_reference",
    "psa_attention_reference",
    "psa_attention_triton",
    "sparse_attention",
    "triton_unsupported_reason",
]


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: PyramidBlockMask,
    scale: float | None = None,
    *,
    backend: str = "auto",
    pooled: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Pyramid sparse attention of q ``[B, H, Lq, D]`` over k, v ``[B, H, Lkv, D]`` with a ready ``mask``.

    ``pooled`` (Triton only): K/V pooled once by :func:`pool_kv_triton`; ``config``: kernel tile overrides.
    Returns ``[B, H, Lq, D]`` in q's dtype.
    """
    if resolve_backend(backend, q, k, v, names=("q", "k", "v")) == "triton":
        return psa_attention_triton(q, k, v, mask, scale, pooled=pooled, config=config)
    return psa_attention_reference(q, k, v, mask, scale)
