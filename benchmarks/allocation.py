"""Budget-mode level allocation: the fused Triton kernel against the PyTorch reference (H100).

    PYTHONPATH=. python3 benchmarks/allocation.py [--density 0.15]

For the Wan2.1-1.3B shape (B=1, H=12, 256x256 blocks) and the CogVideoX shape (B=2, H=48,
17550 video + 226 text tokens, 139x139 blocks, 137 competing KV blocks), block statistics
from ``estimate_pyramid_statistics`` on ``structured_gpu`` inputs, the row budget of
``row_budget(density, ...)``: prints the share of equal levels, the largest row cost over
its budget, the modelled error ``(s + W**2) / (1 - W)**2`` of both maps, and
``triton.testing.do_bench`` medians (ms) of both. ``--sweep 1,2,4`` also times the kernel at
each ``num_warps`` (through the kernel's ``config=`` override of ``blocks_per_warp``), with its equality.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.attention import structured_gpu  # noqa: E402
from psa_diffusers.budget.allocation import (  # noqa: E402
    COST_UNIT,
    OPTIONS,
    allocate_levels_reference,
    allocate_levels_triton,
    error_tables,
    row_budget,
)
from psa_diffusers.budget.allocation.kernel import row_chunks  # noqa: E402
from psa_diffusers.budget.statistics import estimate_pyramid_statistics_reference  # noqa: E402

BLOCK = 128


def modelled_error(stats, levels, n):
    """``(s + W**2) / (1 - W)**2`` per row, from the error tables of ``allocation``."""
    sep, lost = error_tables(stats, n)
    index = torch.zeros_like(levels[..., :n])
    for k, level in enumerate(OPTIONS):
        index[levels[..., :n] == level] = k
    s = sep.gather(-1, index.unsqueeze(-1)).squeeze(-1).sum(-1)
    w = lost.gather(-1, index.unsqueeze(-1)).squeeze(-1).sum(-1)
    return (s + w**2) / (1 - w).clamp(min=1e-6) ** 2


def row_cost(levels, tokens):
    per = torch.where(levels > 0, tokens * COST_UNIT // levels.clamp(min=1), torch.zeros_like(levels))
    return per.sum(-1)


def case(name, q, k, text, density, sweep=()):
    lkv = k.shape[2]
    nk = -(-lkv // BLOCK)
    n = (lkv - text) // BLOCK if text else nk
    stats = estimate_pyramid_statistics_reference(q.float(), k.float(), block_q=BLOCK, block_kv=BLOCK)
    tokens = (lkv - torch.arange(nk, device="cuda") * BLOCK).clamp(max=BLOCK)
    budget = row_budget(density, lkv, lkv - n * BLOCK if text else 0)
    ref = allocate_levels_reference(stats, budget, tokens, num_blocks=n)
    out = allocate_levels_triton(stats, budget, tokens, num_blocks=n)
    cost = row_cost(out[..., :n], tokens[:n])
    best_cost = tokens[:n][stats.mass[..., :n].argmax(-1)] * COST_UNIT
    over = (cost - torch.clamp(best_cost, min=budget)).max().item()
    e_ref, e_out = modelled_error(stats, ref, n), modelled_error(stats, out, n)
    rel = ((e_out.sum() - e_ref.sum()) / e_ref.sum()).item()
    t_ref = triton.testing.do_bench(lambda: allocate_levels_reference(stats, budget, tokens, num_blocks=n))
    t_out = triton.testing.do_bench(lambda: allocate_levels_triton(stats, budget, tokens, num_blocks=n))
    print(
        f"{name}: levels {tuple(out.shape)}, n={n}, budget={budget}: equal {(out == ref).float().mean().item():.6f}, "
        f"rows differing {(out != ref).any(-1).sum().item()}/{out[..., 0].numel()}, "
        f"max cost over budget {over}, modelled error kernel/ref - 1 = {rel:.2e}, "
        f"reference {t_ref:.3f} ms, kernel {t_out:.4f} ms",
        flush=True,
    )
    width = sum(row_chunks(nk))
    for warps in sweep:
        cfg = {"blocks_per_warp": max(1, width // warps)}  # num_warps = width // blocks_per_warp
        alt = allocate_levels_triton(stats, budget, tokens, num_blocks=n, config=cfg)
        t = triton.testing.do_bench(
            lambda cfg=cfg: allocate_levels_triton(stats, budget, tokens, num_blocks=n, config=cfg)
        )
        print(f"  num_warps={warps}: equal {(alt == ref).float().mean().item():.6f}, {t:.4f} ms")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--density", type=float, default=0.15)
    parser.add_argument("--sweep", default="", help="num_warps values to time, e.g. 1,2,4")
    args = parser.parse_args()
    sweep = [int(c) for c in args.sweep.split(",") if c]
    q, k, _ = structured_gpu(21, 30, 52, 12, 128)
    case("wan13", q, k, 0, args.density, sweep)
    del q, k
    q, k, _ = structured_gpu(13, 30, 45, 48, 64, batch=2)
    g = torch.Generator(device="cuda").manual_seed(7)
    text = [2 * torch.randn(2, 48, 226, 64, device="cuda", generator=g).to(q.dtype) for _ in range(2)]
    case("cogx", torch.cat([q, text[0]], 2), torch.cat([k, text[1]], 2), 226, args.density, sweep)


if __name__ == "__main__":
    main()
