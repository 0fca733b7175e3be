"""psa_attention, the functional entry point, and the plan/run split for reusing a mask.

``psa_attention`` validates its inputs, resolves the backend and the Gilbert grid, then calls the
``torch.ops.psa`` ops (``library.py``): ``permute_tokens`` -> ``build_mask`` -> ``attention`` ->
``permute_tokens`` back. ``torch.compile`` sees those ops as single nodes.

``plan_attention`` / ``run_attention`` split the same work as FlashInfer does: build the mask (and,
on the Triton path, the pooled K/V) once, run attention with it as often as wanted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import library
from .config import PSAConfig
from .mask import PyramidBlockMask
from .ops.attention import pool_kv_triton, sparse_attention
from .ops.levels import RECENT_TOKENS, SINK_TOKENS, check_causal_mask, check_causal_rule
from .ops.triton_support import BACKENDS, resolve_backend

__all__ = [
    "BACKENDS",
    "PSAPlan",
    "attention_or_dense",
    "check_qkv",
    "plan_attention",
    "psa_attention",
    "run_attention",
]


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ValueError/TypeError unless q ``[B, H, Lq, D]``, k and v ``[B, H, Lkv, D]`` fit together."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, L, D], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]:
        raise ValueError(f"batch and heads must match: {shapes}")
    if q.shape[3] != k.shape[3] or k.shape[3] != v.shape[3]:
        raise ValueError(f"head dims must match: {shapes}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have equal length: {shapes}")
    if min(q.shape) == 0 or k.shape[2] == 0:
        raise ValueError(f"empty input: {shapes}")


def _check_config(config: PSAConfig | None) -> PSAConfig:
    config = PSAConfig() if config is None else config
    if not isinstance(config, PSAConfig):
        raise TypeError(f"config must be a PSAConfig, got {type(config).__name__}")
    return config


def _check_text_and_grid(lq: int, lkv: int, text_len: int, grid) -> None:
    if isinstance(text_len, bool) or not isinstance(text_len, int) or not 0 <= text_len <= min(lq, lkv):
        raise ValueError(f"text_len={text_len!r} must be an integer in [0, min(Lq, Lkv)={min(lq, lkv)}]")
    if grid is not None and lq != lkv:
        raise ValueError(f"grid reordering needs self-attention (Lq == Lkv), got Lq={lq}, Lkv={lkv}")


def _check_causal(lq: int, lkv: int, grid, config: PSAConfig, sink_tokens: int, recent_tokens: int) -> None:
    if lq != lkv:
        raise ValueError(f"causal=True needs self-attention of one sequence (Lq == Lkv), got Lq={lq}, Lkv={lkv}")
    if grid is not None:
        raise ValueError(f"causal=True keeps the sequence order: grid={grid!r} must be None")
    check_causal_rule(config, sink_tokens, recent_tokens)


def _check_mask(mask, q: torch.Tensor, lkv: int) -> PyramidBlockMask:
    if not isinstance(mask, PyramidBlockMask):
        raise TypeError(f"mask must be a PyramidBlockMask, got {type(mask).__name__}")
    mask.check_fits(q.shape[2], lkv)
    if mask.shape[:2] != tuple(q.shape[:2]):
        raise ValueError(f"mask batch/heads {mask.shape[:2]} do not match q {tuple(q.shape)}")
    return mask


def _mask_of(q: torch.Tensor, k: torch.Tensor, config: PSAConfig, text_len: int, scale: float, backend: str):
    """The compact mask through ``psa.build_mask`` (no gradient: the mask is a constant of the inputs)."""
    counts, indices = torch.ops.psa.build_mask(
        q.detach(), k.detach(), *library.config_op_args(config), text_len, scale, backend
    )
    return PyramidBlockMask(counts, indices, block_q=config.block_q, block_kv=config.block_kv)


def psa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: PSAConfig | None = None,
    *,
    mask: PyramidBlockMask | None = None,
    scale: float | None = None,
    text_len: int = 0,
    grid: tuple[int, int, int] | None = None,
    backend: str = "auto",
    return_mask: bool = False,
    causal: bool = False,
    sink_tokens: int = SINK_TOKENS,
    recent_tokens: int = RECENT_TOKENS,
):
    """Pyramid sparse attention of q ``[B, H, Lq, D]`` over k, v ``[B, H, Lkv, D]``.

    config:   the budget (default ``PSAConfig()``); ignored for level choice when ``mask`` is given.
    mask:     a ready mask, in the token order attention sees (after any reordering).
    text_len: the last ``text_len`` tokens are text: seen at level 1 by every query, and attending densely.
    grid:     ``(T, H, W)`` of the video tokens (the first ``L - text_len``), needed for Gilbert order;
              without it a Gilbert config runs in raster order.
    backend:  "auto" (Triton on CUDA where it applies, else the reference), "reference" or "triton".
    causal:   decoder self-attention (``Lq == Lkv``, no grid): no query sees a later key. The level
              rule (quota or mass mode) keeps the diagonal blocks, the first ``sink_tokens`` tokens and
              the ``recent_tokens`` before each query block at level 1 and skips the blocks above the
              diagonal; a given ``mask`` must keep its diagonal blocks at level 1.
    Returns ``[B, H, Lq, D]`` in q's dtype, or ``(out, mask)`` with ``return_mask=True``.
    Differentiable in q, k and v (the mask is treated as a constant).
    """
    check_qkv(q, k, v)
    config = _check_config(config)
    lq, lkv, d = q.shape[2], k.shape[2], q.shape[3]
    _check_text_and_grid(lq, lkv, text_len, grid)
    if causal:
        _check_causal(lq, lkv, grid, config, sink_tokens, recent_tokens)
    # detached: the Triton path has a backward (psa.attention_backward), so requiring grad does not rule it out
    backend = resolve_backend(backend, q.detach(), k.detach(), v.detach(), names=("q", "k", "v"))
    scale = d**-0.5 if scale is None else float(scale)
    reorder = config.token_order == "gilbert" and grid is not None
    if reorder:
        grid = list(grid)
        q, k, v = (torch.ops.psa.permute_tokens(t, grid, text_len, False) for t in (q, k, v))
    if mask is None and causal:
        counts, indices = torch.ops.psa.build_causal_mask(
            q.detach(), k.detach(), *library.config_op_args(config), text_len, sink_tokens, recent_tokens, scale,
            backend,
        )  # fmt: skip
        mask = PyramidBlockMask(counts, indices, block_q=config.block_q, block_kv=config.block_kv)
    elif mask is None:
        mask = _mask_of(q, k, config, text_len, scale, backend)
    else:
        mask = _check_mask(mask, q, lkv)
        if causal:
            check_causal_mask(mask, lq)
    # the op also returns each row's log-sum-exp, which only its backward reads
    out, _ = torch.ops.psa.attention(q, k, v, mask.kv_counts, mask.kv_indices, mask.block_q, mask.block_kv, scale,
                                     backend, causal)  # fmt: skip
    if reorder:
        out = torch.ops.psa.permute_tokens(out, grid, text_len, True)
    return (out, mask) if return_mask else out


def attention_or_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: PSAConfig,
    control: torch.Tensor,
    *,
    scale: float | None = None,
    text_len: int = 0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse or dense attention of q, k, v ``[B, H, L, D]``, per call or per head, as the host-side
    ``control`` says: ``(out, densities)``, the FLOP density of each head's mask, ``[H]`` float64 on q's
    device (the mean over the batch; 1.0 where no mask is built).

    control: an integer CPU tensor: ``control[0]`` is ``library.SPARSE`` (PSA with ``config``),
             ``library.DENSE`` (``scaled_dot_product_attention``, no mask) or ``library.DENSE_MEASURED``
             (the mask is built for its densities, attention runs dense); optional ``control[1 + h]``,
             for each head ``h``, nonzero to run that head dense under ``SPARSE``. The caller changes it
             on the host between calls; reading it needs no device synchronisation, and a compiled graph
             does not guard on its value (docs/design.md, section 5).

    Tokens are taken in the order given (no reordering); text tokens are the last ``text_len``.
    Inference only: raises ValueError for inputs that require grad (use :func:`psa_attention`).
    """
    check_qkv(q, k, v)
    config = _check_config(config)
    _check_text_and_grid(q.shape[2], k.shape[2], text_len, None)
    if not isinstance(control, torch.Tensor) or control.device.type != "cpu" or control.dim() != 1:
        raise ValueError(f"control must be a 1-D CPU tensor, got {control!r}")
    if control.is_floating_point() or control.is_complex() or control.dtype == torch.bool:
        raise ValueError(f"control must be an integer tensor, got dtype {control.dtype}")
    if control.numel() not in (1, 1 + q.shape[1]):
        raise ValueError(f"control has {control.numel()} entries: expected 1, or 1 + heads = {1 + q.shape[1]}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("attention_or_dense is inference only: q, k or v requires grad (use psa_attention)")
    backend = resolve_backend(backend, q, k, v, names=("q", "k", "v"))
    scale = q.shape[3] ** -0.5 if scale is None else float(scale)
    args = (*library.config_op_args(config), text_len, scale, backend)
    return torch.ops.psa.attention_or_dense(q, k, v, control, *args)


@dataclass(frozen=True)
class PSAPlan:
    """A mask (and, on the Triton path, pooled K/V) built once by :func:`plan_attention`.

    mask:      the compact level mask ``[B, H, Nq, Nk]``.
    pooled_kv: the pooled K and V buffers ``[B*H, L/2 + L/4 + L/8, D]`` of the planned k, v
               (Triton path with ``v`` given), else None.
    scale:     the softmax scale.
    backend:   "triton" or "reference", resolved when planning.
    kernel_config: overrides of the ``"attention"`` kernel configuration, or None.
    """

    mask: PyramidBlockMask
    pooled_kv: tuple[torch.Tensor, torch.Tensor] | None
    scale: float
    backend: str
    kernel_config: dict | None = None


def plan_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None = None,
    config: PSAConfig | None = None,
    *,
    mask: PyramidBlockMask | None = None,
    scale: float | None = None,
    text_len: int = 0,
    backend: str = "auto",
    kernel_config: dict | None = None,
) -> PSAPlan:
    """Build the mask of q ``[B, H, Lq, D]`` against k ``[B, H, Lkv, D]`` once (or take ``mask``), and pool v.

    Tokens are taken in the order attention sees them (reorder beforehand with
    ``ordering.reorder_tokens`` for Gilbert order). With ``v`` on the Triton path, K and V are
    pooled into the plan, so :func:`run_attention` on the same k, v runs only the sparse kernel.
    ``kernel_config`` overrides the attention kernel's entry of ``ops.kernel_configs``.
    """
    check_qkv(q, k, k if v is None else v)
    config = _check_config(config)
    _check_text_and_grid(q.shape[2], k.shape[2], text_len, None)
    backend = resolve_backend(backend, q, k, k if v is None else v, names=("q", "k", "v"))
    scale = q.shape[3] ** -0.5 if scale is None else float(scale)
    if mask is None:
        mask = _mask_of(q, k, config, text_len, scale, backend)
    else:
        mask = _check_mask(mask, q, k.shape[2])
    pooled = pool_kv_triton(k, v) if backend == "triton" and v is not None else None
    return PSAPlan(mask, pooled, scale, backend, dict(kernel_config) if kernel_config else None)


def run_attention(plan: PSAPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Sparse pyramid attention of q, k, v ``[B, H, L, D]`` with a :class:`PSAPlan`: ``[B, H, Lq, D]``.

    The plan's pooled K/V are used as they are: pass the k, v the plan was made with. Without
    pooled K/V or kernel overrides it runs the ``psa.attention`` op, so it is differentiable.
    """
    check_qkv(q, k, v)
    mask = _check_mask(plan.mask, q, k.shape[2])
    if plan.pooled_kv is None and plan.kernel_config is None:  # through the op: compile and autograd attach
        args = (mask.kv_counts, mask.kv_indices, mask.block_q, mask.block_kv, plan.scale, plan.backend)
        return torch.ops.psa.attention(q, k, v, *args)[0]
    return sparse_attention(q, k, v, plan.mask, plan.scale, backend=plan.backend, pooled=plan.pooled_kv,
                            config=plan.kernel_config)  # fmt: skip
