"""Key smoothness per KV block and the similarity cap (plain PyTorch reference).

A KV block whose keys are not smooth should not be pooled coarsely: for each pooling factor
``s`` in (2, 4, 8) the block's smoothness is the mean, over its groups of ``s`` keys, of the
cosine similarity between the first and the last key of the group; factor ``s`` is allowed
when that is at least the threshold ``tau_s``. The cap of a block is the largest allowed factor
(1 when none is).
"""

from __future__ import annotations

import math

import torch

from ...config import POOLED_LEVELS


def block_smoothness_reference(k: torch.Tensor, *, block_kv: int) -> torch.Tensor:
    """Key smoothness per KV block and pooling factor, ``[B, H, Nk, 3]`` float32 for factors 2, 4, 8.

    For factor ``s``: the mean, over the block's groups of ``s`` keys, of the
    cosine similarity between the first and the last key of the group (a group
    with one real token counts as 1).
    """
    b, h, lkv, d = k.shape
    nk = -(-lkv // block_kv)
    kf = k.float()
    out = []
    for s in (2, 4, 8):
        first = torch.arange(0, lkv, s, device=k.device)
        last = (first + s - 1).clamp(max=lkv - 1)
        cos = torch.nn.functional.cosine_similarity(kf[:, :, first], kf[:, :, last], dim=-1, eps=1e-6)
        cos = torch.where(first == last, torch.ones_like(cos), cos)
        blk = torch.div(first, block_kv, rounding_mode="floor")
        sums = torch.zeros(b, h, nk, device=k.device).index_add_(2, blk, cos)
        out.append(sums / torch.bincount(blk, minlength=nk).to(torch.float32))
    return torch.stack(out, dim=-1)


def similarity_caps_reference(
    k: torch.Tensor, *, block_kv: int, thresholds: tuple[float, float, float]
) -> torch.Tensor:
    """Largest allowed pooling factor per KV block ``[B, H, Nk]`` int64 (1 where none is allowed).

    k: ``[B, H, Lkv, D]``; ``thresholds``: ``(tau_2, tau_4, tau_8)``.
    """
    smooth = block_smoothness_reference(k, block_kv=block_kv)  # [B, H, Nk, 3] for factors 2, 4, 8
    tau = torch.tensor(thresholds, device=k.device, dtype=smooth.dtype)
    factors = torch.tensor(POOLED_LEVELS, device=k.device, dtype=torch.int64)
    return torch.where(smooth >= tau, factors, torch.ones_like(factors)).amax(-1)


SINK_COUNT = 16
"""Sink keys per head that the default "density" rule's estimate adds to its samples."""
SINK_SEGMENT = 32
"""Keys per sink candidate: each run of 32 keys (aligned; blocks hold whole runs) offers its favourite key."""


def key_block_statistics_reference(
    k: torch.Tensor, q_mean: torch.Tensor, *, block_kv: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per KV block: the within-group key scatter; per run of ``SINK_SEGMENT`` keys: the mean query's favourite.

    k: ``[B, H, Lkv, D]``; q_mean: ``[B, H, D]``, the mean query of each head. Returns

    * ``scatter`` ``[B, H, Nk, 3]`` float32: for factors 2, 4, 8, the mean over the block's real keys of
      ``|k_t - kbar_g(t)|**2`` with ``kbar_g`` the mean of the key's pooling group (real tokens only).
      With ``m2`` the mean squared query norm, ``scale**2 * m2 * scatter / D`` is the within-group
      logit variance for queries spread evenly over all directions (docs/benchmarks.md, s. 2);
    * ``top_logit`` ``[B, H, Ns]`` float32: ``max_t q_mean . k_t`` over each run of ``SINK_SEGMENT`` keys
      (``Ns = Nk * block_kv / SINK_SEGMENT``; the runs of KV block ``j`` are ``j * block_kv / SINK_SEGMENT``
      onwards), and
    * ``top_index`` ``[B, H, Ns]`` int64: its position (the first maximum).

    A sink, a key that every query attends to, has a large product with the mean query, while a
    key attended only by its own neighbourhood does not (``sink_keys`` picks them). Non-finite
    entries of k and q_mean count as 0.
    """
    kf = torch.nan_to_num(k.float(), nan=0.0, posinf=0.0, neginf=0.0)
    qm = torch.nan_to_num(q_mean.float(), nan=0.0, posinf=0.0, neginf=0.0)
    b, h, lkv, d = kf.shape
    nk = -(-lkv // block_kv)
    owner = torch.div(torch.arange(lkv, device=k.device), block_kv, rounding_mode="floor")
    n_kv = torch.bincount(owner, minlength=nk).to(torch.float32)
    scatter = []
    for s in POOLED_LEVELS:
        groups = -(-lkv // s)
        pad = groups * s - lkv
        x = torch.nn.functional.pad(kf, (0, 0, 0, pad)).view(b, h, groups, s, d)
        real = (torch.arange(groups * s, device=k.device) < lkv).view(groups, s, 1).to(torch.float32)
        mean = (x * real).sum(3, keepdim=True) / real.sum(1, keepdim=True)
        dev = ((x - mean) * real).square().sum(-1).flatten(2)[..., :lkv]  # [B, H, Lkv]
        scatter.append(torch.zeros(b, h, nk, device=k.device).index_add_(2, owner, dev) / n_kv)
    y = (kf @ qm.unsqueeze(-1)).squeeze(-1)  # [B, H, Lkv]
    pad = nk * block_kv - lkv
    n_seg = nk * block_kv // SINK_SEGMENT
    yb = torch.nn.functional.pad(y, (0, pad), value=-math.inf).view(b, h, n_seg, SINK_SEGMENT)
    top_logit, arg = yb.max(-1)  # the first maximum; a run of padding only gives -inf
    return torch.stack(scatter, -1), top_logit, arg + torch.arange(n_seg, device=k.device) * SINK_SEGMENT


def sink_keys(top_logit: torch.Tensor, top_index: torch.Tensor, count: int = SINK_COUNT) -> torch.Tensor:
    """The ``count`` sink candidates of each head ``[B, H, count]`` int64: the favourite keys of the runs
    whose favourite has the largest ``top_logit`` (a stable descending sort: ties to the lower run).

    At most one per run of ``SINK_SEGMENT`` keys; fewer runs than ``count`` give every run's.
    """
    count = min(count, top_logit.shape[-1])
    order = torch.sort(top_logit, dim=-1, descending=True, stable=True).indices[..., :count]
    return top_index.gather(-1, order)
