"""What the budget mode costs on the GPU, against the quota mode it replaces (issue: level allocation).

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/budget_cost.py [--shapes wan13 cogx] [--out DIR]

For each shape of docs/design.md, section 6 (inputs from ``benchmarks/attention.py``'s ``make_inputs``:
``structured_qkv``, bf16): the quota preset 10/5/0/20 and the budget mode at the same
measured density, timed as whole ``psa_attention`` calls (Triton backend, raster order), the
mask alone, the parts of the budget mask (logit variance, block statistics, allocation), the
sparse kernel alone on each mask, and the error of each against dense attention. Then a
budget-mode density sweep finds the lowest density whose error is at most the quota preset's
and reports its whole-call speed: the speed at equal quality. All times are
``triton.testing.do_bench`` medians in ms; quote ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import bench, make_inputs  # noqa: E402
from structured_qkv import relative_error  # noqa: E402

from psa_diffusers.attention import psa_attention  # noqa: E402
from psa_diffusers.budget import estimate_pyramid_statistics  # noqa: E402
from psa_diffusers.budget.statistics import pooled_stage  # noqa: E402
from psa_diffusers.budget.stats import group_logit_variance  # noqa: E402
from psa_diffusers.budget.variance import pooled_logit_variance_triton  # noqa: E402
from psa_diffusers.config import PSAConfig  # noqa: E402
from psa_diffusers.mask_builder import build_block_mask  # noqa: E402

QUOTA = PSAConfig(mode="quota", budgets=(0.10, 0.05, 0.0, 0.20))
SWEEP = (0.06, 0.07, 0.08, 0.09, 0.10, 0.11, 0.12, 0.13, 0.14, 0.15)


def dense_ms(q, k, v) -> tuple[float, torch.Tensor]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    return bench(run), run()


def floor_mask(q, k, budget: PSAConfig, text_len: int, stats):
    """The budget mask without the refinement: logit variance, group means, pooled pass, allocation.

    What any estimate of this design costs before it computes one exact logit: the bound the
    refinement has to fit under. ``stats`` stands in for the refined statistics (same shapes).
    """
    blocks = dict(block_q=budget.block_q, block_kv=budget.block_kv)
    group = 8  # estimate_pyramid_statistics_triton's default

    def run():
        var = pooled_logit_variance_triton(q, k, **blocks)
        var_g = group_logit_variance(var, group).contiguous()
        pooled_stage(q, k, var_g, **blocks, group=group, scale=q.shape[-1] ** -0.5, config=None)
        return build_block_mask(q, k, budget, text_len=text_len, stats=stats)

    return run


def measure(name: str) -> dict:
    q, k, v, text_len, _grid = make_inputs(name)
    t_dense, ref = dense_ms(q, k, v)
    row: dict = {"shape": name, "BHLD": list(q.shape), "dense_ms": t_dense}

    def whole(cfg):
        return lambda: psa_attention(q, k, v, cfg, text_len=text_len, backend="triton")

    def kernel_only(mask):
        return lambda: psa_attention(q, k, v, mask=mask, backend="triton")

    out_q, mask_q = psa_attention(q, k, v, QUOTA, text_len=text_len, backend="triton", return_mask=True)
    L = q.shape[2]
    d_quota = mask_q.density(L, L)
    budget = PSAConfig(mode="budget", target_density=round(d_quota, 4))
    out_b, mask_b = psa_attention(q, k, v, budget, text_len=text_len, backend="triton", return_mask=True)
    row.update(
        density_quota=d_quota,
        density_budget=mask_b.density(L, L),
        err_quota=relative_error(out_q, ref),
        err_budget=relative_error(out_b, ref),
        whole_quota_ms=bench(whole(QUOTA)),
        whole_budget_ms=bench(whole(budget)),
        mask_quota_ms=bench(lambda: build_block_mask(q, k, QUOTA, text_len=text_len)),
        mask_budget_ms=bench(lambda: build_block_mask(q, k, budget, text_len=text_len)),
        kernel_quota_ms=bench(kernel_only(mask_q)),
        kernel_budget_ms=bench(kernel_only(mask_b)),
    )
    blocks = dict(block_q=budget.block_q, block_kv=budget.block_kv)
    stats = estimate_pyramid_statistics(q, k, **blocks)
    row["stats_ms"] = bench(lambda: estimate_pyramid_statistics(q, k, **blocks))
    row["allocation_ms"] = bench(lambda: build_block_mask(q, k, budget, text_len=text_len, stats=stats))
    row["variance_ms"] = bench(lambda: pooled_logit_variance_triton(q, k, block_q=128, block_kv=128))
    row["floor_ms"] = bench(floor_mask(q, k, budget, text_len, stats))
    # equal quality: the lowest budget density whose error is at most the quota preset's
    sweep = []
    for d in SWEEP:
        cfg = PSAConfig(mode="budget", target_density=d)
        o, m = psa_attention(q, k, v, cfg, text_len=text_len, backend="triton", return_mask=True)
        sweep.append({"target": d, "density": m.density(L, L), "err": relative_error(o, ref)})
    ok = [s for s in sweep if s["err"] <= row["err_quota"]]
    if ok:
        best = min(ok, key=lambda s: s["density"])
        cfg = PSAConfig(mode="budget", target_density=best["target"])
        best["whole_ms"] = bench(whole(cfg))
        row["equal_error"] = best
    row["sweep"] = sweep
    return row


def report(rows: list[dict]) -> None:
    print("\n| shape | density quota / budget | err quota / budget | dense | whole quota | whole budget "
          "| budget/quota whole | mask quota | mask budget (var, stats, alloc) | (mask budget)/dense "
          "| kernel ms per unit density quota / budget |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        kq = r["kernel_quota_ms"] / r["density_quota"]
        kb = r["kernel_budget_ms"] / r["density_budget"]
        print(
            f"| {r['shape']} | {r['density_quota']:.3f} / {r['density_budget']:.3f} "
            f"| {r['err_quota']:.4f} / {r['err_budget']:.4f} | {r['dense_ms']:.2f} | {r['whole_quota_ms']:.3f} "
            f"| {r['whole_budget_ms']:.3f} | {r['whole_budget_ms'] / r['whole_quota_ms']:.3f}x "
            f"| {r['mask_quota_ms']:.3f} | {r['mask_budget_ms']:.3f} ({r['variance_ms']:.3f}, {r['stats_ms']:.3f}, "
            f"{r['allocation_ms']:.3f}) | {100 * r['mask_budget_ms'] / r['dense_ms']:.1f}% "
            f"| {kq:.2f} / {kb:.2f} ({kb / kq - 1:+.1%}) |"
        )
    print("\nEqual error (budget mode at the lowest swept density whose error <= the quota preset's):")
    for r in rows:
        e = r.get("equal_error")
        if e is None:
            print(f"  {r['shape']}: no swept density reached the quota preset's error {r['err_quota']:.4f}")
            continue
        print(
            f"  {r['shape']}: quota density {r['density_quota']:.3f} err {r['err_quota']:.4f} whole "
            f"{r['whole_quota_ms']:.3f} ms | budget density {e['density']:.3f} err {e['err']:.4f} whole "
            f"{e['whole_ms']:.3f} ms -> {r['whole_quota_ms'] / e['whole_ms']:.2f}x faster, "
            f"{r['dense_ms'] / e['whole_ms']:.2f}x dense"
        )
    print("\nFloor: the budget mask without its refinement (variance, group means, pooled pass, allocation):")
    for r in rows:
        print(
            f"  {r['shape']}: {r['floor_ms']:.3f} ms = {100 * r['floor_ms'] / r['dense_ms']:.1f}% of dense "
            f"(whole mask {100 * r['mask_budget_ms'] / r['dense_ms']:.1f}%)"
        )
    for r in rows:
        print(f"  {r['shape']} sweep: " + ", ".join(f"{s['density']:.3f}:{s['err']:.4f}" for s in r["sweep"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=["wan13", "cogx"])
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/budget_cost.py needs a CUDA GPU (it times Triton kernels)")
        return 1
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    rows = [measure(name) for name in args.shapes]
    report(rows)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "budget_cost.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
