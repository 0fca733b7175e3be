"""Tile sizes and launch options of every Triton kernel: one table, keyed by GPU architecture, head dim and dtype.

``KERNEL_CONFIGS[kernel]`` maps ``(arch, head_dim, dtype)`` to a dict of options, where

* ``arch`` is ``"sm90"``-style (``torch.cuda.get_device_capability``), ``"interpreter"`` for
  Triton's CPU interpreter (small tiles: every tile costs the same there), or ``ANY``;
* ``head_dim`` is the largest head dim the entry serves (entries with a smaller bound win);
* ``dtype`` is ``"bfloat16"``, ``"float16"``, ``"float32"`` or ``ANY``.

:func:`kernel_config` picks the entry of the exact architecture before ``ANY``, then the exact
dtype before ``ANY``, then the smallest head-dim bound at least the head dim, and lays an
``override`` dict over it. Every launcher takes such an ``override`` (``config=`` in the public
functions), which is how benchmarks and users tune without touching this table. Where the
figures behind the entries were measured is in docs/kernels.md.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch

from .triton_support import INTERPRETED

ANY = "any"
INTERPRETER = "interpreter"

_TRACE = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
_TRACE_SMALL = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
"""Tiles of the budget variance's trace kernel (``moment_warps``: warps of its block-moment kernels)."""

_STATS_STAGES = {
    "rank_warps": 1,
    "select_warps": 4,
    "exact_warps": 4,
    "exact_pairs": 1,  # tiles of query groups per exact-logit program
    "exact_stages": 1,
    "assemble_warps": 4,
    "pooled_fp32": False,  # pooled means kept in float32 instead of the inputs' dtype
    "split": 0,  # key-tile splits of the pooled pass; 0: automatic
}
"""Options of the budget statistics' later kernels (ranking, selection, exact logits, assembly)."""

_PLAIN = {"DESC": False, "WARP_SPEC": False}
"""Attention entries with pointer loads and no warp specialisation."""

KERNEL_CONFIGS: dict[str, dict[tuple[str, int, str], dict[str, Any]]] = {
    # sparse pyramid attention forward (ops/attention/kernel.py); BLOCK_M is capped at block_q
    # DESC: level-1 tiles through tensor descriptors (TMA; used only where descriptors_apply);
    # WARP_SPEC: that loop warp-specialised
    "attention": {
        (INTERPRETER, 256, ANY): {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1, **_PLAIN},
        ("sm90", 64, ANY): {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3, **_PLAIN},
        ("sm90", 128, ANY): {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "DESC": True,
                             "WARP_SPEC": False},  # fmt: skip
        (ANY, 64, ANY): {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, **_PLAIN},
        (ANY, 128, ANY): {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, **_PLAIN},
        (ANY, 256, ANY): {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, **_PLAIN},
    },
    # sparse pyramid attention backward (ops/attention/backward_kernel.py): ROW_M x ROW_N tiles of the
    # dQ (row) kernel (ROW_N at every level, short pooled blocks packed, as in the forward), COL_N x COL_M
    # of the dK/dV (column) kernel; M capped at block_q, COL_N at one block's rows per level (at least 16)
    "attention_backward": {
        (INTERPRETER, 256, ANY): {"ROW_M": 32, "ROW_N": 32, "COL_M": 32, "COL_N": 32, "row_warps": 4,
                                  "col_warps": 4, "num_stages": 1},  # fmt: skip
        (ANY, 64, ANY): {"ROW_M": 64, "ROW_N": 64, "COL_M": 64, "COL_N": 128, "row_warps": 4, "col_warps": 8,
                         "num_stages": 2},  # fmt: skip
        ("sm90", 128, ANY): {"ROW_M": 128, "ROW_N": 64, "COL_M": 64, "COL_N": 64, "row_warps": 8,
                             "col_warps": 4, "num_stages": 2},  # fmt: skip
        (ANY, 128, ANY): {"ROW_M": 64, "ROW_N": 64, "COL_M": 32, "COL_N": 128, "row_warps": 4, "col_warps": 8,
                          "num_stages": 2},  # fmt: skip
        (ANY, 256, ANY): {"ROW_M": 32, "ROW_N": 32, "COL_M": 32, "COL_N": 64, "row_warps": 4, "col_warps": 4,
                          "num_stages": 1},  # fmt: skip
    },
    # sampled importance (ops/importance/kernel.py); BLOCK_M/BLOCK_N are raised to one block's samples;
    # ONE_PASS: estimate_block_importance_triton's one-pass variant (block sums to scratch, no second QK^T)
    "importance": {
        (INTERPRETER, 256, ANY): {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1, "ONE_PASS": False},
        (ANY, 256, ANY): {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "ONE_PASS": False},
    },
    # every pyramid level of K and V in one pass (ops/pooling/kernel.py); CHUNK tokens per program,
    # a multiple of 8 so that every group of every level lies in one program
    "pooling": {
        (ANY, 128, ANY): {"CHUNK": 64, "num_warps": 4},
        (ANY, 256, ANY): {"CHUNK": 64, "num_warps": 8},
    },
    # one query-block row per program (ops/levels/kernel.py); wider rows get more warps
    "levels": {
        (ANY, 256, ANY): {"num_warps": 4, "wide_num_warps": 8, "wide_above": 512},
    },
    # key smoothness and caps (ops/caps/kernel.py)
    "caps": {
        (ANY, 256, ANY): {"num_warps": 4},
    },
    # budget mode: block moments and logit variance (budget/variance/kernel.py)
    "budget.variance": {
        (INTERPRETER, 256, ANY): {"moment_warps": 4, **_TRACE_SMALL},
        (ANY, 64, ANY): {"moment_warps": 4, **_TRACE},
        (ANY, 256, ANY): {"moment_warps": 8, **_TRACE},
    },
    # budget mode: pooled and refined block statistics (budget/statistics/kernel.py)
    "budget.statistics": {
        (INTERPRETER, 256, ANY): {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1, **_STATS_STAGES},
        (ANY, 64, ANY): {"BLOCK_M": 64, "BLOCK_N": 256, "num_warps": 4, "num_stages": 3, **_STATS_STAGES},
        (ANY, 256, ANY): {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2, **_STATS_STAGES},
    },
    # budget mode: the per-row knapsack (budget/allocation/kernel.py); one warp per this many blocks
    "budget.allocation": {
        (ANY, 256, ANY): {"blocks_per_warp": 256},
    },
}

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


@functools.lru_cache(maxsize=16)
def _cuda_arch(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm{major}{minor}"


def device_arch(device: torch.device | str) -> str:
    """``"interpreter"`` under ``TRITON_INTERPRET=1``, ``"sm90"``-style on CUDA (cached per device), else ``ANY``."""
    if INTERPRETED:
        return INTERPRETER
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())
    return ANY


def kernel_config(
    kernel: str,
    *,
    device: torch.device | str,
    head_dim: int = 0,
    dtype: torch.dtype,
    override: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The options of ``kernel`` for this device, head dim and dtype, with ``override`` laid over them.

    Kernels whose tiles do not depend on the head dim are asked with ``head_dim=0``.
    Raises ValueError for an unknown kernel, or an ``override`` key the entry does not have.
    """
    table = KERNEL_CONFIGS.get(kernel)
    if table is None:
        raise ValueError(f"kernel={kernel!r}: known kernels are {sorted(KERNEL_CONFIGS)}")
    arch = device_arch(device)
    dtype_name = _DTYPE_NAMES.get(dtype, str(dtype))
    best, best_key = None, None
    for key, entry in table.items():
        e_arch, e_dim, e_dtype = key
        if e_arch not in (arch, ANY) or e_dtype not in (dtype_name, ANY) or e_dim < head_dim:
            continue
        rank = (e_arch != arch, e_dtype != dtype_name, e_dim)
        if best_key is None or rank < best_key:
            best, best_key = entry, rank
    if best is None:
        raise ValueError(f"no {kernel!r} kernel configuration for arch={arch}, head_dim={head_dim}, dtype={dtype_name}")
    cfg = dict(best)
    if override:
        unknown = sorted(set(override) - set(cfg))
        if unknown:
            raise ValueError(f"{kernel!r} config override has unknown key(s) {unknown}; known keys are {sorted(cfg)}")
        cfg.update(override)
    return cfg
