"""The ``psa-diffusers`` command: its parser and its commands.

    psa-diffusers demo --output psa-demo     offline demo: tiny random CogVideoX and Wan, dense vs PSA
    psa-diffusers generate --model THUDM/CogVideoX-5b --prompt "..." --output out.mp4
    psa-diffusers generate --model THUDM/CogVideoX-5b --lora           the 4-step LoRA recipe
    psa-diffusers presets                    the preset table
    psa-diffusers bench                      kernel benchmark (needs a CUDA GPU)

With ``psa_diffusers.cli.generate``, the only code of the package that prints; the rest logs.
"""

from __future__ import annotations

import argparse
import logging
import os
import runpy
import sys
import time
from pathlib import Path

from .generate import add_generate_arguments, check_generate_arguments, run_from_arguments

BENCH_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "attention.py"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="psa-diffusers", description="Pyramid Sparse Attention for CogVideoX and Wan in diffusers."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log INFO messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="offline demo on tiny random-weight pipelines (CPU or GPU)")
    demo.add_argument("--output", default="psa-demo", help="folder for the videos and pictures (default psa-demo)")
    demo.add_argument("--steps", type=int, default=8, help="denoising steps (default 8)")
    demo.add_argument("--height", type=int, default=160, help="pixels, a multiple of 16 (default 160)")
    demo.add_argument("--width", type=int, default=176, help="pixels, a multiple of 16 (default 176)")
    demo.add_argument("--frames", type=int, default=17, help="4k+1 frames (default 17)")
    demo.add_argument("--models", nargs="+", choices=("cogvideox", "wan"), default=["cogvideox", "wan"])
    demo.add_argument("--device", default=None, help="default: cuda where available, else cpu")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--block-q", type=int, default=None, help="override the presets' query block (64 or 128)")
    demo.add_argument("--block-kv", type=int, default=None, help="override the presets' KV block (32, 64 or 128)")

    gen = sub.add_parser("generate", help="text-to-video with a real CogVideoX or Wan model")
    add_generate_arguments(gen, model=None, preset=None)
    gen.add_argument(
        "--lora",
        nargs="?",
        const="GYP666/BLADE",
        default=None,
        metavar="REPO_OR_PATH",
        help="load the PSA-distilled 4-step LoRA (default GYP666/BLADE) with its scheduler and preset",
    )
    gen.add_argument("--lora-weight-name", default=None, help="file inside the LoRA repo or directory")

    sub.add_parser("presets", help="list the built-in presets")

    bench = sub.add_parser("bench", help="run benchmarks/attention.py (needs a CUDA GPU)")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the benchmark")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.verbose:  # the diffusers integration logs under diffusers' logger tree
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_info()
    try:
        if args.command == "demo":
            return _demo(parser, args)
        if args.command == "generate":
            return _generate(parser, args)
        if args.command == "presets":
            return _presets()
        return _bench(args.args)
    except BrokenPipeError:  # output cut short (e.g. `| head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError) as err:
        print(f"psa-diffusers {args.command}: error: {err}", file=sys.stderr)
        return 1


# ----------------------------------------------------------------------------------------------- commands


def _demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from ..demo import DemoSettings, format_table, run_demo

    try:
        settings = DemoSettings(
            height=args.height,
            width=args.width,
            num_frames=args.frames,
            steps=args.steps,
            seed=args.seed,
            families=tuple(dict.fromkeys(args.models)),
            device=args.device,
            psa_overrides=tuple(
                (name, value) for name, value in (("block_q", args.block_q), ("block_kv", args.block_kv)) if value
            ),
        )
        if settings.psa_overrides:
            from ..config import PSAConfig

            PSAConfig().replace(**dict(settings.psa_overrides))  # validate before building anything
    except ValueError as err:
        parser.error(str(err))
    start = time.perf_counter()
    result = run_demo(args.output, settings, progress=lambda message: print(message, flush=True))
    print()
    print(format_table(result))
    print()
    print(f"wrote {len(result.files)} files to {Path(args.output).resolve()}:")
    for path in result.files:
        print(f"  {Path(path).name}")
    print(f"demo finished in {time.perf_counter() - start:.1f} s")
    return 0


def _generate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    check_generate_arguments(parser, args)
    result = run_from_arguments(args, lora=args.lora, lora_weight_name=args.lora_weight_name)
    print(f"seconds per step: {result.seconds_per_step:.3f}")
    print(f"mean attention density: {result.mean_density:.3f}" + (" (dense)" if not result.stats else ""))
    print(f"wrote {result.output}")
    return 0


def _presets() -> int:
    from ..presets import get_preset, list_presets

    header = ("preset", "family", "steps", "dense", "mode", "budgets 1/2/4/8", "blocks", "order", "sim cap", "extras")
    rows = []
    for name in list_presets():
        p = get_preset(name)
        c = p.config
        extras = []
        if p.guidance_scale is not None:
            extras.append(f"guidance {p.guidance_scale}")
        if p.scheduler:
            kwargs = ", ".join(f"{k}={v}" for k, v in p.scheduler_kwargs)
            extras.append(f"{p.scheduler}({kwargs})" if kwargs else p.scheduler)
        rows.append(
            (
                name,
                p.family,
                str(p.num_steps),
                str(p.dense_steps),
                c.mode,
                " / ".join(f"{b:g}" for b in c.budgets),
                f"{c.block_q}x{c.block_kv}",
                c.token_order,
                " / ".join(f"{s:g}" for s in c.sim_thresholds) if c.sim_thresholds else "-",
                ", ".join(extras) or "-",
            )
        )
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*header).rstrip())
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(fmt.format(*row).rstrip())
    print("\nquota budgets: shares of each row's blocks per level; mass budgets: cumulative importance thresholds.")
    print("'dense' leading steps scale with the run's length (e.g. 15 of 50 -> 8 of 25).")
    return 0


def _bench(extra: list[str]) -> int:
    import torch

    if not torch.cuda.is_available():
        print("psa-diffusers bench: skipped: no CUDA GPU here (the benchmark times Triton kernels on a GPU)")
        return 0
    if not BENCH_SCRIPT.is_file():
        print(f"psa-diffusers bench: error: {BENCH_SCRIPT} not found (run from a source checkout)", file=sys.stderr)
        return 1
    if extra[:1] == ["--"]:
        extra = extra[1:]
    saved = sys.argv
    sys.argv = [str(BENCH_SCRIPT), *extra]
    try:
        runpy.run_path(str(BENCH_SCRIPT), run_name="__main__")
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = saved
    return 0
