"""Shared test helpers: random level maps, error measures."""

from __future__ import annotations

import torch

LEVEL_VALUES = torch.tensor([0, 1, 2, 4, 8])


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


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()
