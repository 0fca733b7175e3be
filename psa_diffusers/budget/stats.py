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


VAR_LIMIT = 1.0e4
"""Logit variances are clamped to ``[0, VAR_LIMIT]`` before the error model (pooling loses everything long before)."""


def lognormal_shift(var: torch.Tensor, group: int) -> torch.Tensor:
    """The log-mass added to a pooled group's mean logit for the spread of its logits (nats).

    ``V / 2`` (the log-normal mean) while that is plausible, at most ``sqrt((group - 1) V)``: ``group``
    logits whose variance about their mean is ``V`` lie at most that far above the mean, so the
    group's total cannot exceed ``group * exp(mean + sqrt((group - 1) V))``. The two meet at
    ``V = 4 (group - 1)`` (28 for groups of 8); below that nothing changes.
    """
    return torch.minimum(0.5 * var, torch.sqrt((group - 1) * var.clamp(min=0.0)))


def finite_tokens(x: torch.Tensor) -> torch.Tensor:
    """``x`` with every non-finite entry (NaN, +-inf) set to 0: a bad value costs its own token, not its block.

    Elementwise, on the device, no host synchronisation; returns ``x`` itself when it is not floating point.
    """
    if not x.is_floating_point():
        return x
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def finite_stats(stats: PyramidStats) -> PyramidStats:
    """``stats`` with non-finite masses and squared masses set to 0 and variances clamped to ``[0, VAR_LIMIT]``.

    Whatever the statistics hold, the allocation then sees finite tables, so every row keeps at
    least its best block (the first maximum of the sanitised mass).
    """
    mass = torch.nan_to_num(stats.mass.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp(min=0.0)
    sq = torch.nan_to_num(stats.sq_mass.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp(min=0.0)
    var = torch.nan_to_num(stats.logit_var.float(), nan=VAR_LIMIT, posinf=VAR_LIMIT, neginf=0.0)
    return PyramidStats(mass, sq, var.clamp(0.0, VAR_LIMIT))
