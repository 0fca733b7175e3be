"""Token order: the 3D generalised Hilbert ("Gilbert") curve over the ``(T, H, W)`` latent grid.

Video tokens arrive in raster order ``(t, h, w)``, so a block of 128 consecutive tokens is a thin
line of pixels. A Hilbert curve visits every cell of a box while staying local: consecutive cells are
grid neighbours and every run of consecutive cells fills a compact 3D neighbourhood. The generalised
construction works for any box, not only powers of two: a box is split into two or five sub-boxes
(halves preferring even sizes) chained so that each one ends next to where the following one starts.
On boxes with odd sides a few steps are diagonal instead of unit steps.

Reordering ``q, k, v`` along the curve before attention and restoring the output afterwards leaves
full attention unchanged and makes each attention block a compact region. The permutation depends only
on the grid, so it is computed once per grid (and once per device) and cached.
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import torch

__all__ = ["gilbert_order", "video_permutation", "reorder_tokens", "restore_tokens"]

# An edge of a box: (axis, signed length). The axis indexes (t, h, w); the sign is the direction
# of travel; the length is the number of cells along that axis.
_Edge = tuple[int, int]


def _split(n: int) -> tuple[int, int]:
    """Signed length ``n`` (``|n| >= 1``) cut in two; the first part even where that leaves both parts non-empty."""
    m = abs(n)
    first = m // 2
    if first % 2 and m > 2:
        first += 1
    s = 1 if n > 0 else -1
    return s * first, s * (m - first)


def _fill(out: list[int], strides: tuple[int, int, int], p: int, a: _Edge, b: _Edge, c: _Edge) -> None:
    """Append to ``out`` the raster indices of the box at corner ``p`` spanned by edges ``a``, ``b``, ``c``.

    The walk starts at ``p`` and, whenever the box allows a unit-step path there, ends at the cell
    one step short of ``p + a`` (the far end of the first edge); ``a`` is the major direction.
    """
    (ia, na), (ib, nb), (ic, nc) = a, b, c
    w, h, d = abs(na), abs(nb), abs(nc)
    if w == 0 or h == 0 or d == 0:
        return
    sa, sb, sc = strides[ia], strides[ib], strides[ic]
    ua = sa if na > 0 else -sa  # one unit step along a, as a raster offset
    ub = sb if nb > 0 else -sb
    uc = sc if nc > 0 else -sc
    if h == 1 and d == 1:
        out.extend(range(p, p + w * ua, ua))
        return
    if w == 1 and d == 1:
        out.extend(range(p, p + h * ub, ub))
        return
    if w == 1 and h == 1:
        out.extend(range(p, p + d * uc, uc))
        return

    na2, na3 = _split(na)  # a = a2 + a3, likewise for b and c
    nb2, nb3 = _split(nb)
    nc2, nc3 = _split(nc)
    a2, a3, b2, b3, c2, c3 = (ia, na2), (ia, na3), (ib, nb2), (ib, nb3), (ic, nc2), (ic, nc3)
    end_a = (w - 1) * ua  # offset of the last cell along a
    off_b2 = abs(nb2) * ub  # offset of the first cell past b2

    if 2 * w > 3 * h and 2 * w > 3 * d:
        # Long box: the two halves along a, one after the other.
        _fill(out, strides, p, a2, b, c)
        _fill(out, strides, p + abs(na2) * ua, a3, b, c)
    elif 3 * h > 4 * d:
        # Flat in c: a 2D Hilbert step in the (a, b) plane, c kept whole.
        # Up b2 on the near half of a, across the whole of a on the far half of b, back down b2.
        _fill(out, strides, p, b2, c, a2)
        _fill(out, strides, p + off_b2, a, b3, c)
        _fill(out, strides, p + end_a + off_b2 - ub, (ib, -nb2), c, (ia, -na3))
    elif 3 * d > 4 * h:
        # Flat in b: the same in the (a, c) plane, b kept whole.
        off_c2 = abs(nc2) * uc
        _fill(out, strides, p, c2, a2, b)
        _fill(out, strides, p + off_c2, a, b, c3)
        _fill(out, strides, p + end_a + off_c2 - uc, (ic, -nc2), (ia, -na3), b)
    else:
        # Cube-like box: the eight octants, merged into five boxes.
        end_c = (d - 1) * uc
        _fill(out, strides, p, b2, c2, a2)  # near a, near b, near c
        _fill(out, strides, p + off_b2, c, a2, b3)  # near a, far b, all of c
        _fill(out, strides, p + off_b2 - ub + end_c, a, (ib, -nb2), (ic, -nc3))  # near b, far c, all of a
        _fill(out, strides, p + end_a + off_b2 + end_c, (ic, -nc), (ia, -na3), b3)  # far a, far b, all of c
        _fill(out, strides, p + end_a + off_b2 - ub, (ib, -nb2), c2, (ia, -na3))  # far a, near b, near c


def _check_grid(grid: Any) -> tuple[int, int, int]:
    """``grid`` as a tuple of three positive ints; ValueError naming it otherwise."""
    try:
        items = tuple(grid)
    except TypeError:
        raise ValueError(f"grid={grid!r}: expected three positive ints (T, H, W)") from None
    if len(items) != 3 or any(isinstance(v, bool) for v in items):
        raise ValueError(f"grid={grid!r}: expected three positive ints (T, H, W)")
    try:
        dims = tuple(operator.index(v) for v in items)
    except TypeError:
        raise ValueError(f"grid={grid!r}: expected three positive ints (T, H, W)") from None
    if any(v <= 0 for v in dims):
        raise ValueError(f"grid={grid!r}: every dimension must be positive")
    return dims  # type: ignore[return-value]


@functools.lru_cache(maxsize=64)
def _curve(grid: tuple[int, int, int]) -> torch.Tensor:
    t, h, w = grid
    strides = (h * w, w, 1)
    # Major edge: the longest side; the other two follow in decreasing length.
    order = sorted(range(3), key=lambda i: -grid[i])
    edges = [(i, grid[i]) for i in order]
    out: list[int] = []
    _fill(out, strides, 0, *edges)
    return torch.tensor(out, dtype=torch.int64)


def gilbert_order(grid: tuple[int, int, int]) -> torch.Tensor:
    """The 3D Gilbert curve over ``grid = (T, H, W)`` (any positive sizes).

    Returns a new int64 CPU tensor ``[T*H*W]``: entry ``n`` is the raster index ``t*H*W + h*W + w``
    of the ``n``-th cell on the curve. The curve starts at cell ``(0, 0, 0)`` and runs first along the
    longest side; a side of length 1 reduces it to a 2D or 1D curve. Raises ValueError for a grid that
    is not three positive ints.
    """
    return _curve(_check_grid(grid)).clone()


@functools.lru_cache(maxsize=64)
def _permutation(grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    perm = _curve(grid)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), dtype=torch.int64)
    return perm, inverse


def video_permutation(grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm, inverse)`` for ``grid = (T, H, W)``: int64 CPU tensors ``[T*H*W]``, cached per grid.

    ``perm[n]`` is the raster index of the ``n``-th cell on the Gilbert curve (see ``gilbert_order``),
    ``inverse[perm[n]] == n``. So ``x[..., perm, :]`` is raster-ordered ``x`` in curve order and
    ``y[..., inverse, :]`` undoes it. The tensors are shared by every caller: do not modify them in
    place (clone first). Raises ValueError for a grid that is not three positive ints.
    """
    return _permutation(_check_grid(grid))


@functools.lru_cache(maxsize=64)
def _gather_index(grid: tuple[int, int, int], text_len: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(forward, backward)`` int64 ``[T*H*W + text_len]`` on ``device``: the video permutation
    followed by the identity on the text tokens. Cached per (grid, text_len, device) so a GPU caller
    does not copy the index on every call; shared, never to be modified in place."""
    perm, inverse = _permutation(grid)
    if text_len:
        tail = torch.arange(perm.numel(), perm.numel() + text_len, dtype=torch.int64)
        perm, inverse = torch.cat([perm, tail]), torch.cat([inverse, tail])
    return perm.to(device), inverse.to(device)


def _index_for(x: torch.Tensor, grid: Any, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    dims = _check_grid(grid)
    if x.dim() != 4:
        raise ValueError(f"x has shape {tuple(x.shape)}: expected [B, H, L, D]")
    try:
        if isinstance(text_len, bool):
            raise TypeError
        text_len = operator.index(text_len)
    except TypeError:
        raise ValueError(f"text_len={text_len!r}: expected a non-negative int") from None
    if text_len < 0:
        raise ValueError(f"text_len={text_len!r}: expected a non-negative int")
    length = x.shape[2]
    video = dims[0] * dims[1] * dims[2]
    if length - text_len != video:
        raise ValueError(
            f"grid={dims} holds {video} video tokens but L={length} with text_len={text_len} leaves {length - text_len}"
        )
    return _gather_index(dims, text_len, str(x.device))


def reorder_tokens(x: torch.Tensor, grid: tuple[int, int, int], text_len: int = 0) -> torch.Tensor:
    """Video tokens of ``x`` from raster order into Gilbert-curve order; text tokens stay at the end.

    x: ``[B, H, L, D]`` whose first ``L - text_len`` tokens are the ``T*H*W`` video tokens of
    ``grid = (T, H, W)`` in raster ``(t, h, w)`` order and whose last ``text_len`` tokens are text.
    Returns a new tensor of the same shape (differentiable; one ``index_select`` along dim 2).
    Raises ValueError when ``L - text_len != T*H*W`` or the grid is invalid.
    """
    forward, _ = _index_for(x, grid, text_len)
    return x.index_select(2, forward)


def restore_tokens(x: torch.Tensor, grid: tuple[int, int, int], text_len: int = 0) -> torch.Tensor:
    """The inverse of ``reorder_tokens``: video tokens from curve order back to raster order.

    x: ``[B, H, L, D]`` as returned by ``reorder_tokens`` (text tokens last). Returns a new tensor of
    the same shape; ``restore_tokens(reorder_tokens(x, g, n), g, n)`` equals ``x`` exactly.
    """
    _, backward = _index_for(x, grid, text_len)
    return x.index_select(2, backward)
