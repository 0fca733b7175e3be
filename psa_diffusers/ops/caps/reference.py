"""Key smoothness per KV block and the similarity cap (plain PyTorch reference).

A KV block whose keys are not smooth should not be pooled coarsely: for each pooling factor
``s`` in (2, 4, 8) the block's smoothness is the mean, over its groups of ``s`` keys, of the
cosine similarity between the first and the last key of the group; factor ``s`` is allowed
when that is at least the threshold ``tau_s``. The cap of a block is the largest allowed factor
(1 when none is).
"""

from __future__ import annotations

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
