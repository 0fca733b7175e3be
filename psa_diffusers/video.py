"""Text-to-video with PSA: load a pipeline, run it with per-step timing and PSA statistics, write an mp4.

Shared by ``examples/*.py``, ``psa-diffusers generate`` and the offline demo::

    pipe = load_pipeline("THUDM/CogVideoX-5b")                # bf16 on CUDA
    handle = enable_psa(pipe, preset="cogvideox-5b")          # or None for the dense baseline
    result = generate(pipe, "a cat walks in the rain", handle=handle, output="cat.mp4")
    summary = result.summary()                                # seconds per step, mean density

Nothing here prints: progress goes to an ``on_step`` callback, messages to ``logging``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

FPS = {"cogvideox": 8, "wan": 16}
"""Frame rate of the published models' videos (CogVideoX 8 fps, Wan 16 fps)."""

DEFAULT_PROMPT = (
    "A red fox trots through fresh snow in a pine forest at dawn, its breath visible in the cold air, "
    "soft golden light between the trees, cinematic, detailed fur."
)

StepCallback = Callable[[int, int, float], None]
"""``on_step(step_index, num_steps, seconds_of_that_step)``, called after every denoising step."""


# ----------------------------------------------------------------------------------------------- models


def pipeline_family(model: str | os.PathLike[str]) -> str:
    """ "cogvideox" or "wan" for a hub id or local pipeline directory, from its ``model_index.json``."""
    source = _model_source(model)
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(source)
    except (OSError, ValueError) as err:
        raise OSError(
            f"{model}: cannot read the pipeline's model_index.json ({err}). Pass a local pipeline directory, "
            "or a hub id with network access (or a cached copy and HF_HUB_OFFLINE=1)"
        ) from err
    name = str(index.get("_class_name", ""))
    if name.startswith("CogVideoX"):
        return "cogvideox"
    if name.startswith("Wan"):
        return "wan"
    raise ValueError(f"{model}: pipeline class {name or '?'} is neither CogVideoX nor Wan")


def _model_source(model: str | os.PathLike[str]) -> str:
    """``model`` as a string; FileNotFoundError at once for a local path that does not exist."""
    source = os.fspath(model)
    if not Path(source).expanduser().is_dir() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise FileNotFoundError(f"{source}: no such local pipeline directory (nor a hub id 'owner/name')")
    return source


def preset_for_model(model: str | os.PathLike[str], family: str) -> str:
    """The built-in preset whose ``models`` list ``model`` (hub id, or a directory of the same name)."""
    from .presets import get_preset, list_presets

    wanted = Path(os.fspath(model)).name.lower()
    for name in list_presets():
        preset = get_preset(name)
        if preset.family != family or name.endswith("-4step"):
            continue
        if any(m == os.fspath(model) or m.rsplit("/", 1)[-1].lower() == wanted for m in preset.models):
            return name
    raise ValueError(
        f"{model}: no built-in preset lists this model; pass one with --preset "
        f"({', '.join(n for n in list_presets() if get_preset(n).family == family)})"
    )


def load_pipeline(
    model: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    cpu_offload: bool = False,
):
    """A CogVideoX or Wan text-to-video pipeline from a hub id or local directory.

    device: default CUDA where available, else CPU; dtype: default bfloat16 on CUDA, float32 on CPU
    (Wan's VAE stays float32, as its model card advises). ``cpu_offload`` keeps each model on the
    CPU until it runs (``enable_model_cpu_offload``), for GPUs with less memory.
    """
    _model_source(model)
    from diffusers import AutoencoderKLWan, DiffusionPipeline

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    family = pipeline_family(model)
    extra: dict[str, Any] = {}
    if family == "wan":
        extra["vae"] = AutoencoderKLWan.from_pretrained(os.fspath(model), subfolder="vae", dtype=torch.float32)
    pipe = DiffusionPipeline.from_pretrained(os.fspath(model), dtype=dtype, **extra)
    if family == "cogvideox":
        pipe.vae.enable_tiling()  # decoding 49 frames at 720x480 otherwise needs tens of GiB
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


# ----------------------------------------------------------------------------------------------- running


class StepClock:
    """Wall time of every denoising step of one pipeline call.

    A step runs from the start of its first transformer forward (a forward pre-hook) to the
    pipeline's ``callback_on_step_end``; on CUDA both ends synchronise first.
    """

    def __init__(self, pipe, on_step: StepCallback | None = None, num_steps: int = 0) -> None:
        self.pipe = pipe
        self.on_step = on_step
        self.num_steps = num_steps
        self.seconds: list[float] = []
        self._start: float | None = None
        self._hooks: list[Any] = []

    def _now(self) -> float:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter()

    def _pre_forward(self, module, args) -> None:
        if self._start is None:
            self._start = self._now()

    def callback(self, pipe, step: int, timestep, kwargs: dict) -> dict:
        now = self._now()
        self.seconds.append(now - (self._start if self._start is not None else now))
        self._start = None
        if self.on_step is not None:
            self.on_step(step, self.num_steps, self.seconds[-1])
        return {}

    def __enter__(self) -> StepClock:
        for attr in ("transformer", "transformer_2"):
            model = getattr(self.pipe, attr, None)
            if isinstance(model, torch.nn.Module):
                self._hooks.append(model.register_forward_pre_hook(self._pre_forward))
        return self

    def __exit__(self, *exc: Any) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


@dataclass
class GenerationResult:
    """One pipeline call.

    frames:       the video, ``[frames, height, width, 3]`` float32 in [0, 1].
    seconds:      wall time of the whole call (text encoding, denoising, VAE decode).
    step_seconds: wall time of each denoising step.
    stats:        ``handle.stats()`` of the call (``{step: {layer: LayerStats}}``), empty when dense.
    output:       the mp4 written, if any.
    """

    frames: np.ndarray
    seconds: float
    step_seconds: list[float]
    stats: dict[int, dict[str, Any]] = field(default_factory=dict)
    output: Path | None = None

    @property
    def seconds_per_step(self) -> float:
        return sum(self.step_seconds) / len(self.step_seconds) if self.step_seconds else math.nan

    @property
    def mean_density(self) -> float:
        """Mean attention density over steps and self-attention layers (dense steps count 1.0; 1.0 without PSA)."""
        values = [s.density for layers in self.stats.values() for s in layers.values()]
        return sum(values) / len(values) if values else 1.0

    @property
    def sparse_density(self) -> float:
        """Mean density over the layers and steps that ran sparse (NaN if none did)."""
        values = [s.density for layers in self.stats.values() for s in layers.values() if not s.dense]
        return sum(values) / len(values) if values else math.nan

    def density_table(self) -> tuple[list[int], list[str], np.ndarray]:
        """``(steps, layers, densities[step, layer])`` from ``stats`` (NaN where a layer was not seen)."""
        steps = sorted(self.stats)
        layers = sorted({layer for per_step in self.stats.values() for layer in per_step}, key=_natural_key)
        table = np.full((len(steps), len(layers)), np.nan)
        for i, step in enumerate(steps):
            for j, layer in enumerate(layers):
                if layer in self.stats[step]:
                    table[i, j] = self.stats[step][layer].density
        return steps, layers, table

    def summary(self) -> str:
        dense = (
            "dense attention"
            if not self.stats
            else (f"mean attention density {self.mean_density:.3f} (sparse steps {self.sparse_density:.3f})")
        )
        where = f" -> {self.output}" if self.output else ""
        return (
            f"{len(self.step_seconds)} steps, {self.seconds_per_step:.3f} s/step, {self.seconds:.1f} s in all, "
            f"{dense}{where}"
        )


def _natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in name.replace(".", " ").split()]


def generate(
    pipe,
    prompt: str,
    *,
    handle=None,
    seed: int = 0,
    output: str | os.PathLike[str] | None = None,
    fps: int | None = None,
    on_step: StepCallback | None = None,
    **call_kwargs: Any,
) -> GenerationResult:
    """Run ``pipe(prompt, ...)`` once, timing each step; optionally write the video to ``output`` (mp4).

    handle:      the ``PSAHandle`` of ``enable_psa`` (or ``PSALora.handle``) to read statistics from;
                 None for a dense run. PSA itself is enabled or not by the caller.
    seed:        seeds the pipeline's ``generator`` (CPU generator: the same noise on every device).
    call_kwargs: passed to the pipeline, e.g. ``num_inference_steps``, ``guidance_scale``, ``height``.
    """
    call_kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
    call_kwargs.setdefault("output_type", "np")
    num_steps = call_kwargs.get("num_inference_steps") or 50
    clock = StepClock(pipe, on_step, num_steps)
    start = time.perf_counter()
    with clock:
        out = pipe(prompt, callback_on_step_end=clock.callback, **call_kwargs)
    seconds = time.perf_counter() - start
    frames = _frames_array(out.frames[0])
    stats = handle.stats() if handle is not None else {}
    path = None
    if output is not None:
        family = getattr(handle, "family", None) or _family_of_pipe(pipe)
        path = write_mp4(frames, output, fps=fps or FPS.get(family, 8))
    return GenerationResult(frames=frames, seconds=seconds, step_seconds=clock.seconds, stats=stats, output=path)


def _family_of_pipe(pipe) -> str | None:
    name = type(getattr(pipe, "transformer", None)).__name__
    return "cogvideox" if name.startswith("CogVideoX") else "wan" if name.startswith("Wan") else None


def _frames_array(frames: Any) -> np.ndarray:
    if isinstance(frames, torch.Tensor):
        frames = frames.float().cpu().numpy()
    if isinstance(frames, list):
        frames = np.stack(
            [np.asarray(f, dtype=np.float32) / (255.0 if np.asarray(f).dtype == np.uint8 else 1.0) for f in frames]
        )
    return np.asarray(frames, dtype=np.float32)


def write_mp4(frames: np.ndarray, path: str | os.PathLike[str], *, fps: int = 8) -> Path:
    """Write ``[F, H, W, 3]`` frames in [0, 1] as an H.264 mp4 (imageio's bundled ffmpeg; works offline).

    Height and width should be multiples of 16 (the codec's macro block); others are padded by ffmpeg.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (the ffmpeg binary imageio writes mp4 with)
    except ImportError:
        return _write_mp4_opencv(data, path, fps)
    with imageio.get_writer(path, fps=fps, codec="libx264", quality=8, macro_block_size=16) as writer:
        for frame in data:
            writer.append_data(frame)
    return path


@functools.cache
def _warn_opencv_once() -> None:
    logger.warning("imageio-ffmpeg is not installed: writing mp4 files with OpenCV's mp4v codec")


def _write_mp4_opencv(data: np.ndarray, path: Path, fps: int) -> Path:
    try:
        import cv2
    except ImportError:
        raise ImportError("writing mp4 needs imageio-ffmpeg (pip install imageio-ffmpeg) or OpenCV") from None
    logger.debug("imageio-ffmpeg is not installed: writing %s with OpenCV's mp4v codec", path)
    _warn_opencv_once()
    height, width = data.shape[1:3]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    for frame in data:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    """``||a - b|| / ||b||`` (L2 over all elements)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


# ----------------------------------------------------------------------------------------------- arguments


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


_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
_DTYPES.update({"float32": torch.float32, "fp32": torch.float32})


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
        from .presets import list_presets, load_preset

        if args.preset not in list_presets() and not Path(args.preset).is_file():
            parser.error(f"--preset {args.preset!r}: not a built-in preset ({', '.join(list_presets())}) nor a file")
        if args.preset not in list_presets():
            try:
                load_preset(args.preset)
            except ValueError as err:
                parser.error(str(err))


def resolve_preset(name_or_path: str):
    """A built-in preset by name, or a user preset file (.json/.yaml)."""
    from .presets import get_preset, list_presets, load_preset

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

    lora: a hub id or local path of a PSA LoRA (``load_psa_lora``: its preset, scheduler, steps and
          guidance then apply; ``--dense`` keeps the LoRA and scheduler and drops PSA), or None.
    The preset's family and the LoRA file are checked before the (large) pipeline is loaded.
    """
    from .diffusers.lora import DEFAULT_PRESET, DEFAULT_WEIGHT_NAME, load_psa_lora, resolve_lora_file

    family = pipeline_family(args.model)
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
        from .diffusers import enable_psa

        handle = None if args.dense else enable_psa(pipe, preset=preset)
    call = call_arguments(args, preset)
    logger.info("generating: %s", call)
    return generate(pipe, args.prompt, handle=handle, seed=args.seed, output=args.output, on_step=on_step, **call)
