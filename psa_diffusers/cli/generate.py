"""The options of ``psa-diffusers generate`` and of ``examples/*.py``, and what the command does with them.

    parser = argparse.ArgumentParser()
    add_generate_arguments(parser, model="THUDM/CogVideoX-5b", preset=None)
    args = parser.parse_args()
    check_generate_arguments(parser, args)      # exit 2 with a message for bad values
    result = run_from_arguments(args)           # load, enable PSA, generate, write the mp4

The examples call the same functions from ``psa_diffusers.cli`` and spell out the last step.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..generation import GenerationResult, StepCallback

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = (
    "A red fox trots through fresh snow in a pine forest at dawn, its breath visible in the cold air, "
    "soft golden light between the trees, cinematic, detailed fur."
)

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
_DTYPES.update({"float32": torch.float32, "fp32": torch.float32})


def add_generate_arguments(parser: argparse.ArgumentParser, *, model: str | None, preset: str | None) -> None:
    """The options shared by the examples and ``psa-diffusers generate``."""
    parser.add_argument("--model", default=model, required=model is None, help="hub id or local pipeline directory")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--preset", default=preset, help="PSA preset (default: the one listing --model)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the preset's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: preset or pipeline)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=None, help="default: the model's")
    parser.add_argument("--width", type=int, default=None, help="default: the model's")
    parser.add_argument("--frames", type=int, default=None, help="number of frames (default: the model's)")
    parser.add_argument("--dense", action="store_true", help="the same run without PSA, to compare")
    parser.add_argument("--output", default="video.mp4", help="mp4 file to write")
    parser.add_argument("--cpu-offload", action="store_true", help="keep models on the CPU until they run")
    parser.add_argument("--device", default=None, help="default: cuda where available, else cpu")
    parser.add_argument(
        "--dtype",
        type=_dtype,
        default=None,
        help="bfloat16, float16 or float32 (default: bfloat16 on CUDA, else float32)",
    )


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; choose bfloat16, float16 or float32")
    return _DTYPES[name]


def check_generate_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``parser.error`` (exit 2 with a message) for values argparse cannot check itself."""
    for name in ("steps", "height", "width", "frames"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be a positive integer, got {value}")
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
        parser.error(f"--guidance must be a finite number >= 0, got {args.guidance}")
    if not str(args.output).lower().endswith(".mp4"):
        parser.error(f"--output must name an .mp4 file, got {args.output!r}")
    if args.preset is not None:
        from ..presets import list_presets, load_preset

        if args.preset not in list_presets() and not Path(args.preset).is_file():
            parser.error(f"--preset {args.preset!r}: not a built-in preset ({', '.join(list_presets())}) nor a file")
        if args.preset not in list_presets():
            try:
                load_preset(args.preset)
            except ValueError as err:
                parser.error(str(err))


def resolve_preset(name_or_path: str):
    """A built-in preset by name, or a user preset file (.json/.yaml)."""
    from ..presets import get_preset, list_presets, load_preset

    return get_preset(name_or_path) if name_or_path in list_presets() else load_preset(name_or_path)


def call_arguments(args: argparse.Namespace, preset=None) -> dict[str, Any]:
    """Pipeline call arguments from the options: the preset's steps and guidance unless given."""
    call: dict[str, Any] = {}
    if preset is not None:
        call["num_inference_steps"] = preset.num_steps
        if preset.guidance_scale is not None:
            call["guidance_scale"] = preset.guidance_scale
    for key, value in (
        ("num_inference_steps", args.steps),
        ("guidance_scale", args.guidance),
        ("height", args.height),
        ("width", args.width),
        ("num_frames", args.frames),
    ):
        if value is not None:
            call[key] = value
    return call


def run_from_arguments(
    args: argparse.Namespace,
    *,
    lora: str | None = None,
    lora_weight_name: str | None = None,
    on_step: StepCallback | None = None,
) -> GenerationResult:
    """What ``psa-diffusers generate`` does with its options (the examples spell the same steps out).

    lora:    a hub id or local path of a PSA LoRA (``load_psa_lora``: its preset, scheduler, steps and
             guidance then apply; ``--dense`` keeps the LoRA and scheduler and drops PSA), or None.
    on_step: called after every denoising step (``generate``'s ``on_step``).
    The preset's family and the LoRA file are checked before the (large) pipeline is loaded.
    """
    from ..diffusers.families import family_of_model, preset_for_model
    from ..diffusers.lora import DEFAULT_PRESET, DEFAULT_WEIGHT_NAME, load_psa_lora
    from ..diffusers.lora_source import resolve_lora_file
    from ..generation import generate
    from ..loading import load_pipeline

    family = family_of_model(args.model)
    if args.preset is not None:
        preset = resolve_preset(args.preset)
    else:
        preset = resolve_preset(DEFAULT_PRESET if lora is not None else preset_for_model(args.model, family))
    if preset.family != family:
        raise ValueError(f"preset {preset.name!r} is for {preset.family} models; {args.model} is a {family} pipeline")
    lora_file = resolve_lora_file(lora, lora_weight_name or DEFAULT_WEIGHT_NAME) if lora is not None else None

    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype, cpu_offload=args.cpu_offload)
    if lora_file is not None:
        handle = load_psa_lora(pipe, lora_file, preset=preset).handle
        if args.dense:
            handle.disable()  # keep the LoRA and the scheduler, drop PSA
            handle = None
    else:
        from ..diffusers import enable_psa

        handle = None if args.dense else enable_psa(pipe, preset=preset)
    call = call_arguments(args, preset)
    logger.info("generating: %s", call)
    return generate(pipe, args.prompt, handle=handle, seed=args.seed, output=args.output, on_step=on_step, **call)
