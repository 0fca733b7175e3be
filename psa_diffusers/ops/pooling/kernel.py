"""Every pyramid level of K and V in one pass (Triton).

Same math as :func:`.reference.pool_tokens`: the mean of each group
of ``s`` consecutive tokens aligned at multiples of ``s``, over real tokens only
(the last group may be short), summed in float32 and stored in the input dtype.

Layout: the pooled levels 2, 4, 8 of one tensor live in one buffer
``[B*H, L2 + L4 + L8, D]`` (``Ls = ceil(L / s)``); level ``s`` starts at row
``level_offsets(L)[s]``. The attention kernel reads that buffer; level 1 is the
input itself.
"""

from __future__ import annotations

import torch

from ...config import POOLED_LEVELS
from .. import triton_support
from ..kernel_configs import kernel_config
from ..triton_support import (
    HAS_TRITON,
    cdiv,
    check_supported,
    last_dim_contiguous,
    next_power_of_2,
    tl,
    triton,
)


def level_offsets(seq_len: int) -> dict[int, int]:
    """Row where each pooled level starts in the concatenated buffer, plus ``"total"`` rows."""
    out, row = {}, 0
    for s in POOLED_LEVELS:
        out[s] = row
        row += cdiv(seq_len, s)
    out["total"] = row  # type: ignore[index]
    return out


if HAS_TRITON:

    @triton.jit
    def pool_level_tile(
        X, Y, sxn, syn, n0, L, OFF, offs_d, dmask, S: tl.constexpr, G: tl.constexpr, BLOCK_D: tl.constexpr
    ):
        """Groups ``n0/S .. n0/S + G`` of factor S: S strided row loads (no reshapes), fp32 sum, mean."""
        g = n0 // S + tl.arange(0, G)
        acc = tl.zeros([G, BLOCK_D], dtype=tl.float32)
        for j in tl.static_range(S):
            rows = g * S + j
            x = tl.load(X + rows[:, None] * sxn + offs_d[None, :], mask=(rows < L)[:, None] & dmask[None, :], other=0.0)
            acc += x.to(tl.float32)
        count = tl.minimum(L - g * S, S)
        mean = acc / tl.maximum(count, 1).to(tl.float32)[:, None]
        tl.store(Y + (OFF + g)[:, None] * syn + offs_d[None, :], mean.to(Y.dtype.element_ty),
                 mask=(count > 0)[:, None] & dmask[None, :])  # fmt: skip

    @triton.jit
    def _pool_one(X, Y, sxn, syn, n0, L, OFF2, OFF4, OFF8, offs_d, dmask, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
        pool_level_tile(X, Y, sxn, syn, n0, L, OFF2, offs_d, dmask, 2, CHUNK // 2, BLOCK_D)
        pool_level_tile(X, Y, sxn, syn, n0, L, OFF4, offs_d, dmask, 4, CHUNK // 4, BLOCK_D)
        pool_level_tile(X, Y, sxn, syn, n0, L, OFF8, offs_d, dmask, 8, CHUNK // 8, BLOCK_D)

    @triton.jit
    def _pool_pyramid_kernel(
        X0, Y0, X1, Y1,
        sx0b, sx0h, sx0n, sx1b, sx1h, sx1n,
        sy_bh, syn,
        H, BH0, L, OFF2, OFF4, OFF8,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, TWO: tl.constexpr,
    ):  # fmt: skip
        """Program (chunk, b*H + h - BH0): pools CHUNK tokens of X0 (and X1 when TWO) into every level.

        Y0/Y1: ``[chunk of B*H, L2+L4+L8, D]``, written at row ``b*H + h - BH0``.
        """
        pid_n = tl.program_id(0)
        local_bh = tl.program_id(1)
        pid_bh = BH0 + local_bh
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        n0 = pid_n * CHUNK
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HEAD_DIM
        y_off = local_bh.to(tl.int64) * sy_bh
        _pool_one(X0 + b * sx0b + h * sx0h, Y0 + y_off, sx0n, syn, n0, L, OFF2, OFF4, OFF8,
                  offs_d, dmask, CHUNK, BLOCK_D)  # fmt: skip
        if TWO:
            _pool_one(X1 + b * sx1b + h * sx1h, Y1 + y_off, sx1n, syn, n0, L, OFF2, OFF4, OFF8,
                      offs_d, dmask, CHUNK, BLOCK_D)  # fmt: skip


def launch_pool(
    xs: list[torch.Tensor], bh0: int = 0, nbh: int | None = None, config: dict | None = None
) -> list[torch.Tensor]:
    """Launcher: pooled buffers ``[nbh, L2+L4+L8, D]`` of the flattened (b, h) slices ``bh0 .. bh0+nbh``.

    One launch for one or two tensors of equal shape (K and V); ``nbh`` defaults to all ``B*H``;
    ``config`` overrides the ``"pooling"`` entry of the kernel configuration table.
    """
    xs = [last_dim_contiguous(x) for x in xs]
    b, h, length, d = xs[0].shape
    nbh = b * h - bh0 if nbh is None else nbh
    offs = level_offsets(length)
    ys = [triton_support.new_output((nbh, offs["total"], d), dtype=x.dtype, device=x.device) for x in xs]
    two = len(xs) == 2
    x1, y1 = (xs[1], ys[1]) if two else (xs[0], ys[0])
    block_d = next_power_of_2(d)
    cfg = kernel_config("pooling", device=xs[0].device, head_dim=d, dtype=xs[0].dtype, override=config)
    if cfg["CHUNK"] % 8:
        raise ValueError(f"pooling CHUNK={cfg['CHUNK']} must be a multiple of 8")
    grid = (cdiv(length, cfg["CHUNK"]), nbh)
    _pool_pyramid_kernel[grid](
        xs[0], ys[0], x1, y1,
        xs[0].stride(0), xs[0].stride(1), xs[0].stride(2), x1.stride(0), x1.stride(1), x1.stride(2),
        ys[0].stride(0), ys[0].stride(1),
        h, bh0, length, offs[2], offs[4], offs[8],
        HEAD_DIM=d, BLOCK_D=block_d, CHUNK=cfg["CHUNK"], TWO=two, num_warps=cfg["num_warps"],
    )  # fmt: skip
    return ys


def pool_kv_triton(
    k: torch.Tensor, v: torch.Tensor, bh0: int = 0, nbh: int | None = None, *, config: dict | None = None
):
    """Pooled buffers of K and V ``[nbh, L2+L4+L8, D]`` (levels 2, 4, 8, see :func:`level_offsets`), one launch."""
    check_supported(k, v, names=("k", "v"))
    kp, vp = launch_pool([k, v], bh0, nbh, config)
    return kp, vp


def _counts(length: int, s: int, device) -> torch.Tensor:
    groups = cdiv(length, s)
    counts = torch.full((groups,), s, dtype=torch.int64, device=device)
    counts[-1] = length - (groups - 1) * s
    return counts


def pool_pyramid_triton(x: torch.Tensor, *, config: dict | None = None) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Every pyramid level of ``x`` ``[B, H, L, D]``: ``{factor: (pooled, counts)}`` for 1, 2, 4, 8.

    Same convention as :func:`.reference.pool_pyramid_reference`: level 1 is
    ``x`` itself; ``pooled`` is ``[B, H, ceil(L/s), D]`` in x's dtype (a view
    into one buffer holding all levels), ``counts`` int64 ``[ceil(L/s)]``.
    """
    check_supported(x, names=("x",))
    (buf,) = launch_pool([x], config=config)
    b, h, length, d = x.shape
    buf = buf.view(b, h, -1, d)
    offs = level_offsets(length)
    out = {1: (x, torch.ones(length, dtype=torch.int64, device=x.device))}
    for s in POOLED_LEVELS:
        out[s] = (buf[:, :, offs[s] : offs[s] + cdiv(length, s)], _counts(length, s, x.device))
    return out
