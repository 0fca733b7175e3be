"""Run a pipeline once with per-step timing and PSA statistics, and write the video: ``generate``.

    result = generate(pipe, "a cat walks in the rain", handle=handle, output="cat.mp4")
    result.summary()      # seconds per step, mean density

Nothing here prints: progress goes to an ``on_step`` callback, messages to ``logging``. The mp4 is
written by diffusers' ``export_to_video`` (imageio with the ffmpeg binary of imageio-ffmpeg).
"""

from __future__ import annotations

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

from .diffusers.families import FPS, family_of_pipeline

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, int, float], None]
"""``on_step(step_index, num_steps, seconds_of_that_step)``, called after every denoising step."""

MP4_QUALITY = 8.0
"""imageio/ffmpeg quality of the mp4s written (0 to 10)."""


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
    fps:         frame rate of the mp4 (default: the model family's, ``FPS``).
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
        path = _write_mp4(frames, Path(output), fps or FPS.get(family_of_pipeline(pipe), 8))
    return GenerationResult(frames=frames, seconds=seconds, step_seconds=clock.seconds, stats=stats, output=path)


def _frames_array(frames: Any) -> np.ndarray:
    if isinstance(frames, torch.Tensor):
        frames = frames.float().cpu().numpy()
    if isinstance(frames, list):
        frames = np.stack(
            [np.asarray(f, dtype=np.float32) / (255.0 if np.asarray(f).dtype == np.uint8 else 1.0) for f in frames]
        )
    return np.asarray(frames, dtype=np.float32)


def _write_mp4(frames: np.ndarray, path: Path, fps: int) -> Path:
    """``[F, H, W, 3]`` frames in [0, 1] to an mp4 through diffusers' ``export_to_video``.

    Height and width should be multiples of 16 (the codec's macro block); others are scaled up by ffmpeg.
    """
    from diffusers.utils import export_to_video

    path.parent.mkdir(parents=True, exist_ok=True)
    # export_to_video scales by 255 and casts to uint8 without clipping: out-of-range values would wrap
    export_to_video(list(np.clip(frames, 0.0, 1.0)), str(path), fps=fps, quality=MP4_QUALITY)
    logger.debug("wrote %s (%d frames, %d fps)", path, len(frames), fps)
    return path
