"""Causal PSA against causal dense attention (cuDNN / flash SDPA) on one GPU, at 32k and 128k tokens.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/causal.py [--lengths 32768 131072] [--density 0.15]

For each length: structured video-like q, k, v (``structured_qkv``, bf16, 28 heads of dim 128, the
shape of Qwen2.5-VL-7B's language model after GQA expansion), the causal level map of
``build_causal_block_mask`` with the quota share chosen by bisection so that the map's density is the
target share of the causal work (``ops.levels.causal_density``), then the times (``do_bench`` medians,
ms) of: causal SDPA on the cuDNN and flash backends, the mask build and its two launches (the
importance estimate of the past blocks, ``mask_importance``; the one-launch causal levels kernel,
``mask_levels``), for comparison the full estimate (``mask_importance_full``) and the PyTorch level
rule (``mask_levels_torch``), the sparse kernel alone, and the whole ``psa_attention(causal=True)``
call; the speed-ups against the faster dense backend, and the relative L2 error of PSA's output
against dense causal attention. One JSON line per length at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from structured_qkv import relative_error, structured_qkv  # noqa: E402

from psa_diffusers.attention import psa_attention  # noqa: E402
from psa_diffusers.config import PSAConfig  # noqa: E402
from psa_diffusers.mask_builder import build_causal_block_mask  # noqa: E402
from psa_diffusers.ops.attention import sparse_attention  # noqa: E402
from psa_diffusers.ops.importance import estimate_block_importance  # noqa: E402
from psa_diffusers.ops.levels import (  # noqa: E402
    RECENT_TOKENS,
    SINK_TOKENS,
    causal_density,
    causal_levels,
    causal_levels_reference,
)


def qkv_of_length(length: int, heads: int, dim: int):
    """Video-like tokens: a (T, 32, 32) grid of ``length`` tokens (T = length / 1024), bf16 on CUDA."""
    q, k, v = structured_qkv(length // 1024, 32, 32, heads=heads, dim=dim, seed=0, dtype=torch.bfloat16)
    return q.cuda(), k.cuda(), v.cuda()


def config_at(share: float) -> PSAConfig:
    """Quota shares (share, share, share, 2 share) of each row's competing past blocks."""
    return PSAConfig(block_q=128, block_kv=128, mode="quota", budgets=(share, share, share, 2 * share),
                     min_full_share=0.0)  # fmt: skip


def mask_at_density(q, k, target: float, sink: int, recent: int):
    """Bisect the quota share until the causal density of the mask is within 0.005 of ``target``."""
    lo, hi, best = 0.0, 0.25, None
    for _ in range(14):
        share = (lo + hi) / 2
        mask = build_causal_block_mask(q, k, config_at(share), sink_tokens=sink, recent_tokens=recent)
        density = causal_density(mask, q.shape[2]).mean().item()
        best = (mask, density, share)
        if abs(density - target) < 0.005:
            break
        lo, hi = (share, hi) if density < target else (lo, share)
    return best


def bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50)


def run(length: int, target: float, heads: int, dim: int, sink: int, recent: int) -> dict:
    q, k, v = qkv_of_length(length, heads, dim)
    mask, density, share = mask_at_density(q, k, target, sink, recent)
    times = {}
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        times["dense_cudnn"] = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        times["dense_flash"] = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        dense = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    config = config_at(share)
    times["mask_build"] = bench(lambda: build_causal_block_mask(q, k, config, sink_tokens=sink, recent_tokens=recent))
    estimate = dict(block_q=128, block_kv=128, stride=config.importance_stride, backend="triton")
    times["mask_importance"] = bench(lambda: estimate_block_importance(q, k, past_only=True, **estimate))
    times["mask_importance_full"] = bench(lambda: estimate_block_importance(q, k, **estimate))
    imp = estimate_block_importance(q, k, past_only=True, **estimate)
    rule = dict(length=length, sink_tokens=sink, recent_tokens=recent)
    times["mask_levels"] = bench(lambda: causal_levels(imp, config, backend="triton", **rule))
    times["mask_levels_torch"] = bench(lambda: causal_levels_reference(imp, config, **rule))
    times["psa_kernel"] = bench(lambda: sparse_attention(q, k, v, mask, backend="triton", causal=True))
    times["psa_call"] = bench(lambda: psa_attention(q, k, v, config, causal=True, sink_tokens=sink,
                                                    recent_tokens=recent, backend="triton"))  # fmt: skip
    out = sparse_attention(q, k, v, mask, backend="triton", causal=True)
    best_dense = min(times["dense_cudnn"], times["dense_flash"])
    return {
        "length": length, "heads": heads, "dim": dim, "quota_share": round(share, 5),
        "causal_density": round(density, 4), "times_ms": {n: round(t, 3) for n, t in times.items()},
        "speedup_kernel": round(best_dense / times["psa_kernel"], 2),
        "speedup_call": round(best_dense / times["psa_call"], 2),
        "rel_l2_error": round(relative_error(out, dense), 5),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--density", type=float, default=0.15, help="target share of the causal work")
    parser.add_argument("--heads", type=int, default=28)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--sink-tokens", type=int, default=SINK_TOKENS)
    parser.add_argument("--recent-tokens", type=int, default=RECENT_TOKENS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/causal.py needs a CUDA device")
    rows = []
    for length in args.lengths:
        row = run(length, args.density, args.heads, args.dim, args.sink_tokens, args.recent_tokens)
        t = row["times_ms"]
        print(f"L={length}: density {row['causal_density']:.3f} of causal work | cuDNN {t['dense_cudnn']:.2f} ms, "
              f"flash {t['dense_flash']:.2f} ms | PSA kernel {t['psa_kernel']:.2f} ms "
              f"(x{row['speedup_kernel']}), mask {t['mask_build']:.2f} ms (importance "
              f"{t['mask_importance']:.3f}, full {t['mask_importance_full']:.3f}; levels {t['mask_levels']:.3f}, "
              f"torch rule {t['mask_levels_torch']:.3f}), call {t['psa_call']:.2f} ms "
              f"(x{row['speedup_call']}) | rel. L2 error {row['rel_l2_error']:.4f}", flush=True)  # fmt: skip
        rows.append(row)
        torch.cuda.empty_cache()
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
