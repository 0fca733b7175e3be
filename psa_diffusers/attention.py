"""psa_attention: the functional entry point (mask, reorder, dispatch to Triton or the reference)."""

from __future__ import annotations

import logging

import torch

from .config import PSAConfig
from .mask import PyramidBlockMask
from .mask_builder import build_block_mask
from .reference import psa_attention_reference

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "triton")


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


def _check_text_and_grid(lq: int, lkv: int, text_len: int, grid) -> None:
    if not isinstance(text_len, int) or text_len < 0 or text_len > min(lq, lkv):
        raise ValueError(f"text_len={text_len!r} must be an integer in [0, min(Lq, Lkv)={min(lq, lkv)}]")
    if grid is not None:
        if lq != lkv:
            raise ValueError(f"grid reordering needs self-attention (Lq == Lkv), got Lq={lq}, Lkv={lkv}")


def _run_kernel(q, k, v, mask, scale, backend: str) -> torch.Tensor:
    if backend == "reference" or (backend == "auto" and not q.is_cuda):
        return psa_attention_reference(q, k, v, mask, scale)
    from .kernels import psa_attention_triton, triton_unsupported_reason

    reason = triton_unsupported_reason(q, k, v)
    if reason is None:
        return psa_attention_triton(q, k, v, mask, scale)
    if backend == "triton":
        raise ValueError(f"backend='triton' cannot run here: {reason}")
    logger.debug("psa_attention on the PyTorch reference: %s", reason)
    return psa_attention_reference(q, k, v, mask, scale)


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
):
    """Pyramid sparse attention of q ``[B, H, Lq, D]`` over k, v ``[B, H, Lkv, D]``.

    config:   the budget (default ``PSAConfig()``); ignored for level choice when ``mask`` is given.
    mask:     a ready mask, in the token order attention sees (after any reordering).
    text_len: the last ``text_len`` tokens are text: seen at level 1 by every query, and attending densely.
    grid:     ``(T, H, W)`` of the video tokens (the first ``L - text_len``), needed for Gilbert order;
              without it a Gilbert config runs in raster order.
    backend:  "auto" (Triton on CUDA where it applies, else the reference), "reference" or "triton".
    Returns ``[B, H, Lq, D]`` in q's dtype, or ``(out, mask)`` with ``return_mask=True``.
    """
    check_qkv(q, k, v)
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: allowed values are {BACKENDS}")
    config = PSAConfig() if config is None else config
    if not isinstance(config, PSAConfig):
        raise TypeError(f"config must be a PSAConfig, got {type(config).__name__}")
    lq, lkv = q.shape[2], k.shape[2]
    _check_text_and_grid(lq, lkv, text_len, grid)
    reorder = config.token_order == "gilbert" and grid is not None
    if config.token_order == "gilbert" and grid is None:
        logger.debug("token_order='gilbert' without a grid: attention runs in raster order")
    if reorder:
        from .ordering import reorder_tokens

        q, k, v = (reorder_tokens(t, grid, text_len) for t in (q, k, v))
    if mask is None:
        mask = build_block_mask(q, k, config, text_len=text_len, scale=scale)
    elif not isinstance(mask, PyramidBlockMask):
        raise TypeError(f"mask must be a PyramidBlockMask, got {type(mask).__name__}")
    mask.check_fits(lq, lkv)
    if mask.shape[:2] != tuple(q.shape[:2]):
        raise ValueError(f"mask batch/heads {mask.shape[:2]} do not match q {tuple(q.shape)}")
    out = _run_kernel(q, k, v, mask, scale, backend)
    if reorder:
        from .ordering import restore_tokens

        out = restore_tokens(out, grid, text_len)
    return (out, mask) if return_mask else out
