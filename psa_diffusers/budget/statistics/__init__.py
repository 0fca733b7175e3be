"""Block mass, squared mass and pooling blur of every (query block, KV block) pair."""

from __future__ import annotations

import torch

from ...ops.triton_support import resolve_backend
from ..stats import PyramidStats, finite_tokens
from ..variance import pooled_logit_variance
from .kernel import estimate_pyramid_statistics_triton, pooled_stage
from .reference import estimate_pyramid_statistics_reference

__all__ = [
    "estimate_pyramid_statistics",
    "estimate_pyramid_statistics_reference",
    "estimate_pyramid_statistics_triton",
    "pooled_stage",
]


def estimate_pyramid_statistics(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_q: int,
    block_kv: int,
    scale: float | None = None,
    backend: str = "auto",
) -> PyramidStats:
    """:class:`PyramidStats` of q ``[B, H, Lq, D]`` against k ``[B, H, Lkv, D]``.

    Non-finite entries of q and k count as 0 (``finite_tokens``), on both backends.
    """
    kwargs = dict(block_q=block_q, block_kv=block_kv, scale=scale)
    backend = resolve_backend(backend, q, k, names=("q", "k"))
    q, k = finite_tokens(q), finite_tokens(k)
    var = pooled_logit_variance(q, k, backend=backend, **kwargs)
    if backend == "triton":
        return estimate_pyramid_statistics_triton(q, k, var=var, **kwargs)
    return estimate_pyramid_statistics_reference(q, k, var=var, **kwargs)
