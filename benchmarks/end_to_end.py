"""End to end: one denoising step of real-size transformers (random weights), dense against PSA.

    python benchmarks/end_to_end.py                 # every model below (needs a CUDA GPU, bf16)
    python benchmarks/end_to_end.py --models wan2.1-1.3b-480p --layers 6
    python benchmarks/end_to_end.py --compile       # dense compiled against PSA compiled (whole model)
    python benchmarks/end_to_end.py --compile blocks  # ... with compile_repeated_blocks (Wan)

Transformers are built from their published configurations with random weights
(no download). A step is what the pipeline runs per denoising step: Wan runs
the conditional and unconditional forwards separately (2 x batch 1),
CogVideoX runs them as one batch of 2. Dense uses the stock processors with
SDPA on cuDNN; PSA uses ``enable_psa(transformer, config=...)`` with the preset's sparse
budget and with the fixed quota budget 10/5/0/20 (see ``fixed_budget``). The table gives the density
that ran and the density of the masks built: they differ where the dense fallback sent heads whose
masks were too dense to dense attention (docs/design.md, section 5).
With ``--layers N`` only N blocks are built and times are scaled to the full
depth (the per-block cost is uniform; embedding and head costs are counted once).

Each forward runs inside the transformer's ``cache_context`` with a step index, as the pipelines call
it, so PSA learns the step on the host (no read of the timestep). With ``--compile`` both dense and
PSA run ``torch.compile``d (``model.compile()``, or ``compile_repeated_blocks()`` with ``blocks``),
each from a fresh dynamo cache; the table then also gives each one's warm-up: the first step's time
(tracing and compiling included) less a steady step's.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from psa_diffusers.presets import get_preset  # noqa: E402

WAN_1_3B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
WAN_14B = dict(WAN_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
COG_5B = dict(
    num_attention_heads=48,
    attention_head_dim=64,
    in_channels=16,
    out_channels=16,
    time_embed_dim=512,
    text_embed_dim=4096,
    num_layers=42,
    sample_width=90,
    sample_height=60,
    sample_frames=49,
    patch_size=2,
    max_text_seq_length=226,
    use_rotary_positional_embeddings=True,
    norm_eps=1e-5,
    attention_bias=True,
)


@dataclass(frozen=True)
class Case:
    family: str
    config: dict
    latent: tuple  # Wan [B, C, F, H, W]; CogVideoX [B, F, C, H, W]
    text_len: int
    preset: str
    forwards_per_step: int
    default_layers: int | None = None


CASES = {
    "wan2.1-1.3b-480p": Case("wan", WAN_1_3B, (1, 16, 21, 60, 104), 512, "wan2.1-1.3b", 2),
    "wan2.1-1.3b-720p": Case("wan", WAN_1_3B, (1, 16, 21, 90, 160), 512, "wan2.1-1.3b", 2),
    "cogvideox-5b": Case("cogvideox", COG_5B, (2, 13, 16, 60, 90), 226, "cogvideox-5b", 1),
    "wan2.1-14b-720p": Case("wan", WAN_14B, (1, 16, 21, 90, 160), 512, "wan2.1-14b", 2, default_layers=8),
}


def fixed_budget(config):
    """The published quota budget (full 10%, 2x 5%, 8x 20%: density ~0.15) with the preset's blocks and order.

    Random weights give diffuse attention, on which mass-mode presets keep most blocks; this fixed
    budget times the sparse step at the density the presets reach on real video attention.
    """
    return config.replace(mode="quota", budgets=(0.10, 0.05, 0.0, 0.20), sim_thresholds=None)


def build(case: Case, layers: int | None):
    from diffusers import CogVideoXTransformer3DModel, WanTransformer3DModel

    cfg = dict(case.config)
    if layers:
        cfg["num_layers"] = layers
    cls = WanTransformer3DModel if case.family == "wan" else CogVideoXTransformer3DModel
    with torch.device("cuda"):
        model = cls(**cfg).to(torch.bfloat16).eval()
    return model, case.config["num_layers"] / cfg["num_layers"]


def inputs(case: Case):
    g = torch.Generator(device="cuda").manual_seed(0)
    kw = dict(device="cuda", dtype=torch.bfloat16, generator=g)
    b = case.latent[0]
    text_dim = case.config.get("text_dim", case.config.get("text_embed_dim"))
    args = dict(
        hidden_states=torch.randn(case.latent, **kw),
        encoder_hidden_states=torch.randn(b, case.text_len, text_dim, **kw),
        timestep=torch.full((b,), 500, device="cuda", dtype=torch.long),
        return_dict=False,
    )
    if case.family == "cogvideox":
        video_len = case.latent[1] * (case.latent[3] // 2) * (case.latent[4] // 2)
        d = case.config["attention_head_dim"]
        args["image_rotary_emb"] = (torch.randn(video_len, d, device="cuda"), torch.randn(video_len, d, device="cuda"))
    return args


class StepRunner:
    """One denoising step per call: ``forwards`` transformer calls ("cond", then "uncond"), each in the
    model's ``cache_context`` with the next step index, as WanPipeline calls it (the step is known on the
    host; CogVideoX's pipeline passes no index, PSA then takes it from the timestep's schedule)."""

    CALLS = ("cond", "uncond")

    def __init__(self, model, args: dict, forwards: int, num_steps: int = 10**9) -> None:
        if forwards not in (1, 2):
            raise ValueError(f"forwards={forwards!r}: a step makes 1 or 2 transformer calls")
        self.model, self.args, self.forwards, self.num_steps = model, args, forwards, num_steps
        self.step = 0

    def __call__(self):
        out = None
        for call in self.CALLS[: self.forwards]:
            with self.model.cache_context(call, step_index=self.step, num_inference_steps=self.num_steps):
                out = self.model(**self.args)
        self.step += 1
        return out


def mean_mask_density(stats) -> float:
    """Mean density of the masks PSA built (``LayerStats.mask_density``): what the budget asked for, where
    ``density`` is what ran (1.0 for heads the dense fallback sent to dense attention)."""
    values = [s.mask_density for layers in stats.values() for s in layers.values() if s.mask_density is not None]
    return sum(values) / len(values) if values else float("nan")


def compile_model(model, how: str | None) -> None:
    """``torch.compile`` the transformer in place: "whole" (``model.compile()``) or "blocks"
    (``compile_repeated_blocks()``, regional: each block compiled once for all); None: eager."""
    if how is None:
        return
    torch._dynamo.reset()  # each run compiles from a fresh cache: its warm-up is its own
    if how == "whole":
        model.compile()
    elif how == "blocks":
        model.compile_repeated_blocks()
    else:
        raise ValueError(f"compile={how!r}: expected 'whole', 'blocks' or None")


def time_step(model, args, forwards: int) -> tuple[float, int, float]:
    """Median ms of one denoising step, its peak memory in bytes, and the ms of the first step (with
    any compilation)."""
    import time

    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel

    runner = StepRunner(model, args, forwards)

    def step():
        with torch.inference_mode(), sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
            runner()

    torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first_ms = (time.perf_counter() - start) * 1e3
    torch.cuda.reset_peak_memory_stats()
    ms = triton.testing.do_bench(step, warmup=200, rep=1500, return_mode="median")
    return ms, torch.cuda.max_memory_allocated(), first_ms


def attention_ms(case: Case, layers: int, forwards: int) -> float:
    """Dense self-attention time of one step: cuDNN SDPA at the step's shape, times layers and forwards."""
    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b = case.latent[0]
    if case.family == "wan":
        length = case.latent[2] * (case.latent[3] // 2) * (case.latent[4] // 2)
    else:
        length = case.latent[1] * (case.latent[3] // 2) * (case.latent[4] // 2) + case.text_len
    h, d = case.config["num_attention_heads"], case.config["attention_head_dim"]
    q, k, v = (torch.randn(b, h, length, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        ms = triton.testing.do_bench(
            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), return_mode="median"
        )
    return ms * layers * forwards


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--layers", type=int, default=None, help="build this many blocks and scale to full depth")
    ap.add_argument(
        "--compile",
        nargs="?",
        const="whole",
        default=None,
        choices=["whole", "blocks"],
        help="torch.compile dense and PSA alike: the whole transformer (default) or its repeated blocks",
    )
    args = ap.parse_args(argv)
    if args.layers is not None and args.layers < 1:
        ap.error(f"--layers {args.layers}: must be >= 1")
    return args


def compile_mode(case: Case, how: str | None) -> str | None:
    """How ``case``'s transformer is compiled for ``--compile how``: CogVideoX has no ``_repeated_blocks``
    (diffusers refuses ``compile_repeated_blocks`` there), so "blocks" compiles it whole."""
    return "whole" if how == "blocks" and case.family == "cogvideox" else how


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("end_to_end: needs a CUDA GPU (bf16 real-size transformers); none found")
        return 0
    import diffusers

    from psa_diffusers import enable_psa

    diffusers.utils.logging.set_verbosity_error()
    compiled = f", torch.compile ({args.compile})" if args.compile else ""
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, random weights{compiled}")
    rows, warmups = [], []
    for name in args.models:
        case = CASES[name]
        layers = args.layers or case.default_layers
        model, depth_scale = build(case, layers)
        x = inputs(case)
        built_layers = layers or case.config["num_layers"]
        how = compile_mode(case, args.compile)
        if how != args.compile:
            print(f"{name}: compiled whole (no repeated blocks to compile alone)")
        compile_model(model, how)
        dense_ms, dense_mem, dense_first = time_step(model, x, case.forwards_per_step)
        attn = attention_ms(case, built_layers, case.forwards_per_step)
        preset = get_preset(case.preset)
        fixed = fixed_budget(preset.config)
        budgets = {f"preset {preset.config.mode}": preset.config, "quota 10/5/0/20": fixed}
        if fixed.token_order != "none":  # the same budget in raster order: what Gilbert order costs
            budgets["quota raster"] = fixed.replace(token_order="none")
        for label, config in budgets.items():
            if label != "quota 10/5/0/20" and config == budgets["quota 10/5/0/20"]:
                continue
            with enable_psa(model, config=config) as handle:
                compile_model(model, how)
                psa_ms, psa_mem, psa_first = time_step(model, x, case.forwards_per_step)
                density, mask_density = handle.mean_density(), mean_mask_density(handle.stats())
            if args.compile:
                warmups.append((name, label, dense_first - dense_ms, psa_first - psa_ms))
            n, n_dense = preset.num_steps, preset.dense_steps
            run = n * dense_ms / (n_dense * dense_ms + (n - n_dense) * psa_ms)
            rows.append(
                (
                    name,
                    label,
                    built_layers,
                    depth_scale,
                    dense_ms * depth_scale,
                    psa_ms * depth_scale,
                    dense_ms / psa_ms,
                    attn / dense_ms,
                    dense_mem,
                    psa_mem,
                    density,
                    mask_density,
                    run,
                    n,
                    n_dense,
                )
            )
        del model, x
        torch.cuda.empty_cache()
    print(
        f"{'model':<18} {'budget':<16} {'layers':>6} {'dense ms':>9} {'PSA ms':>9} {'step x':>7} {'attn %':>7} "
        f"{'peak GB d/PSA':>14} {'density':>8} {'mask':>6} {'run x':>6}  schedule"
    )
    for r in rows:
        name, label, built, scale, d_ms, p_ms, speed, share, dm, pm, dens, mask, run, n, nd = r
        shown = f"{built}" + (f"x{scale:.0f}" if scale != 1 else "")
        print(
            f"{name:<18} {label:<16} {shown:>6} {d_ms:9.1f} {p_ms:9.1f} {speed:7.2f} {100 * share:6.1f}% "
            f"{dm / 2**30:6.1f}/{pm / 2**30:<6.1f} {dens:8.3f} {mask:6.3f} {run:6.2f}  {nd} dense of {n}"
        )
    if warmups:
        print(f"\n{'model':<18} {'budget':<16} {'dense warm-up s':>15} {'PSA warm-up s':>14} {'PSA/dense':>9}")
        for name, label, dense_w, psa_w in warmups:
            print(f"{name:<18} {label:<16} {dense_w / 1e3:15.1f} {psa_w / 1e3:14.1f} {psa_w / dense_w:9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
