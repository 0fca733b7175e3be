"""PSAState: what one ``enable_psa`` knows while a pipeline runs -- the budget schedule, the current
denoising step and token grid (written by the step hook), and the per-step, per-layer statistics.

One state is shared by every processor and every hook of one ``enable_psa`` call, so Wan2.2's two
experts count steps on one clock. Forward calls are sequential: the hook opens a forward
(``begin_forward``), the processors read it (``current``) and record what they did (``record``),
the hook closes it (``end_forward``).

A *run* is one pipeline call. With a pipeline, the step index is the position of the timestep in the
scheduler's ``timesteps`` and the run length is their number. Without one (a bare transformer), a
timestep lower than the previous one is the next step, an equal one is the same step (guidance
run as a second call), a higher one starts a new run; the schedule then assumes the preset's
``num_steps``. With a scheduler, a run ends when its last step has seen as many forward calls as
the step before it (one per step with batched guidance, two with Wan's separate cond/uncond
calls); without one, when the next run starts or PSA is disabled. A finished run logs one INFO
line with its mean density.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import PSAConfig

logger = logging.getLogger(__name__)

DENSE_STEP = "dense step (preset schedule)"
"""``LayerStats.reason`` of a layer that ran dense because the preset's schedule says so."""


@dataclass(frozen=True)
class ForwardInfo:
    """One transformer forward call, as the step hook saw it.

    transformer: the pipeline attribute of the transformer ("transformer", "transformer_2").
    step:        denoising step index in the run (0-based).
    num_steps:   steps in the run (None when unknown).
    timestep:    the timestep value of the call.
    grid:        ``(T, H, W)`` latent token grid after patching.
    """

    transformer: str
    step: int
    num_steps: int | None
    timestep: float
    grid: tuple[int, int, int] | None


@dataclass(frozen=True)
class LayerStats:
    """What one self-attention layer did during one denoising step.

    density: mean FLOP-weighted attention density over the step's calls (1.0 = dense).
    dense:   True when every call of the step ran dense attention.
    reason:  why it ran dense (e.g. ``DENSE_STEP``, "attention mask"); None when sparse.
    calls:   number of calls in the step (2 with Wan's separate cond/uncond calls).
    """

    density: float
    dense: bool
    reason: str | None
    calls: int


@dataclass
class _Accumulator:
    densities: list[Any] = field(default_factory=list)  # floats or 0-d tensors (no host sync while running)
    dense_calls: int = 0
    reasons: list[str] = field(default_factory=list)

    def freeze(self) -> LayerStats:
        values = [float(d) for d in self.densities]
        calls = len(values)
        reasons = sorted(set(self.reasons))
        return LayerStats(
            density=sum(values) / calls,
            dense=self.dense_calls == calls,
            reason="; ".join(reasons) if reasons else None,
            calls=calls,
        )


@dataclass
class _Run:
    num_steps: int | None
    from_scheduler: bool = False  # num_steps is the scheduler's: the run's end is known
    step: int = -1
    timestep: float | None = None
    forwards: dict[int, int] = field(default_factory=dict)
    stats: dict[int, dict[str, _Accumulator]] = field(default_factory=dict)
    finished: bool = False


class PSAState:
    """Shared, mutable state of one ``enable_psa``: schedule, clock, statistics.

    schedule:  a ``PSAConfig`` (sparse at every step) or a preset (``config_for_step``).
    timesteps: a callable giving the scheduler's current ``timesteps`` (or None), for pipelines.
    """

    def __init__(self, schedule: Any, *, timesteps: Callable[[], Any] | None = None) -> None:
        self.schedule = schedule
        self._timesteps = timesteps
        self._current: ForwardInfo | None = None
        self._run: _Run | None = None
        self._cached_timesteps: tuple[Any, torch.Tensor] | None = None  # (scheduler's tensor, host copy)
        self.logged: set[str] = set()
        """Fallback causes already logged by this state's processors (one line per cause)."""

    # -------------------------------------------------------------- schedule
    @property
    def steady_config(self) -> PSAConfig:
        """The sparse-step budget (what a processor uses when it does not know the step)."""
        return self.schedule if isinstance(self.schedule, PSAConfig) else self.schedule.config

    @property
    def default_num_steps(self) -> int | None:
        return None if isinstance(self.schedule, PSAConfig) else self.schedule.num_steps

    def config_for(self, info: ForwardInfo | None) -> tuple[PSAConfig | None, str | None]:
        """``(config, None)`` for a sparse call, ``(None, reason)`` for a dense one."""
        if info is None or isinstance(self.schedule, PSAConfig):
            return self.steady_config, None
        num_steps = info.num_steps or self.schedule.num_steps
        config = self.schedule.config_for_step(min(info.step, num_steps - 1), num_steps)
        return (config, None) if config is not None else (None, DENSE_STEP)

    # -------------------------------------------------------------- clock
    @property
    def current(self) -> ForwardInfo | None:
        """The transformer forward in progress, None outside one."""
        return self._current

    def begin_forward(self, transformer: str, timestep: float, grid: tuple[int, int, int] | None) -> ForwardInfo:
        """Open a forward call of ``transformer`` at ``timestep``: find its step, start a run if needed."""
        run = self._run if self._run is not None and not self._run.finished else None
        matched = self._match_scheduler(timestep, run)
        if matched is not None:
            step, num_steps = matched
            new_run = run is None or step < run.step or (step == run.step and timestep != run.timestep)
        else:
            num_steps = self.default_num_steps
            if run is not None and timestep == run.timestep:
                step, new_run = run.step, False
            elif run is not None and timestep < run.timestep:
                step, new_run = run.step + 1, False
            else:
                step, new_run = 0, True
        if new_run:
            self._finish(self._run)
            run = self._run = _Run(num_steps=num_steps, from_scheduler=matched is not None)
        run.step, run.timestep, run.num_steps = step, timestep, num_steps
        run.forwards[step] = run.forwards.get(step, 0) + 1
        self._current = ForwardInfo(transformer, step, num_steps, timestep, grid)
        return self._current

    def _match_scheduler(self, timestep: float, run: _Run | None) -> tuple[int, int] | None:
        """``(step, num_steps)`` from the scheduler's timesteps, None when they do not hold ``timestep``."""
        timesteps = self._timesteps() if self._timesteps is not None else None
        if timesteps is None or len(timesteps) == 0:
            return None
        if self._cached_timesteps is None or self._cached_timesteps[0] is not timesteps:
            self._cached_timesteps = (timesteps, torch.as_tensor(timesteps).detach().flatten().double().cpu())
        values = self._cached_timesteps[1]
        close = torch.isclose(values, torch.tensor(timestep, dtype=torch.float64), rtol=1e-6, atol=1e-6)
        candidates = close.nonzero().flatten().tolist()
        if not candidates:
            return None
        if run is not None and timestep == run.timestep and run.step in candidates:
            return run.step, len(values)  # the same step again: guidance's second call
        later = [c for c in candidates if run is not None and c > run.step]
        return (later[0] if later else candidates[0]), len(values)

    def end_forward(self) -> None:
        """Close the forward call; finish the run after the last forward of its last step (known only
        when the step comes from the scheduler; otherwise the next run or ``flush`` finishes it)."""
        run, self._current = self._run, None
        if run is None or run.finished or not run.from_scheduler or run.step != run.num_steps - 1:
            return
        per_step = run.forwards.get(run.step - 1, 1)
        if run.forwards[run.step] >= per_step:
            self._finish(run)

    def _finish(self, run: _Run | None) -> None:
        if run is None or run.finished:
            return
        run.finished = True
        if not run.stats:
            return
        stats = _freeze(run)
        values = [s.density for layers in stats.values() for s in layers.values()]
        dense_steps = sum(all(s.dense for s in layers.values()) for layers in stats.values())
        layers = max(len(v) for v in stats.values())
        logger.info(
            "PSA: %d step(s) x %d layer(s), mean attention density %.4f (sparsity %.4f), %d dense step(s)",
            len(stats),
            layers,
            sum(values) / len(values),
            1.0 - sum(values) / len(values),
            dense_steps,
        )

    def flush(self) -> None:
        """Finish the run in progress (logging its line), e.g. when PSA is disabled."""
        self._finish(self._run)
        self._current = None

    # -------------------------------------------------------------- statistics
    def record(self, layer: str, density: Any, reason: str | None) -> None:
        """Note one attention call of ``layer`` in the current step: its density (float or 0-d
        tensor) and, for a dense call, why (``reason`` None means it ran sparse)."""
        if self._current is None or self._run is None:
            return
        acc = self._run.stats.setdefault(self._current.step, {}).setdefault(layer, _Accumulator())
        acc.densities.append(density.detach() if isinstance(density, torch.Tensor) else float(density))
        if reason is not None:
            acc.dense_calls += 1
            acc.reasons.append(reason)

    def stats(self) -> dict[int, dict[str, LayerStats]]:
        """Per step, per layer statistics of the run in progress, or else of the last finished run."""
        return _freeze(self._run) if self._run is not None else {}


def _freeze(run: _Run) -> dict[int, dict[str, LayerStats]]:
    return {
        step: {layer: acc.freeze() for layer, acc in sorted(layers.items())}
        for step, layers in sorted(run.stats.items())
    }


def mean_density(stats: dict[int, dict[str, LayerStats]]) -> float:
    """Mean density over every (step, layer) of ``stats``; NaN when empty."""
    values = [s.density for layers in stats.values() for s in layers.values()]
    return sum(values) / len(values) if values else math.nan
