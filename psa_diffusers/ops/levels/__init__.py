"""Level choice: importance -> levels (quota or mass rule) -> caps -> forced text -> the compact mask.

The causal rule (``causal.py``, kernel ``build_causal_mask_triton``) chooses levels that never look
ahead, for decoder prefill.
"""

from __future__ import annotations

import torch

from ...config import PSAConfig
from ...mask import PyramidBlockMask
from ..triton_support import resolve_table_backend
from .causal import (
    RECENT_TOKENS,
    SINK_TOKENS,
    causal_density,
    causal_levels_reference,
    causal_relation,
    check_causal_mask,
    check_causal_rule,
)
from .kernel import build_causal_mask_triton, build_mask_triton, compact_levels_triton
from .reference import (
    apply_caps,
    choose_levels_reference,
    compact_levels_reference,
    force_text_levels,
    levels_from_importance,
)
from .rules import quota_bounds

__all__ = [
    "RECENT_TOKENS",
    "SINK_TOKENS",
    "apply_caps",
    "build_causal_mask_triton",
    "build_mask_triton",
    "causal_density",
    "causal_levels",
    "causal_levels_reference",
    "causal_relation",
    "check_causal_mask",
    "check_causal_rule",
    "choose_levels",
    "choose_levels_reference",
    "compact_levels",
    "compact_levels_reference",
    "compact_levels_triton",
    "force_text_levels",
    "levels_from_importance",
    "quota_bounds",
]


def choose_levels(
    importance: torch.Tensor,
    config: PSAConfig,
    *,
    num_kv_blocks: int | None = None,
    num_q_blocks: int | None = None,
    caps: torch.Tensor | None = None,
    backend: str = "auto",
) -> PyramidBlockMask:
    """The compact mask for ``importance`` ``[B, H, Nq, Nk]`` under ``config``'s quota or mass rule.

    The first ``num_kv_blocks`` KV blocks compete (the rest, text, are level 1); query rows from
    ``num_q_blocks`` on see everything at level 1; ``caps`` ``[B, H, Nk]`` cap the pooling factor.
    """
    kwargs = dict(num_kv_blocks=num_kv_blocks, num_q_blocks=num_q_blocks, caps=caps)
    if resolve_table_backend(backend, importance) == "triton":
        return build_mask_triton(importance, config, **kwargs)
    return choose_levels_reference(importance, config, **kwargs)


def causal_levels(
    importance: torch.Tensor,
    config: PSAConfig,
    *,
    length: int,
    sink_tokens: int,
    recent_tokens: int,
    text_len: int = 0,
    caps: torch.Tensor | None = None,
    backend: str = "auto",
) -> PyramidBlockMask:
    """The causal compact mask for ``importance`` ``[B, H, Nq, Nk]`` of a sequence of ``length`` tokens.

    The rule of ``causal.py`` (diagonal, sink, recent and text-row blocks level 1, future blocks
    skipped, the rest of each row's past under the quota or mass rule); ``caps`` ``[B, H, Nk]``
    cap the competing blocks' pooling factor. One Triton launch on CUDA (``backend="auto"``).
    """
    kwargs = dict(length=length, sink_tokens=sink_tokens, recent_tokens=recent_tokens, text_len=text_len, caps=caps)
    if resolve_table_backend(backend, importance) == "triton":
        return build_causal_mask_triton(importance, config, **kwargs)
    return causal_levels_reference(importance, config, **kwargs)


def compact_levels(
    level_map: torch.Tensor,
    *,
    block_q: int,
    block_kv: int,
    num_kv_blocks: int | None = None,
    num_q_blocks: int | None = None,
    backend: str = "auto",
) -> PyramidBlockMask:
    """The compact mask of a valid level map ``[B, H, Nq, Nk]`` after forcing the text levels to 1."""
    kwargs = dict(block_q=block_q, block_kv=block_kv, num_kv_blocks=num_kv_blocks, num_q_blocks=num_q_blocks)
    if resolve_table_backend(backend, level_map) == "triton":
        return compact_levels_triton(level_map, **kwargs)
    return compact_levels_reference(level_map, **kwargs)
