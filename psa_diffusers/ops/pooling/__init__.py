"""Mean pooling of consecutive tokens: the pyramid levels 2, 4, 8 of K and V."""

from __future__ import annotations

import torch

from ..triton_support import resolve_backend
from .kernel import level_offsets, pool_kv_triton, pool_pyramid_triton
from .reference import pool_pyramid_reference, pool_tokens

__all__ = [
    "level_offsets",
    "pool_kv_triton",
    "pool_pyramid",
    "pool_pyramid_reference",
    "pool_pyramid_triton",
    "pool_tokens",
]


def pool_pyramid(x: torch.Tensor, *, backend: str = "auto") -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Every pyramid level of ``x`` ``[B, H, L, D]``: ``{s: (pooled [B, H, ceil(L/s), D], counts [ceil(L/s)])}``."""
    if resolve_backend(backend, x, names=("x",)) == "triton":
        return pool_pyramid_triton(x)
    return pool_pyramid_reference(x)
