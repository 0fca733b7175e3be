"""Sparse pyramid attention over a compact level mask: the reference, the Triton forward and backward."""

from __future__ import annotations

import torch

from ...mask import PyramidBlockMask
from ..pooling import pool_kv_triton
from ..triton_support import resolve_backend, triton_unsupported_reason
from .backward_kernel import launch_attention_backward, psa_attention_backward_triton, transposed_mask
from .kernel import launch_attention, psa_attention_triton
from .reference import check_causal_lengths, last_keys, psa_attention_backward_reference, psa_attention_reference

__all__ = [
    "check_causal_lengths",
    "last_keys",
    "launch_attention",
    "launch_attention_backward",
    "pool_kv_triton",
    "psa_attention_backward_reference",
    "psa_attention_backward_triton",
    "psa_attention_reference",
    "psa_attention_triton",
    "sparse_attention",
    "sparse_attention_backward",
    "transposed_mask",
    "triton_unsupported_reason",
]


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: PyramidBlockMask,
    scale: float | None = None,
    *,
    backend: str = "auto",
    pooled: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: dict | None = None,
    causal: bool = False,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Pyramid sparse attention of q ``[B, H, Lq, D]`` over k, v ``[B, H, Lkv, D]`` with a ready ``mask``.

    ``pooled`` (Triton only): K/V pooled once by :func:`pool_kv_triton`; ``config``: kernel tile overrides;
    ``causal``: no query sees a later key (``Lq == Lkv``; reference module docstring).
    Returns ``[B, H, Lq, D]`` in q's dtype; with ``return_lse`` ``(out, lse)``, ``lse`` ``[B, H, Lq]``
    float32 each row's natural log-sum-exp (what :func:`sparse_attention_backward` takes).
    """
    if resolve_backend(backend, q, k, v, names=("q", "k", "v")) == "triton":
        return psa_attention_triton(q, k, v, mask, scale, pooled=pooled, config=config, causal=causal,
                                    return_lse=return_lse)  # fmt: skip
    return psa_attention_reference(q, k, v, mask, scale, causal=causal, return_lse=return_lse)


def sparse_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: PyramidBlockMask,
    scale: float | None = None,
    *,
    backend: str = "auto",
    config: dict | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of :func:`sparse_attention` for ``grad_out`` ``[B, H, Lq, D]`` (mask constant).

    ``out``, ``lse`` (Triton only, both or neither): the forward's output and log-sum-exp
    (``sparse_attention(..., return_lse=True)``); without them the Triton path reruns the forward.
    The reference recomputes everything and ignores them. ``config`` (Triton only): overrides of the
    ``"attention_backward"`` kernel tiles.
    """
    args = tuple(t.detach() for t in (q, k, v))  # the backend depends on shapes and devices, not on autograd
    if resolve_backend(backend, *args, names=("q", "k", "v")) == "triton":
        return psa_attention_backward_triton(grad_out, q, k, v, mask, scale, out=out, lse=lse, config=config)
    return psa_attention_backward_reference(grad_out, q, k, v, mask, scale)
