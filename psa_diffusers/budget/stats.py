"""The budget mode's block statistics: what the allocation needs to know about each block pair."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..config import POOLED_LEVELS


class PyramidStats(NamedTuple):
    """What the budget allocation needs to know about each (query block, KV block) pair.

    mass:      ``[B, H, Nq, Nk]`` float32, the attention mass of KV block ``j`` averaged over
               the queries of block ``i`` (rows sum to 1).
    sq_mass:   ``[B, H, Nq, Nk]`` float32, ``sum_{r in i} sum_{t in j} p_rt**2`` (the size of the
               output error when the block's detail is lost; only its relative size in a row matters).
    logit_var: ``[B, H, Nq, Nk, 3]`` float32, the mean over the queries of block ``i`` and the keys
               of block ``j`` of ``(scale * q_r . (k_t - kbar_g(t)))**2``, where ``kbar_g`` is the mean
               of the key's pooling group at factor 2, 4, 8: how much pooling block ``j`` blurs the
               logits of block ``i``.
    """

    mass: torch.Tensor
    sq_mass: torch.Tensor
    logit_var: torch.Tensor


def group_logit_variance(var: torch.Tensor, group: int) -> torch.Tensor:
    """The ``[B, H, Nq, Nk]`` slice of a ``pooled_logit_variance`` result for groups of ``group`` keys.

    Factor 8, the coarsest computed, stands in for larger groups.
    """
    li = POOLED_LEVELS.index(group) if group in POOLED_LEVELS else len(POOLED_LEVELS) - 1
    return var[..., li]
