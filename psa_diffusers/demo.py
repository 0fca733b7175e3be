"""The offline demo: tiny random-weight CogVideoX and Wan pipelines, each run dense and with PSA.

``psa-diffusers demo --output DIR`` calls ``run_demo``. Nothing is downloaded: the pipelines are built
in code (``diffusers/tiny.py``) at a size where PSA has work to do (by default 160 x 176 pixels and 17
frames: a 5 x 20 x 22 latent grid, 2,200 video tokens, 18 x 18 blocks of 128), with the published
presets ``cogvideox-5b`` and ``wan2.1-1.3b`` (their dense first steps scaled to the run's length).
The weights are random, so the videos are coloured noise: the demo shows the machinery (which steps
run sparse, the density of every layer, the level map one layer chose, the time), not video quality.

Files written to the output folder:
    cogvideox_dense.mp4, cogvideox_psa.mp4, wan_dense.mp4, wan_psa.mp4
    level_maps.png   the level map (skip / full / 2x / 4x / 8x per block) of one layer at the last step
    density.png      attention density per denoising step and self-attention layer
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from .generation import GenerationResult, generate

logger = logging.getLogger(__name__)

FAMILIES = ("cogvideox", "wan")
PRESETS = {"cogvideox": "cogvideox-5b", "wan": "wan2.1-1.3b"}
TITLES = {"cogvideox": "CogVideoX", "wan": "Wan2.1"}
PROMPT = "a cat walks in the rain"  # words of the tiny tokenizer's vocabulary
NEGATIVE_PROMPT = "blue sky"

LEVEL_COLOURS = {0: "#f2f2f2", 1: "#08306b", 2: "#2171b5", 4: "#6baed6", 8: "#c6dbef"}
LEVEL_NAMES = {0: "skipped", 1: "full", 2: "pooled 2x", 4: "pooled 4x", 8: "pooled 8x"}

Progress = Callable[[str], None]


@dataclass(frozen=True)
class DemoSettings:
    """Size of the demo run. The defaults give 5 x 20 x 22 = 2,200 video tokens per model, 8 steps
    (the presets' dense first 30% -> 2 dense, 6 sparse); about a minute on a 2-core CPU."""

    height: int = 160
    width: int = 176
    num_frames: int = 17
    steps: int = 8
    seed: int = 0
    families: tuple[str, ...] = FAMILIES
    device: str | None = None  # default: CUDA where available, else CPU
    psa_overrides: tuple[tuple[str, Any], ...] = ()
    """PSAConfig fields replacing the presets' (e.g. ``(("block_q", 64), ("block_kv", 32))`` for small runs)."""

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            if value < 16 or value % 16:
                raise ValueError(f"DemoSettings.{name}={value}: must be a positive multiple of 16")
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            raise ValueError(f"DemoSettings.num_frames={self.num_frames}: must be 4k + 1 (1, 5, 9, 13, 17, ...)")
        if self.steps < 1:
            raise ValueError(f"DemoSettings.steps={self.steps}: must be >= 1")
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise ValueError(f"DemoSettings.families={self.families}: allowed values are {FAMILIES}")

    @property
    def grid(self) -> tuple[int, int, int]:
        """Latent token grid ``(T, H, W)``: VAE factors 4 in time and space, patches of 2 in space."""
        return ((self.num_frames - 1) // 4 + 1, self.height // 8, self.width // 8)


@dataclass
class DemoRun:
    """One pipeline run of the demo."""

    family: str
    mode: str  # "dense" or "PSA"
    result: GenerationResult
    difference: float = 0.0  # relative L2 difference of the video from the dense one


@dataclass
class LevelMapCapture:
    """The level map one self-attention layer used in one step (batch of the prompt, head 0)."""

    family: str
    layer: str
    step: int
    level_map: np.ndarray  # [query blocks, kv blocks] of 0, 1, 2, 4, 8
    density: float
    token_order: str
    text_len: int = 0


@dataclass
class DemoResult:
    settings: DemoSettings
    runs: list[DemoRun] = field(default_factory=list)
    level_maps: list[LevelMapCapture] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"


# ----------------------------------------------------------------------------------------------- demo


def run_demo(
    output_dir: str | Path, settings: DemoSettings | None = None, *, progress: Progress | None = None
) -> DemoResult:
    """Build, run and compare; write the videos and pictures to ``output_dir``; return what happened."""
    from .diffusers import enable_psa

    settings = settings or DemoSettings()
    say = progress or (lambda message: logger.info("%s", message))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result = DemoResult(settings, device=device.type)
    start = time.perf_counter()
    t, h, w = settings.grid
    for family in settings.families:
        say(
            f"{TITLES[family]}: tiny random-weight pipeline on {device.type}, {settings.num_frames} frames of "
            f"{settings.height}x{settings.width} -> {t}x{h}x{w} = {t * h * w:,} video tokens, "
            f"{settings.steps} steps, preset {PRESETS[family]}"
        )
        pipe = _tiny_pipeline(family, settings.seed).to(device)
        dense = _run(pipe, family, "dense", None, settings, out, say)
        handle = enable_psa(pipe, preset=PRESETS[family], **dict(settings.psa_overrides))
        layer_name, module = _last_self_attention(handle)
        capture = _InputCapture(handle, module, step=settings.steps - 1)
        try:
            with capture:
                psa = _run(pipe, family, "PSA", handle, settings, out, say)
        finally:
            handle.disable()
        psa.difference = relative_difference(psa.result.frames, dense.result.frames)
        result.runs += [dense, psa]
        result.files += [dense.result.output, psa.result.output]
        if capture.args is not None:
            result.level_maps.append(
                _level_map(family, layer_name, module, capture, handle.config, handle.stats(), settings.steps - 1)
            )
        say(
            f"  {TITLES[family]}: PSA mean density {psa.result.mean_density:.3f}, "
            f"relative difference from dense {psa.difference:.3f}"
        )
    say("drawing level_maps.png and density.png")
    result.files.append(plot_level_maps(result.level_maps, out / "level_maps.png"))
    result.files.append(plot_density(result.runs, out / "density.png"))
    result.seconds = time.perf_counter() - start
    return result


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    """``||a - b|| / ||b||`` (L2 over all elements)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def _tiny_pipeline(family: str, seed: int):
    from .diffusers.tiny import tiny_cogvideox_pipeline, tiny_wan_pipeline

    return tiny_cogvideox_pipeline(seed=seed) if family == "cogvideox" else tiny_wan_pipeline(seed=seed)


def _run(pipe, family: str, mode: str, handle, settings: DemoSettings, out: Path, say: Progress) -> DemoRun:
    from .diffusers.tiny import TINY_TEXT_LEN

    def on_step(step: int, num_steps: int, seconds: float) -> None:
        kind = ""
        if handle is not None:
            layers = handle.stats().get(step, {})
            if layers:
                mean = sum(s.density for s in layers.values()) / len(layers)
                kind = "  dense" if all(s.dense for s in layers.values()) else f"  density {mean:.3f}"
        say(f"  {TITLES[family]} {mode:5s} step {step + 1:2d}/{num_steps}  {seconds:6.2f} s{kind}")

    result = generate(
        pipe,
        PROMPT,
        handle=handle,
        seed=settings.seed,
        output=out / f"{family}_{mode.lower()}.mp4",
        negative_prompt=NEGATIVE_PROMPT,
        height=settings.height,
        width=settings.width,
        num_frames=settings.num_frames,
        num_inference_steps=settings.steps,
        max_sequence_length=TINY_TEXT_LEN,
        on_step=on_step,
    )
    return DemoRun(family, mode, result)


def _last_self_attention(handle) -> tuple[str, torch.nn.Module]:
    from .diffusers.enable import self_attention_layers

    attr, model = next(iter(handle.transformers.items()))
    name, module = list(self_attention_layers(model).items())[-1]
    return f"{attr}.{name}", module


class _InputCapture:
    """A forward pre-hook on one attention module keeping its inputs at one denoising step
    (the first call of the step: CogVideoX's batched guidance call, Wan's conditional call)."""

    def __init__(self, handle, module: torch.nn.Module, step: int) -> None:
        self.handle, self.module, self.step = handle, module, step
        self.args: tuple | None = None
        self.kwargs: dict | None = None
        self._hook = None

    def _pre(self, module, args, kwargs):
        info = self.handle.state.current
        if self.args is None and info is not None and info.step == self.step:
            self.args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            self.kwargs = dict(kwargs)

    def __enter__(self) -> _InputCapture:
        self._hook = self.module.register_forward_pre_hook(self._pre, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hook.remove()


class _SDPACapture(TorchFunctionMode):
    """Records q, k, v of every ``scaled_dot_product_attention`` call inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            named = dict(zip(("query", "key", "value"), args))
            named.update({k: v for k, v in kwargs.items() if k in ("query", "key", "value")})
            self.calls.append((named["query"], named["key"], named["value"]))
        return func(*args, **kwargs)


def _level_map(family, layer, module, capture: _InputCapture, config, stats, step) -> LevelMapCapture:
    """The level map PSA built for ``module`` at ``step``: re-run the layer's stock processor on the
    captured inputs to get its q, k, v, then build the mask exactly as the PSA processor does."""
    from .attention import psa_attention

    with torch.no_grad(), _SDPACapture() as sdpa:
        module(*capture.args, **capture.kwargs)
    q, k, v = sdpa.calls[0]
    text_len = 0
    ehs = capture.kwargs.get("encoder_hidden_states")
    if family == "cogvideox" and ehs is not None:  # stock order is [text, video]; PSA puts text last
        text_len = ehs.shape[1]
        q, k, v = (torch.cat([t[:, :, text_len:], t[:, :, :text_len]], dim=2) for t in (q, k, v))
    # under enable_psa the video tokens reach the layer already in the config's order (the token-order
    # hooks permute them once per forward), so the mask is built on them as they are
    _, mask = psa_attention(q, k, v, config.replace(token_order="none"), text_len=text_len, return_mask=True)
    level_map = mask.to_level_map()[-1, 0].cpu().numpy()
    density = stats.get(step, {}).get(layer)
    return LevelMapCapture(
        family=family,
        layer=layer,
        step=step,
        level_map=level_map,
        density=density.density if density is not None else math.nan,
        token_order=config.token_order,
        text_len=text_len,
    )


# ----------------------------------------------------------------------------------------------- pictures


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - matplotlib is in the 'plots' extra
        raise ImportError("the demo's pictures need matplotlib: pip install 'psa-diffusers[plots]'") from err
    return plt


def plot_level_maps(captures: list[LevelMapCapture], path: Path) -> Path:
    """One panel per model: the level of every (query block, KV block) pair, one colour per level."""
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    levels = list(LEVEL_COLOURS)
    cmap = ListedColormap([LEVEL_COLOURS[lv] for lv in levels])
    norm = BoundaryNorm([-0.5, 0.5, 1.5, 3, 6, 9], cmap.N)
    panels = max(1, len(captures))
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 6.0), squeeze=False)
    fig.subplots_adjust(left=0.08, right=0.97, top=0.88, bottom=0.17, wspace=0.3)
    for ax, cap in zip(axes[0], captures):
        ax.imshow(cap.level_map, cmap=cmap, norm=norm, interpolation="nearest")
        order = "Gilbert token order" if cap.token_order == "gilbert" else "raster token order"
        text = ", text tokens in the last block" if cap.text_len else ""
        ax.set_title(
            f"{TITLES[cap.family]}: {cap.layer}, step {cap.step + 1}, head 0\n{order}{text}; density {cap.density:.2f}",
            fontsize=9,
        )
        ax.set_xlabel("KV block")
        ax.set_ylabel("query block")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.legend(
        handles=[Patch(facecolor=LEVEL_COLOURS[lv], edgecolor="0.5", label=LEVEL_NAMES[lv]) for lv in levels],
        loc="lower center",
        ncol=len(levels),
        frameon=False,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_density(runs: list[DemoRun], path: Path) -> Path:
    """One heat map per model: attention density per denoising step (columns) and layer (rows)."""
    plt = _pyplot()
    psa_runs = [r for r in runs if r.mode == "PSA"]
    panels = max(1, len(psa_runs))
    fig, axes = plt.subplots(panels, 1, figsize=(9, 0.6 + 2.2 * panels), squeeze=False, layout="constrained")
    image = None
    for ax, run in zip(axes[:, 0], psa_runs):
        steps, layers, table = run.result.density_table()
        image = ax.imshow(table.T, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(steps)), [str(s + 1) for s in steps])
        ax.set_yticks(range(len(layers)), [_short_layer(name) for name in layers])
        for (i, j), value in np.ndenumerate(table):
            ax.text(i, j, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w" if value < 0.6 else "k")
        ax.set_title(
            f"{TITLES[run.family]}, preset {PRESETS[run.family]}: attention density per step and layer", fontsize=9
        )
        ax.set_xlabel("denoising step (1.00 = dense)", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes[:, 0].tolist(), label="density")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short_layer(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[-3:-1]) if len(parts) >= 3 else name


# ----------------------------------------------------------------------------------------------- table


def format_table(result: DemoResult) -> str:
    """The summary table: per model and mode, time, seconds per step, density, difference from dense."""
    header = ("model", "attention", "time (s)", "s/step", "mean density", "sparse-step density", "rel. diff vs dense")
    rows = []
    for run in result.runs:
        r = run.result
        psa = run.mode == "PSA"
        rows.append(
            (
                TITLES[run.family],
                run.mode,
                f"{r.seconds:.2f}",
                f"{r.seconds_per_step:.3f}",
                f"{r.mean_density:.3f}" if psa else "1.000",
                f"{r.sparse_density:.3f}" if psa else "-",
                f"{run.difference:.3f}" if psa else "-",
            )
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "  ".join("-" * w for w in widths)
    fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*header), line, *(fmt.format(*row) for row in rows)]
    lines.append(
        "density: FLOP-weighted share of dense attention (dense steps count 1.0); rel. diff: relative L2 "
        "difference of the video from the dense run."
    )
    if result.device != "cuda":
        lines.append(
            "On CPU, PSA runs the plain PyTorch reference (exact, not fast): it is slower than dense here. "
            "Speed is measured on a CUDA GPU with the Triton kernels."
        )
    return "\n".join(lines)
