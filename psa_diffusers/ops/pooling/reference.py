"""Mean pooling of consecutive tokens: the pyramid levels of K and V (plain PyTorch)."""

from __future__ import annotations

import torch

from ...config import LEVELS


def pool_tokens(x: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each group of ``factor`` consecutive tokens, aligned at multiples of ``factor``.

    x: ``[B, H, L, D]``. Returns ``(pooled [B, H, ceil(L/factor), D], counts [ceil(L/factor)])``
    where ``counts`` (int64, on x's device) is the number of real tokens in each group:
    ``factor`` except possibly the last. Padding never enters a mean.
    """
    if factor == 1:
        return x, torch.ones(x.shape[2], dtype=torch.int64, device=x.device)
    b, h, length, d = x.shape
    groups = -(-length // factor)
    pad = groups * factor - length
    acc = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if pad:
        acc = torch.nn.functional.pad(acc, (0, 0, 0, pad))
    sums = acc.view(b, h, groups, factor, d).sum(3)
    counts = torch.full((groups,), factor, dtype=torch.int64, device=x.device)
    counts[-1] = length - (groups - 1) * factor
    pooled = sums / counts.to(sums.dtype).view(1, 1, groups, 1)
    return pooled.to(x.dtype), counts


def pool_pyramid_reference(x: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Every pyramid level of ``x`` ``[B, H, L, D]``: ``{factor: (pooled, counts)}`` for 1, 2, 4, 8."""
    return {s: pool_tokens(x, s) for s in LEVELS}
