"""Prototype: PSA with one far-field token per query row, measured on the head-type battery.

Issue 16 allows "a far-field pooled token per row" if it earns its place. This module keeps the
prototype out of the package (the attention reference and kernel are not changed here):

**What it computes.** For query block ``i`` let ``S_i`` be its skipped *video* KV blocks and
``c_i`` their token count. Besides the pooled tokens of docs/design.md section 1, every query
``r`` of the block sees one extra token with

    key    kfar_i = (sum of the keys of S_i) / c_i         value  vfar_i = (sum of their values) / c_i
    logit  z_far(r) = scale * q_r . kfar_i + ln(c_i) + beta(r)

in the same softmax as the kept tokens. ``beta`` is the *bias rule*:

* ``"mean"``:  ``beta = 0`` (the ``ln c`` bias of an ordinary pooled token; Jensen understates the
  skipped mass by ``exp(-V/2)`` for logit spread ``V``);
* ``"share"``: the far token takes the share ``W_i`` (the estimated skipped mass of the row, from the
  allocation's block statistics) of every query of the block: ``out = (1 - W_i) o_kept + W_i vfar``,
  i.e. ``z_far(r) = lse_kept(r) + ln(W_i / (1 - W_i))``. A kernel has ``lse_kept`` at the end of its
  online softmax, so this needs no key at all, only ``vfar_i`` and ``W_i``;
* ``"exact"``: ``exp(z_far(r))`` equals the exact summed weight of the skipped tokens of query ``r``
  (a ceiling: what a perfectly calibrated far token would give).

An empty ``S_i`` gives no far token. With ``M == 1`` everywhere the output is dense attention.

**The allocation with a far token.** Skipping a block then loses only its detail (its squared
mass), not its mass: the budget allocation's error model with the renormalisation weight set to 0
(``allocate_levels_reference(..., start_loss=0, iterations=1)``), and the binary choice ranks by squared mass.

    python benchmarks/far_field.py                # wan shape, seed 0, both orders (CPU, ~10 min)
    python benchmarks/far_field.py --shapes cogx --seeds 1
    python benchmarks/far_field.py --load a.log b.log --plot docs/img/far_field_battery.png
    python benchmarks/far_field.py --gpu-cost     # H200: epilogue and mask build against dense SDPA
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.head_types import HEAD_TYPES, battery_qkv  # noqa: E402
from benchmarks.quality import (  # noqa: E402
    BATTERY_SHAPES,
    RowEvaluator,
    battery_target,
    binary_blocks_per_row,
    binary_oracle_levels,
    exact_statistics,
)
from psa_diffusers import PSAConfig  # noqa: E402
from psa_diffusers.budget import PyramidStats  # noqa: E402
from psa_diffusers.budget.allocation import allocate_levels_reference, row_budget  # noqa: E402
from psa_diffusers.mask import block_sizes  # noqa: E402
from psa_diffusers.mask_builder import density_statistics  # noqa: E402
from psa_diffusers.ops.importance import estimate_block_importance  # noqa: E402
from psa_diffusers.ops.pooling.reference import pool_tokens  # noqa: E402
from psa_diffusers.ordering import reorder_tokens  # noqa: E402

BIAS_RULES = ("none", "mean", "share", "exact")


def far_field_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    level_map: torch.Tensor,
    *,
    block_q: int,
    block_kv: int,
    num_kv_blocks: int | None = None,
    bias: str = "mean",
    share: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """PSA output ``[B, H, Lq, D]`` (float32) with one far-field token per query block, the obvious way.

    q ``[B, H, Lq, D]``, k/v ``[B, H, Lkv, D]``, level_map ``[B, H, Nq, Nk]``; only the first
    ``num_kv_blocks`` KV blocks (default all) may form the far field. ``bias`` as in the module
    docstring; ``share`` ``[B, H, Nq]`` is the skipped mass ``W_i`` for ``bias="share"``.
    Every pooled token is expanded to a dense logit row (``-inf`` where not seen), then one softmax.
    """
    if bias not in BIAS_RULES:
        raise ValueError(f"bias={bias!r}: expected one of {BIAS_RULES}")
    b, h, lq, d = q.shape
    lkv = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    nk = level_map.shape[-1]
    n = nk if num_kv_blocks is None else num_kv_blocks
    qf, kf, vf = q.float(), k.float(), v.float()
    qrow = torch.arange(lq) // block_q
    logits, values = [], []
    for s in (1, 2, 4, 8):
        kp, counts = pool_tokens(kf, s)
        vp, _ = pool_tokens(vf, s)
        owner = (torch.arange(kp.shape[2]) * s) // block_kv
        z = scale * qf @ kp.transpose(-1, -2) + counts.float().log()
        seen = level_map[:, :, qrow][..., owner] == s  # [B, H, Lq, P]
        logits.append(z.masked_fill(~seen, -math.inf))
        values.append(vp)
    z = torch.cat(logits, -1)
    vals = torch.cat(values, 2)
    if bias == "none":
        return torch.softmax(z, -1) @ vals
    owner1 = torch.arange(lkv) // block_kv
    skipped = (level_map == 0) & (torch.arange(nk) < n)  # [B, H, Nq, Nk]
    tok_skip = skipped[..., owner1].float()  # [B, H, Nq, Lkv]
    count = tok_skip.sum(-1)  # [B, H, Nq]
    has = count > 0
    kfar = (tok_skip @ kf) / count.clamp(min=1)[..., None]  # [B, H, Nq, D]
    vfar = (tok_skip @ vf) / count.clamp(min=1)[..., None]
    kfar_r, vfar_r, count_r, has_r = kfar[:, :, qrow], vfar[:, :, qrow], count[:, :, qrow], has[:, :, qrow]
    if bias == "mean":
        zf = scale * (qf * kfar_r).sum(-1) + count_r.clamp(min=1).log()
    elif bias == "exact":
        z1 = scale * qf @ kf.transpose(-1, -2)
        zf = z1.masked_fill(tok_skip[:, :, qrow] == 0, -math.inf).logsumexp(-1)
    else:
        if share is None:
            raise ValueError("bias='share' needs share")
        w = share.float().clamp(1e-12, 1 - 1e-6)[:, :, qrow]
        zf = z.logsumexp(-1) + (w / (1 - w)).log()
    zf = zf.masked_fill(~has_r, -math.inf)
    p = torch.softmax(torch.cat([z, zf[..., None]], -1), -1)
    return p[..., :-1] @ vals + p[..., -1:] * vfar_r


def far_field_epilogue(
    out: torch.Tensor,
    v: torch.Tensor,
    level_map: torch.Tensor,
    share: torch.Tensor,
    *,
    block_q: int,
    block_kv: int,
    num_kv_blocks: int | None = None,
) -> torch.Tensor:
    """The ``"share"`` far token applied to a PSA output, as a kernel epilogue would: ``[B, H, Lq, D]``.

    out ``[B, H, Lq, D]`` (PSA without far token), v ``[B, H, Lkv, D]``, level_map ``[B, H, Nq, Nk]``,
    share ``[B, H, Nq]`` (``W_i``). Per KV block the value sum ``[B, H, Nk, D]`` (one pass over v), per
    query block the mean value of its skipped blocks (a ``[Nq, Nk] @ [Nk, D]`` product), then
    ``(1 - W_i) out + W_i vfar_i`` for every query of block ``i`` (rows with nothing skipped unchanged).
    """
    b, h, lq, d = out.shape
    lkv = v.shape[2]
    nk = level_map.shape[-1]
    n = nk if num_kv_blocks is None else num_kv_blocks
    pad = nk * block_kv - lkv
    vsum = torch.nn.functional.pad(v.float(), (0, 0, 0, pad)).view(b, h, nk, block_kv, d).sum(3)
    counts = torch.full((nk,), float(block_kv), device=v.device)
    counts[-1] = lkv - (nk - 1) * block_kv
    skipped = ((level_map == 0) & (torch.arange(nk, device=v.device) < n)).float()  # [B, H, Nq, Nk]
    c = skipped @ counts  # [B, H, Nq]
    vfar = (skipped @ vsum) / c.clamp(min=1)[..., None]
    w = torch.where(c > 0, share.float(), torch.zeros_like(share, dtype=torch.float32))
    w = w.repeat_interleave(block_q, -1)[..., :lq, None]
    vfar = vfar.repeat_interleave(block_q, -2)[..., :lq, :]
    return ((1 - w) * out.float() + w * vfar).to(out.dtype)


def gpu_cost(heads: int = 12, grid=(21, 30, 52), dim: int = 128, density: float = 0.15) -> None:
    """H200 check: the far token's epilogue and the density rule's mask build against dense SDPA, bf16."""
    import triton

    from benchmarks.structured_qkv import structured_qkv
    from psa_diffusers import psa_attention
    from psa_diffusers.mask_builder import build_block_mask

    q, k, v = (t.cuda().bfloat16() for t in structured_qkv(*grid, heads=heads, dim=dim, seed=0))
    length = q.shape[2]
    cfg = PSAConfig(mode="density", target_density=density)
    dense = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    mask = build_block_mask(q, k, cfg)
    lm = mask.to_level_map()
    share = torch.rand(lm.shape[:3], device=q.device) * 0.3
    out = psa_attention(q, k, v, mask=mask)
    build = triton.testing.do_bench(lambda: build_block_mask(q, k, cfg))
    call = triton.testing.do_bench(lambda: psa_attention(q, k, v, mask=mask))
    epi = triton.testing.do_bench(lambda: far_field_epilogue(out, v, lm, share, block_q=cfg.block_q,
                                                                block_kv=cfg.block_kv))  # fmt: skip
    print(f"L={length} dense {dense:.3f} ms | density mask {build:.3f} ms = {build / dense:.1%} of dense | "
          f"PSA call {call:.3f} ms at density {mask.density(length, length):.3f} | far-token epilogue (unfused, "
          f"float32 PyTorch) {epi:.3f} ms = {epi / dense:.2%} of dense")  # fmt: skip


class FarFieldEvaluator(RowEvaluator):
    """``RowEvaluator`` whose errors may add a far-field token per row (bias rules of the module docstring)."""

    def __init__(self, q, k, v, *, rows, block_q: int, scale=None):
        super().__init__(q, k, v, rows=rows, block_q=block_q, scale=scale)
        d = q.shape[-1]
        scale = d**-0.5 if scale is None else scale
        tok = (self.rows[:, None] * block_q + torch.arange(block_q)).flatten()
        self.qs = (q[:, :, tok].float() * scale).flatten(0, 1)  # [BH, R*bq, D]
        self.k = k.float().flatten(0, 1)
        self.v = v.float().flatten(0, 1)

    def far_errors(self, level_map, block_kv: int, num_kv_blocks: int, bias: str, share=None):
        """``(squared error, squared reference norm)`` per head ``[B, H]``, with the far token of ``bias``."""
        lm = level_map.flatten(0, 1).long()  # [BH, R, Nk]
        owner = (self.start // block_kv).expand(lm.shape[1], -1)
        owner1 = torch.arange(self.length) // block_kv
        num = torch.empty(lm.shape[0], dtype=torch.float64)
        den = torch.empty_like(num)
        r, bq = lm.shape[1], self.block_q
        for i in range(lm.shape[0]):
            seen = lm[i].gather(1, owner) == self.level  # [R, P]
            z = self.z[i].view(r, bq, -1).masked_fill(~seen[:, None, :], -math.inf)
            skip = ((lm[i] == 0) & (torch.arange(lm.shape[-1]) < num_kv_blocks))[:, owner1].float()  # [R, L]
            count = skip.sum(-1)
            kfar = (skip @ self.k[i]) / count.clamp(min=1)[:, None]  # [R, D]
            vfar = (skip @ self.v[i]) / count.clamp(min=1)[:, None]
            qs = self.qs[i].view(r, bq, -1)
            if bias == "mean":
                zf = (qs * kfar[:, None]).sum(-1) + count.clamp(min=1).log()[:, None]
            elif bias == "exact":
                z1 = self.z[i].view(r, bq, -1)[..., : self.length]
                zf = z1.masked_fill(skip[:, None, :] == 0, -math.inf).logsumexp(-1)
            else:
                w = share.flatten(0, 1)[i].float().clamp(1e-12, 1 - 1e-6)[:, None]
                zf = z.logsumexp(-1) + (w / (1 - w)).log()
            zf = zf.masked_fill((count == 0)[:, None], -math.inf)
            p = torch.softmax(torch.cat([z, zf[..., None]], -1), -1)
            out = p[..., :-1] @ self.vcat[i] + p[..., -1:] * vfar[:, None]
            ref = self.dense[i].view(r, bq, -1)
            num[i] = (out - ref).double().square().sum()
            den[i] = ref.double().square().sum()
        return num.view(self.shape), den.view(self.shape)


def skipped_share(stats: PyramidStats, level_map: torch.Tensor, rows, num_kv_blocks: int) -> torch.Tensor:
    """``W_i`` ``[B, H, R]``: the normalised estimated mass of the skipped video blocks of ``level_map``
    ``[B, H, R, Nk]``, whose rows are the query blocks ``rows`` of ``stats``."""
    mass = stats.mass[:, :, rows].float()
    mass = mass / mass.sum(-1, keepdim=True).clamp(min=1e-30)
    skip = (level_map == 0) & (torch.arange(mass.shape[-1]) < num_kv_blocks)
    return (mass * skip).sum(-1)


def allocations(stats: PyramidStats, *, density: float, length: int, text_len: int, bkv: int, nkv: int, far: bool):
    """Level map ``[B, H, Nq, Nk]`` (text KV columns level 1) at ``density`` from ``stats``.

    ``far``: the detail-only error model (a far token recovers the skipped mass).
    """
    tokens = block_sizes(length, bkv, stats.mass.shape[-1], stats.mass.device).to(torch.int64)
    budget = row_budget(density, length, max(0, length - nkv * bkv))
    kw = dict(start_loss=0.0, iterations=1) if far else {}
    lm = allocate_levels_reference(stats, budget, tokens, num_blocks=nkv, **kw)
    lm[..., nkv:] = 1
    return lm


MAPS = (
    "binary-oracle", "binary-sqmass", "binary-est-sq", "binary-est-mass", "binary-pub-mass",
    "alloc-exact", "alloc-exact-far", "alloc-est", "alloc-est-far", "alloc-est-far-v4", "alloc-est-far-v16",
    "alloc-est4-far",
)  # fmt: skip
"""Level maps compared: binary by exact mass (the oracle), exact squared mass, the density rule's estimated
squared mass or mass, the published stride-8 mass; the budget allocation on exact or estimated statistics,
with its usual error model or the far token's detail-only one; ``-vN``: the estimated pooling blur times N;
``est4``: the density rule's estimate at query stride 4 (keys every 2nd; 4x the sampled products)."""


def run(shape: str, seed: int, densities, orders, heads_per_kind: int, row_step: int, maps=MAPS, biases=BIAS_RULES,
        log=print):  # fmt: skip
    grid, dim, text_len = BATTERY_SHAPES[shape]
    kinds = [kd for kd in HEAD_TYPES if kd != "text" or text_len]
    q, k, v, labels = battery_qkv(grid, dim, seed=seed, kinds=kinds, heads_per_kind=heads_per_kind, text_len=text_len)
    length, bq, bkv = q.shape[2], 128, 128
    nkv = (length - text_len) // bkv if text_len else -(-length // bkv)
    rows_out = []
    for order in orders:
        qo, ko, vo = (reorder_tokens(t, grid, text_len) for t in (q, k, v)) if order == "gilbert" else (q, k, v)
        n_rows = (length - text_len) // bq
        ev = FarFieldEvaluator(qo, ko, vo, rows=range(row_step // 2, n_rows, row_step), block_q=bq)
        rows = ev.rows
        exact = exact_statistics(qo, ko, bq, bkv)
        cfg = PSAConfig(block_q=bq, block_kv=bkv, token_order="none", mode="density", target_density=0.1)
        est = density_statistics(qo, ko, cfg, num_kv_blocks=nkv, text_len=text_len, backend="reference")
        mass_exact = ev.exact_mass(bkv)
        pub = estimate_block_importance(qo, ko, block_q=bq, block_kv=bkv, backend="reference")
        pub_stats = PyramidStats(pub, pub, exact.logit_var)
        for dens in densities:
            per_row = binary_blocks_per_row(dens, length, length, text_len, bq, bkv)
            per = torch.full(q.shape[:2], per_row, dtype=torch.float64)
            lm_orc = binary_oracle_levels(mass_exact, rows, per, nkv)
            alloc = dict(density=dens, length=length, text_len=text_len, bkv=bkv, nkv=nkv)
            onum, oden = ev.errors(lm_orc, bkv)
            for name in maps:
                if name.startswith("binary-"):
                    st, ranking = {
                        "binary-oracle": (exact, None), "binary-sqmass": (exact, exact.sq_mass),
                        "binary-est-sq": (est, est.sq_mass), "binary-est-mass": (est, est.mass),
                        "binary-pub-mass": (pub_stats, pub),
                    }[name]  # fmt: skip
                    lm = lm_orc if ranking is None else binary_oracle_levels(ranking[:, :, rows], rows, per, nkv)
                else:
                    st = exact if name.startswith("alloc-exact") else est
                    if name.startswith("alloc-est4"):
                        st = density_statistics(qo, ko, cfg.replace(importance_stride=4), num_kv_blocks=nkv,
                                                text_len=text_len, backend="reference")  # fmt: skip
                    blur = {"alloc-est-far-v4": 4.0, "alloc-est-far-v16": 16.0}.get(name, 1.0)
                    alloc_stats = st._replace(logit_var=blur * st.logit_var)
                    lm = allocations(alloc_stats, far=name.endswith("far") or blur > 1, **alloc)[:, :, rows]
                share = skipped_share(st, lm, rows, nkv)
                for bias in biases:
                    if bias == "none":
                        num, den = ev.errors(lm, bkv)
                    else:
                        num, den = ev.far_errors(lm, bkv, nkv, bias, share=share)
                    for kind in dict.fromkeys(labels):
                        sel = torch.tensor([lab == kind for lab in labels])
                        err = (num[:, sel].sum() / den[:, sel].sum()).sqrt().item()
                        orc = (onum[:, sel].sum() / oden[:, sel].sum()).sqrt().item()
                        rec = (shape, seed, order, kind, name, bias, dens, err, orc, err / orc)
                        rows_out.append(rec)
                        log(f"{shape:<5} {seed} {order:<8} {kind:<9} {name:<16} {bias:<6} {dens:6.3f} "
                            f"{err:8.4f} {orc:8.4f} {err / orc:6.2f}")  # fmt: skip
    return rows_out


def summary(records) -> list[str]:
    """Per (level map, bias) and head type: worst ratio to the binary oracle and the misses."""
    kinds = list(dict.fromkeys(r[3] for r in records))
    keys = list(dict.fromkeys((r[4], r[5]) for r in records))
    lines = ["| level map | far token | " + " | ".join(kinds) + " | misses |", "|---" * (len(kinds) + 3) + "|"]
    for name, bias in keys:
        cells, miss, total = [], 0, 0
        for kind in kinds:
            sel = [r for r in records if r[4] == name and r[5] == bias and r[3] == kind]
            cells.append(f"{max(r[9] for r in sel):.2f}" if sel else "--")
            miss += sum(r[9] > battery_target(r[6]) for r in sel)
            total += len(sel)
        lines.append(f"| {name} | {bias} | " + " | ".join(cells) + f" | {miss}/{total} |")
    return lines


def load_log(path: Path) -> list[tuple]:
    """The records printed by an earlier run (its stdout)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        f = line.split()
        if len(f) == 10 and f[0] in BATTERY_SHAPES and f[1].isdigit():
            out.append((f[0], int(f[1]), f[2], f[3], f[4], f[5], *(float(x) for x in f[6:])))
    return out


def plot(records, path: Path, series) -> None:
    """Worst ratio to the binary oracle per head type for each ``(level map, bias)`` of ``series``, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [kd for kd in HEAD_TYPES if any(r[3] == kd for r in records)]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(series)
    for n, (name, bias, label) in enumerate(series):
        worst = [max([r[9] for r in records if r[4] == name and r[5] == bias and r[3] == kd] or [float("nan")])
                 for kd in kinds]  # fmt: skip
        x = [i + (n - (len(series) - 1) / 2) * width for i in range(len(kinds))]
        ax.bar(x, worst, width * 0.9, color=f"C{n}", label=label)
    ax.axhline(0.8, color="k", ls="--", lw=1, label="target 0.8 (1.0 at density 0.05)")
    ax.set_xticks(range(len(kinds)), kinds, rotation=30)
    ax.set_yscale("log")
    ax.set_ylabel("worst error / binary-oracle error")
    ax.set_title("Far-field token on the head-type battery (densities 0.05-0.3, both orders)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


PLOT_SERIES = (
    ("binary-oracle", "share", "binary oracle + far token"),
    ("alloc-est-far", "none", "allocation (density-rule estimate), no far token"),
    ("alloc-est-far", "share", "allocation (density-rule estimate) + far token"),
    ("alloc-exact-far", "none", "allocation (exact statistics), no far token"),
    ("alloc-exact-far", "share", "allocation (exact statistics) + far token"),
)
"""The series of the documentation plot: ``(level map, bias rule, label)``."""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["wan"], choices=list(BATTERY_SHAPES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--densities", nargs="+", type=float, default=[0.05, 0.1, 0.2, 0.3])
    ap.add_argument("--orders", nargs="+", default=["gilbert", "none"])
    ap.add_argument("--heads-per-kind", type=int, default=1)
    ap.add_argument("--row-step", type=int, default=4)
    ap.add_argument("--maps", nargs="+", default=list(MAPS), choices=MAPS)
    ap.add_argument("--biases", nargs="+", default=list(BIAS_RULES), choices=BIAS_RULES)
    ap.add_argument("--load", nargs="+", type=Path, default=[], help="summarise earlier runs' logs instead of running")
    ap.add_argument("--plot", type=Path, default=None, help="write the worst-ratio bar plot here (PNG)")
    ap.add_argument("--gpu-cost", action="store_true", help="time the far token's epilogue and the mask on CUDA")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    if args.gpu_cost:
        gpu_cost()
        return 0
    records = [r for path in args.load for r in load_log(path)]
    for shape in args.shapes if not args.load else []:
        for seed in args.seeds:
            records += run(
                shape, seed, args.densities, args.orders, args.heads_per_kind, args.row_step, args.maps, args.biases
            )  # fmt: skip
    print("\n".join(summary(records)))
    if args.plot:
        plot(records, args.plot, PLOT_SERIES)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
