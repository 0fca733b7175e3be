"""Speed of the PSA Triton kernels against cuDNN dense attention and binary FlexAttention (H100).

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/attention.py [--quick] [--sweep-configs] [--out DIR]

Prints, from one run: a tile-config sweep of the sparse kernel (optional), one
table per shape of docs/design.md, section 6 (dense cuDNN, binary flex_attention at the same
FLOP density, the PSA kernel, its parts, the whole call, ratios, errors against
dense, peak memory), a density sweep 0.05..0.5 on the Wan2.1-1.3B shape with a
fitted line, and the share of importance+mask in dense time. Masks are built
here from the Triton importance estimate (quota levels by per-row rank), so the
benchmark does not depend on the mask builder; when
``psa_diffusers.attention.psa_attention`` exists its whole call is timed too.
All times are ``triton.testing.do_bench`` medians in ms; quote ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from structured_qkv import relative_error, structured_qkv  # noqa: E402

from psa_diffusers.config import PSAConfig  # noqa: E402
from psa_diffusers.mask import PyramidBlockMask  # noqa: E402
from psa_diffusers.ops.attention import launch_attention, psa_attention_triton  # noqa: E402
from psa_diffusers.ops.caps import similarity_caps_reference, similarity_caps_triton  # noqa: E402
from psa_diffusers.ops.importance import estimate_block_importance_triton  # noqa: E402
from psa_diffusers.ops.levels import build_mask_triton  # noqa: E402
from psa_diffusers.ops.pooling import pool_kv_triton  # noqa: E402

LOG: list[str] = []


def say(*parts) -> None:
    line = " ".join(str(p) for p in parts)
    print(line, flush=True)
    LOG.append(line)


def bench(fn, rep: int = 100) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))


# ----------------------------------------------------------------------------- inputs
def structured_gpu(frames, height, width, heads, dim, *, seed=0, batch=1, logit_scale=10.0, noise=0.3):
    """The structured_qkv recipe drawn on the GPU (float32): for shapes too large to draw on the CPU quickly."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    t, y, x = torch.meshgrid(
        torch.arange(frames, device="cuda"), torch.arange(height, device="cuda"),
        torch.arange(width, device="cuda"), indexing="ij",
    )  # fmt: skip
    pos = torch.stack([t, y, x], dim=-1).reshape(-1, 3).float()
    length = pos.shape[0]
    out = [], [], []
    for _ in range(batch):
        ls = torch.empty(heads, device="cuda").uniform_(2.0, 6.0, generator=g)
        omega = torch.randn(heads, 3, dim, device="cuda", generator=g) / ls[:, None, None]
        phase = torch.rand(heads, 1, dim, device="cuda", generator=g) * 2 * math.pi
        feat = torch.cos(pos[None] @ omega + phase) * math.sqrt(2.0 / dim)
        amp = math.sqrt(logit_scale * math.sqrt(dim))
        out[0].append(amp * (feat + noise * torch.randn(heads, length, dim, device="cuda", generator=g) / dim**0.5))
        out[1].append(amp * (feat + noise * torch.randn(heads, length, dim, device="cuda", generator=g) / dim**0.5))
        out[2].append(torch.randn(heads, length, dim, device="cuda", generator=g))
    return tuple(torch.stack(o).to(torch.bfloat16) for o in out)


def make_inputs(name: str):
    """q, k, v bf16 on the GPU, text_len, grid."""
    if name == "wan13":
        q, k, v = structured_qkv(21, 30, 52, heads=12, dim=128, seed=0)
        return q.cuda(), k.cuda(), v.cuda(), 0, (21, 30, 52)
    if name == "cogx":  # B=2 (classifier-free guidance), 17550 video tokens + 226 text tokens (last)
        parts = [structured_qkv(13, 30, 45, heads=48, dim=64, seed=s) for s in (0, 1)]
        g = torch.Generator().manual_seed(7)
        text = [torch.randn(2, 48, 226, 64, generator=g).mul(2.0).to(torch.bfloat16) for _ in range(3)]
        qkv = [torch.cat([torch.cat([parts[0][i], parts[1][i]], 0), text[i]], 2).cuda() for i in range(3)]
        return (*qkv, 226, (13, 30, 45))
    if name == "wan720":  # Wan2.1-1.3B at 1280x720, 81 frames
        q, k, v = structured_gpu(21, 45, 80, 12, 128, seed=0)
        return q, k, v, 0, (21, 45, 80)
    if name == "wan14":
        q, k, v = structured_gpu(21, 45, 80, 40, 128, seed=0)
        return q, k, v, 0, (21, 45, 80)
    raise ValueError(name)


# ----------------------------------------------------------------------------- masks
def quota_level_map(importance, fracs, *, text_q_from=None, text_kv_from=None, min_full_share=0.06):
    """Level map from per-row ranks of the importance (PyTorch ops): shares ``fracs`` of the video blocks at
    levels 1, 2, 4, 8 (the best block always at 1); text KV blocks and text query rows at level 1.
    The same rule as ``mask_builder`` (quota mode), written here so the benchmark does not depend on it."""
    b, h, nq, nk = importance.shape
    n = nk if text_kv_from is None else text_kv_from
    order = importance[..., :n].argsort(dim=-1, descending=True, stable=True)
    n_full = max(round(fracs[0] * n), math.ceil(min_full_share * n), 1)
    counts = [n_full] + [round(f * n) for f in fracs[1:]]
    by_rank = torch.zeros(n, dtype=torch.int64, device=importance.device)
    start = 0
    for level, c in zip((1, 2, 4, 8), counts):
        by_rank[start : min(n, start + c)] = level
        start = min(n, start + c)
    lm = torch.ones(b, h, nq, nk, dtype=torch.int64, device=importance.device)
    lm[..., :n].scatter_(-1, order, by_rank.expand(b, h, nq, n))
    if text_q_from is not None:
        lm[..., text_q_from:, :] = 1
    return lm


def sweep_fracs(density: float) -> tuple[float, float, float, float]:
    """A level mix of FLOP density ``density``: 70% of it at level 1, 20% at 2x, 10% at 8x."""
    return (0.7 * density, 0.4 * density, 0.0, 0.8 * density)


def flex_setup(level_map, lq, lkv, block):
    """Binary BlockMask (all blocks full) keeping the non-zero blocks of ``level_map``."""
    from torch.nn.attention.flex_attention import BlockMask

    keep = (level_map > 0).to(torch.int32)
    counts = keep.sum(-1).to(torch.int32)
    idx = keep.argsort(dim=-1, descending=True, stable=True).to(torch.int32)
    zeros = torch.zeros_like(counts)
    return BlockMask.from_kv_blocks(
        zeros, idx, full_kv_num_blocks=counts, full_kv_indices=idx, BLOCK_SIZE=block, seq_lengths=(lq, lkv)
    )


def binary_level_map(importance, density, *, text_q_from=None, text_kv_from=None):
    return quota_level_map(
        importance, (density, 0, 0, 0), text_q_from=text_q_from, text_kv_from=text_kv_from, min_full_share=0.0
    )


def peak_extra_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


# ----------------------------------------------------------------------------- sections
ATTN_CONFIGS = {
    128: [(128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3)],
    64: [(128, 64, 4, 3), (128, 64, 4, 4), (128, 64, 8, 3), (128, 128, 4, 3), (64, 64, 4, 3)],
}
RATE_CONFIGS = {  # (BLOCK_M, BLOCK_N, num_warps, num_stages, DESC, WARP_SPEC)
    128: [(128, 64, 8, 3, 0, 0), (128, 128, 8, 3, 0, 0), (128, 128, 8, 2, 0, 0), (128, 64, 8, 3, 1, 0),
          (128, 64, 8, 4, 1, 0), (128, 128, 8, 3, 1, 0), (128, 128, 8, 2, 1, 0), (128, 64, 4, 3, 1, 0),
          (128, 64, 8, 3, 1, 1), (128, 128, 8, 3, 1, 1), (128, 64, 4, 3, 1, 1), (128, 128, 4, 2, 1, 0)],
    64: [(128, 64, 4, 3, 0, 0), (128, 128, 4, 3, 0, 0), (128, 128, 8, 3, 0, 0), (128, 64, 4, 3, 1, 0),
         (128, 64, 4, 4, 1, 0), (128, 128, 4, 3, 1, 0), (128, 128, 8, 3, 1, 0), (128, 64, 8, 3, 1, 0),
         (128, 64, 4, 3, 1, 1), (128, 128, 4, 3, 1, 1), (128, 128, 8, 2, 1, 1)],
}
RATE_DENSITIES = (0.05, 0.1, 0.15, 0.3, 0.5)
IMP_EXTRA = [(128, 64, 8, 2), (128, 128, 8, 2), (64, 128, 4, 2), (64, 128, 8, 3), (32, 64, 2, 2)]
IMP_CONFIGS = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2), (128, 64, 4, 3)]
POOL_CHUNKS = (32, 64, 128)


def config_sweep(name, q, k, v, mask, scale=None):
    d = q.shape[-1]
    kp, vp = pool_kv_triton(k, v)
    out = torch.empty_like(q)
    scale = d**-0.5 if scale is None else scale
    ref = launch_attention(q, k, v, kp, vp, mask, scale, torch.empty_like(q))
    rows = []
    for bm, bn, w, s in ATTN_CONFIGS.get(d, ATTN_CONFIGS[128]):
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}
        try:
            t0 = time.time()
            o = launch_attention(q, k, v, kp, vp, mask, scale, out, cfg)
            torch.cuda.synchronize()
            compile_s = time.time() - t0
            err = relative_error(o, ref)
            ms = bench(lambda cfg=cfg: launch_attention(q, k, v, kp, vp, mask, scale, out, cfg))
            rows.append((ms, cfg))
            say(
                f"  attn cfg {name} BM{bm} BN{bn} w{w} s{s}: {ms:.3f} ms "
                f"(compile {compile_s:.1f}s, diff vs default {err:.1e})"
            )
        except Exception as exc:  # a config that fails to compile (shared memory) is reported and skipped
            say(f"  attn cfg {name} BM{bm} BN{bn} w{w} s{s}: FAILED {type(exc).__name__}: {str(exc)[:120]}")
    kp0, vp0 = pool_kv_triton(k, v)
    for chunk in POOL_CHUNKS:
        pcfg = {"CHUNK": chunk}
        kp1, vp1 = pool_kv_triton(k, v, config=pcfg)
        same = torch.equal(kp1, kp0) and torch.equal(vp1, vp0)
        ms = bench(lambda pcfg=pcfg: pool_kv_triton(k, v, config=pcfg))
        say(f"  pool CHUNK={chunk} {name}: {ms:.3f} ms (same result: {same})")
    imp_ref = estimate_block_importance_triton(q, k, block_q=mask.block_q, block_kv=mask.block_kv, stride=8)
    for bm, bn, w, s in IMP_CONFIGS:
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}
        try:
            fn = lambda cfg=cfg: estimate_block_importance_triton(  # noqa: E731
                q, k, block_q=mask.block_q, block_kv=mask.block_kv, stride=8, config=cfg
            )
            err = (fn() - imp_ref).abs().max().item()
            ms = bench(fn)
            say(f"  importance cfg {name} BM{bm} BN{bn} w{w} s{s}: {ms:.3f} ms (max diff {err:.1e})")
        except Exception as exc:
            say(f"  importance cfg {name} BM{bm} BN{bn} w{w} s{s}: FAILED {type(exc).__name__}: {str(exc)[:120]}")
    return min(rows, key=lambda r: r[0])[1] if rows else None


def shape_table(name, flex_compiled, fracs=(0.10, 0.05, 0.0, 0.20), attn_cfg=None, do_lead=True):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, text_len, grid = make_inputs(name)
    b, h, length, d = q.shape
    block = 128
    text_from = (length - text_len) // block if text_len else None
    res = {"shape": name, "B": b, "H": h, "L": length, "D": d, "text": text_len}

    def dense():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    out_dense = dense()
    res["dense_ms"] = bench(dense)

    imp = lambda: estimate_block_importance_triton(q, k, block_q=block, block_kv=block, stride=8)  # noqa: E731
    importance = imp()
    res["importance_ms"] = bench(imp)

    cfg = PSAConfig(block_q=block, block_kv=block, mode="quota", budgets=fracs)

    def build_torch():
        lm = quota_level_map(imp(), fracs, text_q_from=text_from, text_kv_from=text_from)
        return PyramidBlockMask.from_valid_level_map(lm, block_q=block, block_kv=block)

    def build():
        return build_mask_triton(imp(), cfg, num_kv_blocks=text_from, num_q_blocks=text_from)

    res["imp_mask_torch_ms"] = bench(build_torch)
    res["mask_same_as_torch"] = bool(torch.equal(build().to_level_map(), build_torch().to_level_map()))
    mask = build()
    res["imp_mask_ms"] = bench(build)
    res["density"] = mask.density(length, length)

    kp, vp = pool_kv_triton(k, v)
    out = torch.empty_like(q)
    scale = d**-0.5
    res["pool_ms"] = bench(lambda: pool_kv_triton(k, v))
    res["attn_ms"] = bench(lambda: launch_attention(q, k, v, kp, vp, mask, scale, out, attn_cfg))
    res["kernel_ms"] = bench(lambda: psa_attention_triton(q, k, v, mask, config=attn_cfg))

    def whole():
        return psa_attention_triton(q, k, v, build(), config=attn_cfg)

    res["whole_ms"] = bench(whole)
    out_psa = psa_attention_triton(q, k, v, mask, config=attn_cfg)
    res["err_psa_vs_dense"] = relative_error(out_psa, out_dense)

    # binary FlexAttention with the same FLOP density, blocks chosen by the same importance
    lm_bin = binary_level_map(importance, res["density"], text_q_from=text_from, text_kv_from=text_from)
    mask_bin = PyramidBlockMask.from_valid_level_map(lm_bin, block_q=block, block_kv=block)
    res["density_binary"] = mask_bin.density(length, length)
    bm = flex_setup(lm_bin, length, length, block)
    out_flex = flex_compiled(q, k, v, block_mask=bm)
    res["flex_ms"] = bench(lambda: flex_compiled(q, k, v, block_mask=bm))
    res["err_binary_vs_dense"] = relative_error(out_flex, out_dense)
    out_bin = psa_attention_triton(q, k, v, mask_bin, config=attn_cfg)
    res["diff_psa_binary_vs_flex"] = relative_error(out_bin, out_flex)  # same math: bf16 noise only
    res["psa_binary_ms"] = bench(lambda: psa_attention_triton(q, k, v, mask_bin, config=attn_cfg))

    # mass mode with the similarity cap (the Wan2.1-1.3B preset), whole call with the fused mask kernel
    try:
        cfg_m = PSAConfig(block_q=block, block_kv=block, mode="mass", budgets=(0.5, 0.6, 0.7, 0.8),
                          sim_thresholds=(0.7, 0.65, 0.6))  # fmt: skip

        taus = cfg_m.sim_thresholds

        def whole_mass():
            m = build_mask_triton(imp(), cfg_m, num_kv_blocks=text_from, num_q_blocks=text_from,
                                  caps=similarity_caps_triton(k, block_kv=block, thresholds=taus))  # fmt: skip
            return psa_attention_triton(q, k, v, m, config=attn_cfg)

        mask_m = build_mask_triton(importance, cfg_m, num_kv_blocks=text_from, num_q_blocks=text_from,
                                   caps=similarity_caps_triton(k, block_kv=block, thresholds=taus))  # fmt: skip
        res["mass_density"] = mask_m.density(length, length)
        res["mass_whole_ms"] = bench(whole_mass)
        res["mass_caps_ms"] = bench(lambda: similarity_caps_triton(k, block_kv=block, thresholds=taus))
        res["mass_caps_torch_ms"] = bench(lambda: similarity_caps_reference(k, block_kv=block, thresholds=taus))
        res["mass_err_vs_dense"] = relative_error(whole_mass(), out_dense)
        lm_mb = binary_level_map(importance, res["mass_density"], text_q_from=text_from, text_kv_from=text_from)
        bm_m = flex_setup(lm_mb, length, length, block)
        res["mass_flex_ms"] = bench(lambda: flex_compiled(q, k, v, block_mask=bm_m))
        res["mass_binary_err_vs_dense"] = relative_error(flex_compiled(q, k, v, block_mask=bm_m), out_dense)
    except Exception as exc:
        say(f"  mass-mode row skipped: {type(exc).__name__}: {str(exc)[:200]}")

    # reorder cost (Gilbert curve): gather q, k, v and restore the output
    try:
        from psa_diffusers.ordering import reorder_tokens, restore_tokens

        def reorder():
            qq, kk, vv = (reorder_tokens(t, grid, text_len) for t in (q, k, v))
            return restore_tokens(qq, grid, text_len)

        res["reorder_ms"] = bench(reorder)
    except Exception as exc:
        res["reorder_ms"] = float("nan")
        say(f"  reorder timing skipped: {type(exc).__name__}: {exc}")

    # the whole call through psa_attention (lead's mask builder), when it exists
    if do_lead:
        try:
            from psa_diffusers.attention import psa_attention

            cfg = PSAConfig(block_q=block, block_kv=block, mode="quota", budgets=fracs, token_order="none")
            fn = lambda: psa_attention(q, k, v, cfg, text_len=text_len, backend="triton")  # noqa: E731
            o, m = psa_attention(q, k, v, cfg, text_len=text_len, backend="triton", return_mask=True)
            res["lead_density"] = m.density(length, length)
            res["lead_whole_ms"] = bench(fn)
            res["lead_err_vs_dense"] = relative_error(o, out_dense)
            cfg_g = cfg.replace(token_order="gilbert")
            res["lead_whole_gilbert_ms"] = bench(
                lambda: psa_attention(q, k, v, cfg_g, text_len=text_len, grid=grid, backend="triton")
            )
        except Exception as exc:
            say(f"  psa_attention whole call skipped: {type(exc).__name__}: {str(exc)[:200]}")

    # peak memory beyond the inputs
    inputs = 3 * q.numel() * q.element_size()
    res["mem_dense_extra_MB"] = peak_extra_bytes(dense) / 2**20
    res["mem_psa_extra_MB"] = peak_extra_bytes(whole) / 2**20
    chunk = -(-b * h // 4)
    res["pool_chunk"] = chunk
    res["kernel_chunked_ms"] = bench(lambda: psa_attention_triton(q, k, v, mask, config=attn_cfg, pool_chunk=chunk))
    res["mem_psa_chunked_extra_MB"] = (
        peak_extra_bytes(lambda: psa_attention_triton(q, k, v, build(), config=attn_cfg, pool_chunk=chunk)) / 2**20
    )
    res["mem_inputs_MB"] = inputs / 2**20
    return res


def density_sweep(flex_compiled, attn_cfg=None, densities=(0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)):
    q, k, v, _, _ = make_inputs("wan13")
    length = q.shape[2]
    importance = estimate_block_importance_triton(q, k, block_q=128, block_kv=128, stride=8)
    rows = []
    for d in densities:
        mask = PyramidBlockMask.from_valid_level_map(
            quota_level_map(importance, sweep_fracs(d)), block_q=128, block_kv=128
        )
        real = mask.density(length, length)
        kp, vp = pool_kv_triton(k, v)
        out = torch.empty_like(q)
        t_attn = bench(lambda m=mask, kp=kp, vp=vp, o=out: launch_attention(q, k, v, kp, vp, m, 128**-0.5, o, attn_cfg))
        t_kernel = bench(lambda m=mask: psa_attention_triton(q, k, v, m, config=attn_cfg))
        lm_bin = binary_level_map(importance, real)
        bm = flex_setup(lm_bin, length, length, 128)
        flex_compiled(q, k, v, block_mask=bm)
        t_flex = bench(lambda bm=bm: flex_compiled(q, k, v, block_mask=bm))
        rows.append((d, real, t_attn, t_kernel, t_flex))
    return rows


def rate_tables(flex_compiled, shapes, sweep=True):
    """Per shape and FLOP density: the sparse kernel's per-FLOP rate against cuDNN's dense rate.

    rate = (dense cuDNN ms * density) / (kernel ms): 1.0 means the sparse kernel does its FLOPs as fast as cuDNN
    does dense ones. The kernel is pooling + attention (the mask given); "binary" masks keep the chosen blocks
    at level 1, "pyramid" masks mix levels (70% of the FLOPs at 1x, 20% at 2x, 10% at 8x). Flex runs the binary
    mask. With ``sweep`` the tile configs of RATE_CONFIGS are timed first at density 0.15 and the best is used
    (the importance tiles are timed too).
    """
    rows, best_by_dim = [], {}
    for name in shapes:
        rows += shape_rates(name, flex_compiled, sweep, best_by_dim)
        torch.cuda.empty_cache()
    say("")
    say("per-FLOP rate of the sparse kernel (pool + attention) against cuDNN dense, bf16, blocks 128x128:")
    say("| shape | D | mask | density | cuDNN dense ms | PSA kernel ms | rate vs cuDNN | flex ms | flex/PSA |")
    say("|---|---|---|---|---|---|---|---|---|")
    for name, d, dens, kind, td, t, tf in rows:
        flex = f"{tf:.3f} | {tf / t:.2f}x" if tf == tf else "- | -"
        say(f"| {name} | {d} | {kind} | {dens:.3f} | {td:.3f} | {t:.3f} | {td * dens / t:.2f}x | {flex} |")
    return rows, best_by_dim


def shape_rates(name, flex_compiled, sweep, best_by_dim):
    """The rate rows of one shape (see :func:`rate_tables`); fills ``best_by_dim[D]`` on its first sweep."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, _, _ = make_inputs(name)
    length, d = q.shape[2], q.shape[3]
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        t_dense = bench(lambda: F.scaled_dot_product_attention(q, k, v))
    importance = estimate_block_importance_triton(q, k, block_q=128, block_kv=128, stride=8)

    def time_importance(icfg):
        return bench(lambda: estimate_block_importance_triton(q, k, block_q=128, block_kv=128, stride=8, config=icfg))

    tiles = [dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), c)) for c in IMP_CONFIGS + IMP_EXTRA]
    for icfg in [None] + ([{"ONE_PASS": True}] + [{**t, "ONE_PASS": one} for t in tiles for one in (False, True)]
                          if sweep else []):  # fmt: skip
        try:
            t_imp = time_importance(icfg)
            err = (estimate_block_importance_triton(q, k, block_q=128, block_kv=128, stride=8, config=icfg)
                   - importance).abs().max().item()  # fmt: skip
            say(f"  importance {name} cfg {icfg or 'table'}: {t_imp:.3f} ms = {100 * t_imp / t_dense:.2f}% of dense"
                f" (max diff vs table {err:.1e})")  # fmt: skip
        except Exception as exc:
            say(f"  importance {name} cfg {icfg}: FAILED {type(exc).__name__}: {str(exc)[:120]}")

    def masks(dens):
        lm_p = quota_level_map(importance, sweep_fracs(dens), min_full_share=0.0)
        lm_b = binary_level_map(importance, dens)
        return (PyramidBlockMask.from_valid_level_map(lm_p, block_q=128, block_kv=128),
                PyramidBlockMask.from_valid_level_map(lm_b, block_q=128, block_kv=128), lm_b)  # fmt: skip

    def time_psa(mask, cfg):
        return bench(lambda: psa_attention_triton(q, k, v, mask, config=cfg))

    if sweep and d not in best_by_dim:
        mp, mb, _ = masks(0.15)
        ref = psa_attention_triton(q, k, v, mp)
        timed = []
        for bm, bn, w, st, desc, ws in RATE_CONFIGS.get(d, RATE_CONFIGS[128]):
            cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st, "DESC": bool(desc),
                   "WARP_SPEC": bool(ws)}  # fmt: skip
            try:
                err = relative_error(psa_attention_triton(q, k, v, mp, config=cfg), ref)
                tp, tb = time_psa(mp, cfg), time_psa(mb, cfg)
                timed.append((tp + tb, cfg))
                say(f"  rate cfg {name} {cfg}: pyramid {tp:.3f} ms, binary {tb:.3f} ms (diff vs table {err:.1e})")
            except Exception as exc:  # a config that fails to compile is reported and skipped
                say(f"  rate cfg {name} {cfg}: FAILED {type(exc).__name__}: {str(exc)[:160]}")
        best_by_dim[d] = min(timed, key=lambda r: r[0])[1] if timed else None
        say(f"  best config for D={d}: {best_by_dim[d]}")
    cfg = best_by_dim.get(d)
    full = PyramidBlockMask.from_valid_level_map(torch.ones_like(importance, dtype=torch.int64), block_q=128,
                                                 block_kv=128)  # fmt: skip
    rows = [(name, d, 1.0, "full", t_dense, time_psa(full, cfg), float("nan"))]
    for dens in RATE_DENSITIES:
        mp, mb, lm_b = masks(dens)
        bmask = flex_setup(lm_b, length, length, 128)
        flex_compiled(q, k, v, block_mask=bmask)
        t_flex = bench(lambda bmask=bmask: flex_compiled(q, k, v, block_mask=bmask))
        rows.append((name, d, mp.density(length, length), "pyramid", t_dense, time_psa(mp, cfg), float("nan")))
        rows.append((name, d, mb.density(length, length), "binary", t_dense, time_psa(mb, cfg), t_flex))
    return rows


BWD_CONFIGS = [  # (ROW_M, ROW_N, COL_M, COL_N, row_warps, col_warps, num_stages) of the backward kernels
    (64, 64, 32, 128, 4, 8, 2), (64, 64, 64, 128, 4, 8, 2), (128, 32, 32, 128, 8, 8, 2), (128, 64, 64, 64, 8, 4, 2),
    (64, 32, 32, 64, 4, 4, 3), (64, 64, 32, 128, 4, 8, 3), (128, 64, 32, 128, 8, 8, 1), (64, 128, 64, 128, 4, 8, 2),
]


def backward_table(flex_compiled, density=0.15, sweep=True):
    """Forward + backward at the Wan2.1-1.3B shape (wan13, bf16): PSA against cuDNN / flash dense and binary flex.

    The PSA mask mixes levels at FLOP density ``density`` (70% of its FLOPs at 1x, 20% at 2x, 10% at 8x); flex
    runs the binary mask of the same density. Forward + backward is the ``psa.attention`` op with autograd
    (``torch.autograd.grad`` of q, k, v); with ``sweep`` the backward tiles of BWD_CONFIGS are timed first and
    the best is also reported (forward kernel + backward kernels called directly, on the forward's saved
    output and log-sum-exp).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from psa_diffusers.ops.attention import psa_attention_backward_triton

    q0, k0, v0, _, _ = make_inputs("wan13")
    b, h, length, d = q0.shape
    scale = d**-0.5
    go = torch.randn_like(q0)
    q, k, v = (t.detach().clone().requires_grad_() for t in (q0, k0, v0))
    importance = estimate_block_importance_triton(q0, k0, block_q=128, block_kv=128, stride=8)
    mask = PyramidBlockMask.from_valid_level_map(
        quota_level_map(importance, sweep_fracs(density), min_full_share=0.0), block_q=128, block_kv=128
    )
    real = mask.density(length, length)
    bmask = flex_setup(binary_level_map(importance, real), length, length, 128)

    def fwd_bwd(fn):
        def run():
            return torch.autograd.grad(fn(), (q, k, v), go)

        return run

    def psa():
        return torch.ops.psa.attention(q, k, v, mask.kv_counts, mask.kv_indices, 128, 128, scale, "triton")[0]

    def dense(backend):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)

        return run

    times = {}
    for label, fn in (("cudnn", dense(SDPBackend.CUDNN_ATTENTION)), ("flash", dense(SDPBackend.FLASH_ATTENTION)),
                      ("flex", lambda: flex_compiled(q, k, v, block_mask=bmask)), ("psa", psa)):  # fmt: skip
        try:
            with torch.no_grad():
                times[f"{label}_fwd"] = bench(fn)
            fwd_bwd(fn)()
            times[f"{label}_fwd_bwd"] = bench(fwd_bwd(fn))
        except Exception as exc:
            say(f"  backward table {label}: FAILED {type(exc).__name__}: {str(exc)[:160]}")
    dense_grads = fwd_bwd(dense(SDPBackend.CUDNN_ATTENTION))()
    psa_grads = fwd_bwd(psa)()
    errs = [relative_error(a, b_) for a, b_ in zip(psa_grads, dense_grads)]

    best_cfg, best_bwd = None, float("nan")
    o0, lse0 = psa_attention_triton(q0, k0, v0, mask, scale, return_lse=True)  # what psa.attention saves
    saved = {"out": o0, "lse": lse0}
    if sweep:
        timed = []
        for rm, rn, cm, cn, rw, cw, st in BWD_CONFIGS:
            cfg = {"ROW_M": rm, "ROW_N": rn, "COL_M": cm, "COL_N": cn, "row_warps": rw, "col_warps": cw,
                   "num_stages": st}  # fmt: skip
            try:
                got = psa_attention_backward_triton(go, q0, k0, v0, mask, scale, config=cfg, **saved)
                diff = max(relative_error(a, b_) for a, b_ in zip(got, psa_grads))
                t = bench(lambda cfg=cfg: psa_attention_backward_triton(go, q0, k0, v0, mask, scale, config=cfg,
                                                                        **saved))  # fmt: skip
                timed.append((t, cfg))
                say(f"  backward cfg {cfg}: {t:.3f} ms (diff vs table config {diff:.1e})")
            except Exception as exc:  # a config that fails to compile or runs out of resources is skipped
                say(f"  backward cfg {cfg}: FAILED {type(exc).__name__}: {str(exc)[:160]}")
        if timed:
            best_bwd, best_cfg = min(timed, key=lambda r: r[0])
            say(f"  best backward config: {best_cfg} ({best_bwd:.3f} ms)")
    times["psa_bwd_table"] = bench(lambda: psa_attention_backward_triton(go, q0, k0, v0, mask, scale, **saved))

    say("")
    say(f"forward + backward, wan13 {b},{h},{length},{d} bf16, blocks 128x128, PSA density {real:.3f} "
        f"(flex binary at the same density); do_bench medians in ms")  # fmt: skip
    say("| method | forward | forward+backward | fwd+bwd: cuDNN / method | flash / method |")
    say("|---|---|---|---|---|")
    for label in ("cudnn", "flash", "flex", "psa"):
        if f"{label}_fwd_bwd" in times:
            t = times[f"{label}_fwd_bwd"]
            cu, fl = times.get("cudnn_fwd_bwd", float("nan")), times.get("flash_fwd_bwd", float("nan"))
            say(f"| {label} | {times[f'{label}_fwd']:.3f} | {t:.3f} | {cu / t:.2f}x | {fl / t:.2f}x |")
    if best_cfg is not None and "psa_fwd" in times:
        t = times["psa_fwd"] + best_bwd
        cu, fl = times.get("cudnn_fwd_bwd", float("nan")), times.get("flash_fwd_bwd", float("nan"))
        say(f"| psa, best backward tiles | {times['psa_fwd']:.3f} | {t:.3f} (fwd + bwd kernels) | {cu / t:.2f}x "
            f"| {fl / t:.2f}x |")  # fmt: skip
    if "flex_fwd_bwd" in times and "psa_fwd_bwd" in times:
        say(f"flex / PSA forward+backward: {times['flex_fwd_bwd'] / times['psa_fwd_bwd']:.2f}x; PSA backward alone "
            f"(table tiles) {times['psa_bwd_table']:.3f} ms")  # fmt: skip
    say(f"PSA gradient errors vs dense cuDNN (sparsity error, not kernel error): dq {errs[0]:.3f} dk {errs[1]:.3f} "
        f"dv {errs[2]:.3f}")  # fmt: skip
    return {"density": real, **times, "best_backward_config": best_cfg, "best_backward_ms": best_bwd,
            "grad_err_vs_dense": errs}  # fmt: skip


def fit(xs, ys):
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return slope, my - slope * mx


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="only the Wan2.1-1.3B shape")
    ap.add_argument("--sweep-configs", action="store_true", help="time several tile configs first")
    ap.add_argument("--out", default=None, help="folder for results.json and the log")
    ap.add_argument("--shapes", default="wan13,cogx,wan14")
    ap.add_argument("--backward", action="store_true", help="only forward+backward at wan13 (density 0.15)")
    ap.add_argument("--rate", action="store_true", help="only the per-FLOP rate tables (and their config sweep)")
    ap.add_argument("--rate-shapes", default="wan13,cogx,wan720")
    ap.add_argument("--no-rate-sweep", action="store_true", help="rate tables with the configuration table's tiles")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/attention.py needs a CUDA device")
    import triton
    from torch.nn.attention.flex_attention import flex_attention

    torch.manual_seed(0)
    say(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    flex_compiled = torch.compile(flex_attention, dynamic=False)
    results = {"device": torch.cuda.get_device_name()}
    if args.backward:
        res = backward_table(flex_compiled, sweep=args.sweep_configs)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "backward.json").write_text(json.dumps(res, indent=1, default=str))
            (out / "backward.log").write_text("\n".join(LOG) + "\n")
        return
    if args.rate:
        rows, best_rate = rate_tables(flex_compiled, args.rate_shapes.split(","), sweep=not args.no_rate_sweep)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "rate.json").write_text(json.dumps({"rows": rows, "best": best_rate}, indent=1, default=str))
            (out / "rate.log").write_text("\n".join(LOG) + "\n")
        return

    best = {}
    if args.sweep_configs:
        for name in ("wan13", "cogx"):
            try:
                q, k, v, text_len, _ = make_inputs(name)
                length = q.shape[2]
                imp = estimate_block_importance_triton(q, k, block_q=128, block_kv=128, stride=8)
                tf = (length - text_len) // 128 if text_len else None
                lm = quota_level_map(imp, (0.10, 0.05, 0.0, 0.20), text_q_from=tf, text_kv_from=tf)
                mask = PyramidBlockMask.from_valid_level_map(lm, block_q=128, block_kv=128)
                say(f"config sweep {name} (density {mask.density(length, length):.3f}):")
                best[q.shape[-1]] = config_sweep(name, q, k, v, mask)
                del q, k, v
                torch.cuda.empty_cache()
            except Exception:
                say(traceback.format_exc())
        results["best_configs"] = {str(d): c for d, c in best.items()}

    shapes = ["wan13"] if args.quick else args.shapes.split(",")
    tables = []
    for name in shapes:
        t0 = time.time()
        try:
            dim = 64 if name == "cogx" else 128
            res = shape_table(name, flex_compiled, attn_cfg=best.get(dim))
            tables.append(res)
            say(f"{name} done in {time.time() - t0:.0f}s: {json.dumps(res)}")
        except Exception:
            say(f"{name} FAILED:\n{traceback.format_exc()}")
    results["shapes"] = tables

    sweep = []
    try:
        sweep = density_sweep(flex_compiled, attn_cfg=best.get(128))
        results["sweep"] = sweep
    except Exception:
        say(f"density sweep FAILED:\n{traceback.format_exc()}")

    # ------------------------------------------------------------------ the table
    say("")
    say(f"PSA Triton kernels vs cuDNN SDPA and binary FlexAttention -- {results['device']}, bf16, blocks 128x128,")
    say("quota 10/5/0/20 levels from the Triton sampled-mass importance (stride 8); do_bench medians in ms")
    hdr = (
        "| shape | B,H,L,D | density (PSA / binary) | dense cuDNN | flex binary | PSA kernel (pool+attn) | attn only "
        "| pool | importance | imp+mask | whole (imp+mask+pool+attn) | dense/whole | flex/kernel | (imp+mask)/dense "
        "| err PSA / binary vs dense | peak extra MB PSA / dense |"
    )
    say(hdr)
    say("|" + "---|" * (hdr.count("|") - 1))
    for r in tables:
        say(
            f"| {r['shape']} | {r['B']},{r['H']},{r['L']},{r['D']} | {r['density']:.3f} / {r['density_binary']:.3f} "
            f"| {r['dense_ms']:.2f} | {r['flex_ms']:.2f} | {r['kernel_ms']:.2f} | {r['attn_ms']:.2f} "
            f"| {r['pool_ms']:.3f} | {r['importance_ms']:.3f} | {r['imp_mask_ms']:.3f} | {r['whole_ms']:.2f} "
            f"| {r['dense_ms'] / r['whole_ms']:.2f}x | {r['flex_ms'] / r['kernel_ms']:.2f}x "
            f"| {100 * r['imp_mask_ms'] / r['dense_ms']:.1f}% "
            f"| {r['err_psa_vs_dense']:.3f} / {r['err_binary_vs_dense']:.3f} "
            f"| {r['mem_psa_extra_MB']:.0f} / {r['mem_dense_extra_MB']:.0f} (inputs {r['mem_inputs_MB']:.0f}) |"
        )
    say("")
    for r in tables:
        extra = []
        if "lead_whole_ms" in r:
            extra.append(
                f"psa_attention() whole call {r['lead_whole_ms']:.2f} ms = "
                f"{r['dense_ms'] / r['lead_whole_ms']:.2f}x dense "
                f"(density {r['lead_density']:.3f}, err {r['lead_err_vs_dense']:.3f}); with Gilbert reorder "
                f"{r['lead_whole_gilbert_ms']:.2f} ms = {r['dense_ms'] / r['lead_whole_gilbert_ms']:.2f}x"
            )
        extra.append(f"reorder (3 gathers + restore) {r['reorder_ms']:.3f} ms")
        extra.append(
            f"imp+mask with the torch quota build {r['imp_mask_torch_ms']:.3f} ms vs fused mask kernel "
            f"{r['imp_mask_ms']:.3f} ms (same map: {r['mask_same_as_torch']})"
        )
        if "mass_whole_ms" in r:
            extra.append(
                f"mass 0.5/0.6/0.7/0.8 + similarity cap: density {r['mass_density']:.3f}, whole call "
                f"{r['mass_whole_ms']:.2f} ms = {r['dense_ms'] / r['mass_whole_ms']:.2f}x dense (caps kernel "
                f"{r['mass_caps_ms']:.3f} ms, torch caps {r['mass_caps_torch_ms']:.3f} ms), "
                f"err {r['mass_err_vs_dense']:.3f} vs binary flex "
                f"{r['mass_flex_ms']:.2f} ms err {r['mass_binary_err_vs_dense']:.3f}"
            )
        extra.append(
            f"PSA kernel pooling {r['pool_chunk']} (b,h) slices at a time: {r['kernel_chunked_ms']:.2f} ms, "
            f"peak extra {r['mem_psa_chunked_extra_MB']:.0f} MB"
        )
        extra.append(
            f"PSA kernel on the binary mask {r['psa_binary_ms']:.2f} ms vs flex {r['flex_ms']:.2f} "
            f"(outputs differ by {r['diff_psa_binary_vs_flex']:.1e})"
        )
        say(f"{r['shape']}: " + "; ".join(extra))
    if sweep:
        say("")
        say("density sweep, wan13 (level mix 70% of FLOPs at 1x, 20% at 2x, 10% at 8x; flex binary at equal density):")
        say("| target | density | attn only ms | PSA kernel ms | flex ms | flex/kernel |")
        say("|---|---|---|---|---|---|")
        for d, real, ta, tk, tf in sweep:
            say(f"| {d:.2f} | {real:.3f} | {ta:.3f} | {tk:.3f} | {tf:.3f} | {tf / tk:.2f}x |")
        xs = [s[1] for s in sweep]
        for label, col in (("attn only", 2), ("PSA kernel", 3), ("flex", 4)):
            slope, icpt = fit(xs, [s[col] for s in sweep])
            say(f"fit {label}: time = {slope:.2f} ms * density + {icpt:.3f} ms")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        (out / "bench.log").write_text("\n".join(LOG) + "\n")


if __name__ == "__main__":
    main()
