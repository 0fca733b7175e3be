"""The torch.library boundary: PSA's ops in the namespace ``psa``, with fake (meta) implementations.

* ``torch.ops.psa.attention(q, k, v, kv_counts, kv_indices, block_q, block_kv, scale, backend)``
  -> ``[B, H, Lq, D]``: sparse pyramid attention over a compact mask; autograd is registered
  (its backward is the op ``psa.attention_backward``).
* ``torch.ops.psa.build_mask(q, k, mode, budgets, min_full_share, sim_thresholds, block_q,
  block_kv, importance_stride, target_density, text_len, scale, backend)`` -> ``(kv_counts,
  kv_indices)`` int32: the level map of a :class:`~psa_diffusers.config.PSAConfig`, compacted.
* ``torch.ops.psa.permute_tokens(x, grid, text_len, inverse)``: video tokens of ``[B, H, L, D]``
  into Gilbert order (or back, ``inverse``), text tokens kept at the end; autograd registered.

The ops take plain tensors and scalars, and a resolved ``backend`` ("reference" or "triton"):
validation, logging and device queries stay in the Python wrappers (``attention.psa_attention``),
so ``torch.compile`` traces each op as one node and never into launchers.
"""

from __future__ import annotations

import torch

from .config import PSAConfig
from .mask import PyramidBlockMask, ceil_div
from .mask_builder import build_block_mask
from .ops.attention import psa_attention_backward_reference, sparse_attention
from .ordering import reorder_tokens, restore_tokens

__all__ = ["attention_op", "attention_backward_op", "build_mask_op", "permute_tokens_op", "config_op_args"]


# ------------------------------------------------------------------------------------------ attention
@torch.library.custom_op("psa::attention", mutates_args=())
def attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    block_q: int,
    block_kv: int,
    scale: float,
    backend: str,
) -> torch.Tensor:
    mask = PyramidBlockMask(kv_counts, kv_indices, block_q=block_q, block_kv=block_kv)
    return sparse_attention(q, k, v, mask, scale, backend=backend).contiguous()


@attention_op.register_fake
def _attention_fake(q, k, v, kv_counts, kv_indices, block_q, block_kv, scale, backend):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@torch.library.custom_op("psa::attention_backward", mutates_args=())
def attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    block_q: int,
    block_kv: int,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k, v for ``grad_out`` (the mask is a constant)."""
    mask = PyramidBlockMask(kv_counts, kv_indices, block_q=block_q, block_kv=block_kv)
    grads = psa_attention_backward_reference(grad_out, q, k, v, mask, scale)
    return tuple(g.contiguous() for g in grads)  # type: ignore[return-value]


@attention_backward_op.register_fake
def _attention_backward_fake(grad_out, q, k, v, kv_counts, kv_indices, block_q, block_kv, scale, backend):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _attention_setup(ctx, inputs, output) -> None:
    q, k, v, kv_counts, kv_indices, block_q, block_kv, scale, backend = inputs
    ctx.save_for_backward(q, k, v, kv_counts, kv_indices)
    ctx.args = (block_q, block_kv, scale, backend)


def _attention_backward(ctx, grad_out):
    q, k, v, kv_counts, kv_indices = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(grad_out, q, k, v, kv_counts, kv_indices, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


attention_op.register_autograd(_attention_backward, setup_context=_attention_setup)


# ------------------------------------------------------------------------------------------ mask
@torch.library.custom_op("psa::build_mask", mutates_args=())
def build_mask_op(
    q: torch.Tensor,
    k: torch.Tensor,
    mode: str,
    budgets: list[float],
    min_full_share: float,
    sim_thresholds: list[float],
    block_q: int,
    block_kv: int,
    importance_stride: int,
    target_density: float | None,
    text_len: int,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    config = PSAConfig(
        block_q=block_q, block_kv=block_kv, mode=mode, budgets=tuple(budgets), min_full_share=min_full_share,
        sim_thresholds=tuple(sim_thresholds) or None, importance_stride=importance_stride,
        target_density=target_density,
    )  # fmt: skip
    mask = build_block_mask(q, k, config, text_len=text_len, scale=scale, backend=backend)
    return mask.kv_counts.to(torch.int32).contiguous(), mask.kv_indices.to(torch.int32).contiguous()


@build_mask_op.register_fake
def _build_mask_fake(q, k, mode, budgets, min_full_share, sim_thresholds, block_q, block_kv, importance_stride,
                     target_density, text_len, scale, backend):  # fmt: skip
    b, h = q.shape[:2]
    nq, nk = ceil_div(q.shape[2], block_q), ceil_div(k.shape[2], block_kv)
    counts = torch.empty((b, h, nq, 4), dtype=torch.int32, device=q.device)
    return counts, torch.empty((b, h, nq, nk), dtype=torch.int32, device=q.device)


def config_op_args(config: PSAConfig) -> tuple:
    """The fields of ``config`` as ``psa.build_mask`` takes them (after ``k``, before ``text_len``)."""
    return (
        config.mode, list(config.budgets), config.min_full_share, list(config.sim_thresholds or ()),
        config.block_q, config.block_kv, config.importance_stride, config.target_density,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ token order
@torch.library.custom_op("psa::permute_tokens", mutates_args=())
def permute_tokens_op(x: torch.Tensor, grid: list[int], text_len: int, inverse: bool) -> torch.Tensor:
    move = restore_tokens if inverse else reorder_tokens
    return move(x, tuple(grid), text_len).contiguous()


@permute_tokens_op.register_fake
def _permute_tokens_fake(x, grid, text_len, inverse):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _permute_setup(ctx, inputs, output) -> None:
    _, grid, text_len, inverse = inputs
    ctx.args = (grid, text_len, not inverse)


def _permute_backward(ctx, grad):
    return permute_tokens_op(grad, *ctx.args), None, None, None


permute_tokens_op.register_autograd(_permute_backward, setup_context=_permute_setup)
