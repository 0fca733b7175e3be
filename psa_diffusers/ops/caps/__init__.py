"""Key smoothness per KV block and the similarity cap on pooling factors."""

from __future__ import annotations

import torch

from ..triton_support import resolve_backend
from .kernel import (
    block_smoothness_triton,
    key_block_statistics_triton,
    similarity_caps_triton,
    smoothness_and_caps_triton,
)
from .reference import (
    SINK_COUNT,
    SINK_SEGMENT,
    block_smoothness_reference,
    key_block_statistics_reference,
    similarity_caps_reference,
    sink_keys,
)

__all__ = [
    "SINK_COUNT",
    "SINK_SEGMENT",
    "block_smoothness",
    "block_smoothness_reference",
    "block_smoothness_triton",
    "key_block_statistics",
    "key_block_statistics_reference",
    "key_block_statistics_triton",
    "similarity_caps",
    "similarity_caps_reference",
    "similarity_caps_triton",
    "sink_keys",
    "smoothness_and_caps_triton",
]


def block_smoothness(k: torch.Tensor, *, block_kv: int, backend: str = "auto") -> torch.Tensor:
    """Key smoothness ``[B, H, Nk, 3]`` float32 for factors 2, 4, 8 of k ``[B, H, Lkv, D]``."""
    if resolve_backend(backend, k, names=("k",)) == "triton":
        return block_smoothness_triton(k, block_kv=block_kv)
    return block_smoothness_reference(k, block_kv=block_kv)


def similarity_caps(
    k: torch.Tensor, *, block_kv: int, thresholds: tuple[float, float, float], backend: str = "auto"
) -> torch.Tensor:
    """Largest allowed pooling factor per KV block ``[B, H, Nk]`` (1 where none is allowed)."""
    if resolve_backend(backend, k, names=("k",)) == "triton":
        return similarity_caps_triton(k, block_kv=block_kv, thresholds=thresholds)
    return similarity_caps_reference(k, block_kv=block_kv, thresholds=thresholds)


def key_block_statistics(
    k: torch.Tensor, q_mean: torch.Tensor, *, block_kv: int, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scatter [B, H, Nk, 3], top_logit [B, H, Ns], top_index [B, H, Ns])`` of k ``[B, H, Lkv, D]``.

    See ``reference.key_block_statistics_reference``; q_mean ``[B, H, D]`` is the mean query of each head.
    """
    if resolve_backend(backend, k, names=("k",)) == "triton":
        return key_block_statistics_triton(k, q_mean, block_kv=block_kv)
    return key_block_statistics_reference(k, q_mean, block_kv=block_kv)
