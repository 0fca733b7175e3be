"""Context parallelism: one denoising step of Wan, dense against PSA, on one GPU and under Ulysses.

    python benchmarks/context_parallel.py                              # 1 GPU
    torchrun --nproc_per_node 2 benchmarks/context_parallel.py         # Ulysses over 2 GPUs
    torchrun --nproc_per_node 2 benchmarks/context_parallel.py --layers 40   # every block of Wan2.1-14B
    torchrun --nproc_per_node 2 benchmarks/context_parallel.py --tiny  # CPU smoke run (gloo), no GPU

The transformer is built from Wan2.1-14B's published configuration with random weights (no download;
rank 0's weights are broadcast, so every rank holds the same model), at 720p (81 frames: a 21 x 45 x 80
grid of 75,600 tokens), in bf16. With more than one process it runs under
``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))``: each rank holds a
share of the sequence, and attention runs on every token of ``H / N`` heads per rank. Dense is the stock
processor (cuDNN SDPA inside diffusers' Ulysses attention); PSA is ``enable_psa(transformer, config=...)``
with the preset's sparse budget and with the fixed quota budget 10/5/0/20 (``end_to_end.fixed_budget``).

A step is two forwards ("cond", "uncond") in the model's ``cache_context`` with the step index, as
WanPipeline runs it. Every rank runs the same fixed number of steps (collectives must match), after a
barrier; a step's time is the slowest rank's. With ``--layers N`` only N blocks are built and the
times are scaled to the full depth, as in ``end_to_end.py``. Prints one Markdown row per budget:
paste the 1-GPU and the N-GPU rows into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.end_to_end import CASES, StepRunner, fixed_budget, mean_mask_density  # noqa: E402
from psa_diffusers.config import PSAConfig  # noqa: E402
from psa_diffusers.diffusers.tiny import tiny_wan_config  # noqa: E402
from psa_diffusers.presets import get_preset  # noqa: E402

CASE = CASES["wan2.1-14b-720p"]
TINY = tiny_wan_config(num_heads=4)
TINY_LATENT = (1, 16, 4, 24, 16)
TINY_CONFIG = PSAConfig(block_q=64, block_kv=32, mode="quota", budgets=(0.25, 0.25, 0.0, 0.25), token_order="gilbert")


def setup() -> tuple[int, int, torch.device]:
    """``(rank, world size, device)``; joins the process group under torchrun (NCCL on CUDA, gloo else)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def build(tiny: bool, layers: int | None, device: torch.device):
    """``(transformer, depth scale, forward kwargs)``: identical weights and inputs on every rank."""
    from diffusers import WanTransformer3DModel

    config = dict(TINY if tiny else CASE.config)
    if layers:
        config["num_layers"] = layers
    dtype = torch.float32 if tiny else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**config).to(dtype).eval()
    if dist.is_initialized():
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, src=0)
    latent = TINY_LATENT if tiny else CASE.latent
    text_len = 8 if tiny else CASE.text_len
    g = torch.Generator(device=device).manual_seed(0)
    kwargs = dict(device=device, dtype=dtype, generator=g)
    args = dict(
        hidden_states=torch.randn(latent, **kwargs),
        encoder_hidden_states=torch.randn(latent[0], text_len, config["text_dim"], **kwargs),
        timestep=torch.full((latent[0],), 500, device=device, dtype=torch.long),
        return_dict=False,
    )
    full_depth = (TINY if tiny else CASE.config)["num_layers"]
    return model, full_depth / config["num_layers"], args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()


def time_steps(model, args: dict, device: torch.device, warmup: int, steps: int) -> float:
    """Median ms of one denoising step (two forwards), the slowest rank's per step."""
    from contextlib import nullcontext

    runner = StepRunner(model, args, CASE.forwards_per_step)
    kernels = nullcontext()
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernels = sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION])
    times = []
    with torch.inference_mode(), kernels:
        for i in range(warmup + steps):
            synchronize(device)
            start = time.perf_counter()
            runner()
            synchronize(device)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    ms = torch.tensor(times, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(ms, op=dist.ReduceOp.MAX)
    return statistics.median(ms.tolist())


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=None, help="build this many blocks and scale to full depth")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (per budget)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (per budget); the median is reported")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Wan on the CPU or GPU: checks the script")
    args = ap.parse_args(argv)
    for name in ("layers", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name} {value}: must be >= 1")
    if args.warmup < 0:
        ap.error(f"--warmup {args.warmup}: must be >= 0")
    if args.layers is None and not args.tiny:
        args.layers = CASE.default_layers
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.tiny:
        print("context_parallel: needs CUDA GPUs (bf16 Wan2.1-14B at 720p); --tiny runs a tiny model anywhere")
        return 0
    import diffusers
    from diffusers import ContextParallelConfig

    from psa_diffusers import enable_psa

    diffusers.utils.logging.set_verbosity_error()
    rank, world, device = setup()
    if device.type == "cpu" and world > 1:
        # a CPU build of torch counts no accelerator; diffusers picks the rank's device modulo that count
        torch.accelerator.device_count = lambda: 1
    try:
        model, depth_scale, x = build(args.tiny, args.layers, device)
        if world > 1:
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        dense_ms = time_steps(model, x, device, args.warmup, args.steps)
        if args.tiny:
            budgets = {"tiny quota": TINY_CONFIG}
        else:
            preset = get_preset(CASE.preset).config
            budgets = {f"preset {preset.mode}": preset, "quota 10/5/0/20": fixed_budget(preset)}
        rows = []
        for label, config in budgets.items():
            with enable_psa(model, config=config) as handle:
                psa_ms = time_steps(model, x, device, args.warmup, args.steps)
                density, mask_density = handle.mean_density(), mean_mask_density(handle.stats())
            rows.append((label, psa_ms, density, mask_density))
        if rank == 0:
            name = "tiny Wan" if args.tiny else "Wan2.1-14B 720p"
            where = device.type.upper() if device.type == "cpu" else torch.cuda.get_device_name(device)
            built = model.config.num_layers
            print(f"{name}, {world} x {where}, torch {torch.__version__}, {built} layers x{depth_scale:g}")
            print("| model | GPUs | budget | dense ms/step | PSA ms/step | PSA speed-up | density | mask density |")
            print("|---|---|---|---|---|---|---|---|")
            for label, psa_ms, density, mask_density in rows:
                print(
                    f"| {name} | {world} | {label} | {dense_ms * depth_scale:.1f} | {psa_ms * depth_scale:.1f} | "
                    f"{dense_ms / psa_ms:.2f}x | {density:.3f} | {mask_density:.3f} |"
                )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
