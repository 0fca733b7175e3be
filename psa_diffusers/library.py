"""The torch.library boundary: PSA's ops in the namespace ``psa``, with fake (meta) implementations.

* ``torch.ops.psa.attention(q, k, v, kv_counts, kv_indices, block_q, block_kv, scale, backend)``
  -> ``(out [B, H, Lq, D], lse [B, H, Lq])``: sparse pyramid attention over a compact mask, and each
  row's natural log-sum-exp (float32, not differentiable), which autograd saves with ``out`` for the
  backward, the op ``psa.attention_backward``. The Python wrappers return ``out`` alone.
* ``torch.ops.psa.build_mask(q, k, mode, budgets, min_full_share, sim_thresholds, block_q,
  block_kv, importance_stride, target_density, text_len, scale, backend)`` -> ``(kv_counts,
  kv_indices)`` int32: the level map of a :class:`~psa_diffusers.config.PSAConfig`, compacted.
* ``torch.ops.psa.build_causal_mask(q, k, <build_mask's config fields>, text_len, sink_tokens,
  recent_tokens, scale, backend)`` -> ``(kv_counts, kv_indices)``: levels that never look ahead
  (``mask_builder.build_causal_block_mask``). ``psa.attention`` and ``psa.attention_backward`` take a
  last argument ``causal`` (default False).
* ``torch.ops.psa.permute_tokens(x, grid, text_len, inverse)``: video tokens of ``[B, H, L, D]``
  into Gilbert order (or back, ``inverse``), text tokens kept at the end; autograd registered.
* ``torch.ops.psa.attention_or_dense(q, k, v, control, <build_mask's config fields>, text_len, scale,
  backend)`` -> ``(out, densities [H])``: sparse or dense attention, per call or per head, as the
  host-side ``control`` tensor says (``SPARSE``, ``DENSE``, ``DENSE_MEASURED``); the dense-fallback
  mechanism of docs/design.md, section 5. Inference only (no autograd).

The ops take plain tensors and scalars, and a resolved ``backend`` ("reference" or "triton"):
validation, logging and device queries stay in the Python wrappers (``attention.psa_attention``),
so ``torch.compile`` traces each op as one node and never into launchers.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .config import PSAConfig
from .mask import PyramidBlockMask, ceil_div
from .mask_builder import build_block_mask, build_causal_block_mask
from .ops.attention import psa_attention_backward_reference, sparse_attention, sparse_attention_backward
from .ordering import reorder_tokens, restore_tokens

__all__ = [
    "DENSE",
    "DENSE_MEASURED",
    "SPARSE",
    "attention_backward_op",
    "attention_op",
    "attention_or_dense_impl",
    "attention_or_dense_op",
    "build_causal_mask_op",
    "build_mask_op",
    "config_from_op_args",
    "config_op_args",
    "permute_tokens_op",
]


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
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    mask = PyramidBlockMask(kv_counts, kv_indices, block_q=block_q, block_kv=block_kv)
    out, lse = sparse_attention(q, k, v, mask, scale, backend=backend, causal=causal, return_lse=True)
    return out.contiguous(), lse.contiguous()


@attention_op.register_fake
def _attention_fake(q, k, v, kv_counts, kv_indices, block_q, block_kv, scale, backend, causal=False):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), q.new_empty(q.shape[:3], dtype=torch.float32)


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
    causal: bool = False,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k, v for ``grad_out`` (the mask is a constant): the Triton backward where ``backend``
    resolves to it, reading ``out`` and ``lse`` (``psa.attention``'s outputs; without them it reruns the
    forward); ``causal`` and the reference recompute everything."""
    mask = PyramidBlockMask(kv_counts, kv_indices, block_q=block_q, block_kv=block_kv)
    if causal:
        grads = psa_attention_backward_reference(grad_out, q, k, v, mask, scale, causal=True)
        return tuple(g.contiguous() for g in grads)  # type: ignore[return-value]
    grads = sparse_attention_backward(grad_out, q, k, v, mask, scale, backend=backend, out=out, lse=lse)
    return tuple(g.contiguous() for g in grads)  # type: ignore[return-value]


@attention_backward_op.register_fake
def _attention_backward_fake(grad_out, q, k, v, kv_counts, kv_indices, block_q, block_kv, scale, backend,
                             causal=False, out=None, lse=None):  # fmt: skip
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _attention_setup(ctx, inputs, output) -> None:
    q, k, v, kv_counts, kv_indices, block_q, block_kv, scale, backend, causal = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, kv_counts, kv_indices, out, lse)
    ctx.args = (block_q, block_kv, scale, backend, causal)


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, kv_counts, kv_indices, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(grad_out, q, k, v, kv_counts, kv_indices, *ctx.args, out, lse)
    return dq, dk, dv, None, None, None, None, None, None, None


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
    config = config_from_op_args(
        mode, budgets, min_full_share, sim_thresholds, block_q, block_kv, importance_stride, target_density
    )
    mask = build_block_mask(q, k, config, text_len=text_len, scale=scale, backend=backend)
    return mask.kv_counts.to(torch.int32).contiguous(), mask.kv_indices.to(torch.int32).contiguous()


@build_mask_op.register_fake
def _build_mask_fake(q, k, mode, budgets, min_full_share, sim_thresholds, block_q, block_kv, importance_stride,
                     target_density, text_len, scale, backend):  # fmt: skip
    b, h = q.shape[:2]
    nq, nk = ceil_div(q.shape[2], block_q), ceil_div(k.shape[2], block_kv)
    counts = torch.empty((b, h, nq, 4), dtype=torch.int32, device=q.device)
    return counts, torch.empty((b, h, nq, nk), dtype=torch.int32, device=q.device)


@torch.library.custom_op("psa::build_causal_mask", mutates_args=())
def build_causal_mask_op(
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
    sink_tokens: int,
    recent_tokens: int,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    config = config_from_op_args(
        mode, budgets, min_full_share, sim_thresholds, block_q, block_kv, importance_stride, target_density
    )
    mask = build_causal_block_mask(
        q, k, config, sink_tokens=sink_tokens, recent_tokens=recent_tokens, text_len=text_len, scale=scale,
        backend=backend,
    )  # fmt: skip
    return mask.kv_counts.to(torch.int32).contiguous(), mask.kv_indices.to(torch.int32).contiguous()


@build_causal_mask_op.register_fake
def _build_causal_mask_fake(q, k, mode, budgets, min_full_share, sim_thresholds, block_q, block_kv,
                            importance_stride, target_density, text_len, sink_tokens, recent_tokens, scale,
                            backend):  # fmt: skip
    return _build_mask_fake(q, k, mode, budgets, min_full_share, sim_thresholds, block_q, block_kv,
                            importance_stride, target_density, text_len, scale, backend)  # fmt: skip


def config_from_op_args(
    mode, budgets, min_full_share, sim_thresholds, block_q, block_kv, importance_stride, target_density
) -> PSAConfig:
    """The :class:`PSAConfig` of the fields an op received: the inverse of :func:`config_op_args`.

    Cached: the ops of every layer receive the same fields at every step, so the config is built and
    validated once per distinct value, not per call."""
    return _config_of(
        mode, tuple(budgets), min_full_share, tuple(sim_thresholds), block_q, block_kv, importance_stride,
        target_density,
    )  # fmt: skip


@functools.lru_cache(maxsize=64)
def _config_of(mode, budgets, min_full_share, sim_thresholds, block_q, block_kv, importance_stride, target_density):
    return PSAConfig(
        block_q=block_q, block_kv=block_kv, mode=mode, budgets=budgets, min_full_share=min_full_share,
        sim_thresholds=sim_thresholds or None, importance_stride=importance_stride, target_density=target_density,
    )  # fmt: skip


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


# ------------------------------------------------------------------------------------------ dense fallback
SPARSE = 0
"""``control[0]`` of ``psa.attention_or_dense``: build the mask, run sparse attention -- except for the
heads ``h`` with ``control[1 + h]`` set, which run dense attention."""
DENSE = 1
"""``control[0]``: dense attention (SDPA), no mask (a dense step of a preset's schedule); densities 1."""
DENSE_MEASURED = 2
"""``control[0]``: build the mask (for its densities), run dense attention (the dense fallback)."""


@functools.lru_cache(maxsize=256)
def _head_index(device: str, heads: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index on device, its host source)`` of ``heads``, cached: built once per head set, copied
    without a host synchronisation (pinned memory; the source is kept alive with the index)."""
    host = torch.tensor(heads, dtype=torch.int64)
    if torch.device(device).type == "cuda":
        host = host.pin_memory()
        return host.to(device, non_blocking=True), host
    return host.to(device), host


def _split_heads(q, k, v, mask: PyramidBlockMask, dense: list[int], scale: float, backend: str) -> torch.Tensor:
    """Sparse attention for the heads not in ``dense``, SDPA for those in it."""
    heads = q.shape[1]
    sparse_idx, _ = _head_index(str(q.device), tuple(h for h in range(heads) if h not in dense))
    dense_idx, _ = _head_index(str(q.device), tuple(dense))
    sub = PyramidBlockMask(
        mask.kv_counts.index_select(1, sparse_idx),
        mask.kv_indices.index_select(1, sparse_idx),
        block_q=mask.block_q,
        block_kv=mask.block_kv,
    )
    q_s, k_s, v_s = (t.index_select(1, sparse_idx) for t in (q, k, v))
    q_d, k_d, v_d = (t.index_select(1, dense_idx) for t in (q, k, v))
    out = torch.empty_like(q)
    out.index_copy_(1, sparse_idx, sparse_attention(q_s, k_s, v_s, sub, scale, backend=backend))
    out.index_copy_(1, dense_idx, F.scaled_dot_product_attention(q_d, k_d, v_d, scale=scale))
    return out


def token_major(out: torch.Tensor) -> torch.Tensor:
    """``out`` ``[B, H, L, D]`` laid out as a contiguous ``[B, L, H, D]`` (a copy only where it is not): the
    layout ``psa.attention_or_dense`` returns, which the processors flatten to ``[B, L, H*D]`` for free (and
    which SDPA returns for token-major inputs, so a dense call costs what the stock processor's does)."""
    b, h, length, d = out.shape
    if out.stride() == (length * h * d, d, h * d, 1):  # exactly the fake's strides (size-1 dims too)
        return out
    major = torch.empty((b, length, h, d), dtype=out.dtype, device=out.device).transpose(1, 2)
    return major.copy_(out)


def attention_or_dense_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    control: torch.Tensor,
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
    """``(out [B, H, Lq, D], densities [H])``: the attention ``control`` asks for (in token-major memory,
    :func:`token_major`), and the FLOP density of each head's mask (float64 on q's device, the mean over
    the batch; 1.0 when no mask is built).

    ``control`` is a CPU tensor that the caller sets on the host between calls: ``control[0]`` the
    action (``SPARSE``, ``DENSE``, ``DENSE_MEASURED``), ``control[1 + h]`` (optional) nonzero for a head
    ``h`` that runs dense under ``SPARSE``. Reading it costs no device synchronisation, and under
    ``torch.compile`` it is a graph input whose value is not guarded, so one graph serves dense and
    sparse calls alike.
    """
    flags = control.tolist()
    action, heads = flags[0], q.shape[1]
    if action == DENSE:
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        return token_major(out), torch.ones(heads, dtype=torch.float64, device=q.device)
    config = config_from_op_args(
        mode, budgets, min_full_share, sim_thresholds, block_q, block_kv, importance_stride, target_density
    )
    mask = build_block_mask(q, k, config, text_len=text_len, scale=scale, backend=backend)
    densities = mask.head_densities(q.shape[2], k.shape[2])
    dense = [h for h, flag in enumerate(flags[1 : 1 + heads]) if flag]
    if action == DENSE_MEASURED or len(dense) == heads:
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    elif dense:
        out = _split_heads(q, k, v, mask, dense, scale, backend)
    else:
        out = sparse_attention(q, k, v, mask, scale, backend=backend)
    return token_major(out), densities


attention_or_dense_op = torch.library.custom_op("psa::attention_or_dense", mutates_args=())(attention_or_dense_impl)


@attention_or_dense_op.register_fake
def _attention_or_dense_fake(q, k, v, control, mode, budgets, min_full_share, sim_thresholds, block_q, block_kv,
                             importance_stride, target_density, text_len, scale, backend):  # fmt: skip
    densities = torch.empty(q.shape[1], dtype=torch.float64, device=q.device)
    b, h, length, d = q.shape
    return torch.empty((b, length, h, d), dtype=q.dtype, device=q.device).transpose(1, 2), densities
