"""Self-check: PSA's density and error against dense attention on structured_qkv inputs (any device).

    python benchmarks/selfcheck.py [--grid 8 24 24] [--heads 2] [--dim 64]

Prints one row per budget: FLOP density, PSA's relative error against dense
attention, and the error of binary block-sparse attention (level 1 or skipped)
chosen by the same importance at the same density, for comparison.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.structured_qkv import relative_error, structured_qkv  # noqa: E402
from psa_diffusers import PSAConfig, PyramidBlockMask, psa_attention  # noqa: E402
from psa_diffusers.ops.importance import estimate_block_importance  # noqa: E402

BUDGETS = [
    ("quota", (0.05, 0.05, 0.05, 0.10)),
    ("quota", (0.10, 0.05, 0.00, 0.20)),
    ("quota", (0.05, 0.10, 0.10, 0.25)),
    ("quota", (0.20, 0.10, 0.10, 0.20)),
    ("mass", (0.5, 0.6, 0.7, 0.8)),
    ("mass", (0.7, 0.8, 0.9, 0.95)),
]


def binary_mask_at_density(importance: torch.Tensor, density: float, cfg: PSAConfig) -> PyramidBlockMask:
    """Keep the top blocks of each row at level 1, as many as the density allows."""
    nk = importance.shape[-1]
    keep = max(1, round(density * nk))
    top = importance.topk(keep, dim=-1).indices
    lm = torch.zeros(importance.shape, dtype=torch.int64, device=importance.device).scatter_(-1, top, 1)
    return PyramidBlockMask.from_level_map(lm, block_q=cfg.block_q, block_kv=cfg.block_kv)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=int, nargs=3, default=(6, 16, 24), metavar=("T", "H", "W"))
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    grid = tuple(args.grid)
    q, k, v = (t.to(device) for t in structured_qkv(*grid, heads=args.heads, dim=args.dim, seed=args.seed, dtype=dtype))
    length = q.shape[2]
    dense = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    print(f"structured_qkv grid {grid} (L={length}), heads {args.heads}, dim {args.dim}, {device}, {dtype}")
    print(f"{'mode':<6} {'budgets':<26} {'order':<8} {'density':>8} {'PSA err':>8} {'binary err':>10} {'sec':>6}")
    for order in ("none", "gilbert"):
        for mode, budgets in BUDGETS:
            cfg = PSAConfig(block_q=64, block_kv=64, mode=mode, budgets=budgets, token_order=order)
            t0 = time.perf_counter()
            out, mask = psa_attention(q, k, v, cfg, grid=grid, return_mask=True)
            secs = time.perf_counter() - t0
            density = mask.density(length, length)
            err = relative_error(out, dense)
            # binary block-sparse at the same density, blocks by the same importance, same token order
            from psa_diffusers.ordering import reorder_tokens, restore_tokens

            qr, kr, vr = (reorder_tokens(t, grid) if order == "gilbert" else t for t in (q, k, v))
            binary = binary_mask_at_density(
                estimate_block_importance(
                    qr, kr, block_q=cfg.block_q, block_kv=cfg.block_kv, stride=cfg.importance_stride
                ),
                density,
                cfg,
            )
            out_b = psa_attention(qr, kr, vr, mask=binary)
            if order == "gilbert":
                out_b = restore_tokens(out_b, grid)
            err_b = relative_error(out_b, dense)
            print(f"{mode:<6} {str(budgets):<26} {order:<8} {density:8.3f} {err:8.4f} {err_b:10.4f} {secs:6.2f}")
    full = PSAConfig(block_q=64, block_kv=64, budgets=(1.0, 0.0, 0.0, 0.0))
    err_full = relative_error(psa_attention(q, k, v, full), dense)
    print(f"full budget (every block level 1): error {err_full:.2e} against dense attention")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
