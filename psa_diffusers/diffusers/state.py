"""PSAState: what one ``enable_psa`` knows while a pipeline runs -- the budget schedule, the current
denoising step and token grid (written by the step hook), and the per-step, per-layer statistics.

One state is shared by every processor and every hook of one ``enable_psa`` call, so Wan2.2's two
experts count steps on one clock. Forward calls are sequential: the step hook opens a forward
(``begin_forward``), which fixes the forward's :class:`ForwardPlan` and writes each layer's action
(``library.SPARSE``, ``DENSE``, ``DENSE_MEASURED``) into its processor's CPU ``control``; the
processors read that plan and their control, and leave what they did on themselves
(``last_density``, ``last_reason``); the hook closes the forward (``end_forward``), collecting those
into the run's records.

Everything here runs on the host and reads no device tensor while a pipeline runs (docs/design.md,
section 5): the step comes from the host (:class:`Position`), and the per-head mask densities stay on
the device until ``stats()`` (or the end-of-run INFO line, when INFO is enabled) reads them, once.

A *run* is one pipeline call: it starts when a forward cannot continue the open run (an earlier step,
another schedule tensor, or a call name already seen at this step) and ends when the pipeline resets
its stateful hooks at the end of the call (``finish_run``), when the next run starts, or when PSA is
disabled. A finished run logs one INFO line with its mean density.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import PSAConfig
from ..library import DENSE, DENSE_MEASURED, SPARSE
from .logs import get_logger

logger = get_logger(__name__)

DENSE_STEP = "dense step (preset schedule)"
"""``LayerStats.reason`` of a layer that ran dense because the preset's schedule says so."""
CROSS_ATTENTION = "cross-attention"
IMAGE_CONTEXT = "image-context attention"
ATTENTION_MASK = "attention mask"
DENSE_FALLBACK = "dense fallback (mask too dense to beat dense attention)"
"""``LayerStats.reason`` of a layer some or all of whose heads had masks too dense to be worth the sparse
kernel, and ran dense attention (docs/design.md, section 5)."""
SCHEDULED = "scheduled"
"""``PSAProcessor.last_reason`` when the call ran the op ``psa.attention_or_dense``: what it did is the
action the state wrote into the processor's ``control``."""
REMEASURE_EVERY = 8
"""A layer whose every head is in the dense fallback builds its mask (to measure it again) at every
REMEASURE_EVERY-th forward only; in the others it runs dense attention and builds nothing."""
DENSE_FALLBACK_DENSITY = 0.6
"""Default threshold of the dense fallback: a head whose mask had a FLOP density above this, two
forwards earlier, runs dense attention. About where a PSA call stops beating cuDNN's dense attention:
by docs/benchmarks.md (H100, Wan2.1-1.3B 480p), a whole call at density 0.152 takes 0.27 of dense's
time, so one at density d about 1.8 d of it (break-even near 0.55-0.6; to be measured per GPU)."""
EXPECTED_CAUSES = frozenset({DENSE_STEP, DENSE_FALLBACK, CROSS_ATTENTION, IMAGE_CONTEXT})
"""Causes of a dense computation that are part of the design (logged at INFO, the schedule's not at all);
any other cause is logged as a warning, once per ``enable_psa``."""


@dataclass(frozen=True)
class Position:
    """Where a transformer forward stands in its denoising run, as the host knows it (no device read).

    step:      the step index, when the pipeline tells it (cache context) or the timestep is an element
               of the run's schedule tensor; None otherwise.
    num_steps: the run's length, when known.
    call:      the cache context's name ("cond", "uncond", "cond_uncond"), None without one.
    schedule:  the run's timesteps tensor, when the timestep is a view of it (its identity marks the run).
    timestep:  the timestep's value, read only when nothing else tells the step.
    """

    step: int | None = None
    num_steps: int | None = None
    call: str | None = None
    schedule: torch.Tensor | None = None
    timestep: float | None = None


@dataclass(frozen=True)
class ForwardInfo:
    """One transformer forward call, as the step hook saw it.

    transformer: the pipeline attribute of the transformer ("transformer", "transformer_2").
    step:        denoising step index in the run (0-based).
    num_steps:   steps in the run (None when unknown).
    grid:        ``(T, H, W)`` latent token grid after patching (None when unknown).
    token_order: "gilbert" when the step hook has put the video tokens in Gilbert-curve order for this
                 forward (the blocks see curve order), else "raster".
    call:        the pipeline's cache-context name, None without one.
    """

    transformer: str
    step: int
    num_steps: int | None
    grid: tuple[int, int, int] | None
    token_order: str = "raster"
    call: str | None = None


@dataclass(frozen=True)
class ForwardPlan:
    """What every PSA processor does during one transformer forward: the only state they read.

    config: the budget of a sparse forward, None for a dense one.
    reason: why the forward is dense (``DENSE_STEP``), None when sparse.
    grid:   the ``(T, H, W)`` grid along whose Gilbert curve the video tokens have been reordered before
            the first block, None when the blocks see raster order.

    Plans are interned per state, so consecutive steps with the same budget share one object: under
    ``torch.compile`` the guards on a plan change once per run, at the dense-to-sparse switch.
    """

    config: PSAConfig | None
    reason: str | None
    grid: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class LayerStats:
    """What one self-attention layer did during one denoising step.

    density: mean FLOP-weighted attention density over the step's calls, as computed (1.0 = dense).
    dense:   True when every call of the step ran dense attention.
    reason:  why it ran dense (e.g. ``DENSE_STEP``, ``DENSE_FALLBACK``, "attention mask"); None when sparse.
    calls:   number of calls in the step (2 with Wan's separate cond/uncond calls).
    mask_density: mean FLOP density of the masks built in the step's calls (for a dense fallback: the
             mask that was judged too dense); None when no mask was built.
    dense_heads: mean number of heads per call that ran dense attention: all of them on a dense call,
             some when the dense fallback took only the heads whose masks were too dense (``reason``
             ``DENSE_FALLBACK``, ``dense`` False).
    """

    density: float
    dense: bool
    reason: str | None
    calls: int
    mask_density: float | None = None
    dense_heads: float = 0.0


@dataclass
class _Record:
    """One forward of one transformer: per layer the dense cause (None: sparse), the heads the dense
    fallback ran dense (None: none, or the whole call), the number of heads, and whether it left mask
    densities; those densities, ``[layers with a mask, H]`` in order, as one device tensor (or None)."""

    step: int
    layers: tuple[str, ...]
    reasons: tuple[str | None, ...]
    flags: tuple[tuple[bool, ...] | None, ...]
    heads: tuple[int, ...]
    measured: tuple[bool, ...]
    densities: torch.Tensor | None


@dataclass
class _Pending:
    """The mask densities of one forward on their way to the host (pinned memory, an event), for the
    dense fallback's decisions two forwards later."""

    layers: tuple[str, ...]
    host: torch.Tensor | None  # None: a forward that measured nothing
    event: Any  # torch.cuda.Event recorded after the copy, None for a CPU tensor

    def values(self) -> tuple[list[list[float]], bool]:
        """The densities, per layer and head, and whether reading them had to wait for the device."""
        if self.host is None:
            return [], False
        waited = False
        if self.event is not None:
            waited = not self.event.query()
            self.event.synchronize()
        return self.host.tolist(), waited


@dataclass
class _Run:
    num_steps: int | None
    schedule: Any = None  # weakref to the run's timesteps tensor, or None
    value_clock: bool = False  # steps counted from timestep values (nothing else told them)
    step: int = -1
    timestep: float | None = None
    calls: set = field(default_factory=set)  # (transformer, call) seen at the current step
    records: list[_Record] = field(default_factory=list)
    finished: bool = False
    frozen: tuple[int, dict] | None = None  # (records frozen, stats) cache

    def continues(self, transformer: str, position: Position) -> bool:
        """Whether a forward at ``position`` belongs to this run."""
        if self.finished:
            return False
        if position.schedule is not None and self.schedule is not None and self.schedule() is not position.schedule:
            return False
        if position.step is None:  # value clock: same or lower timestep
            return self.value_clock and self.timestep is not None and position.timestep <= self.timestep
        if self.value_clock or position.step < self.step:
            return False
        if position.step == self.step and position.call is not None:
            return (transformer, position.call) not in self.calls
        return True


class PSAState:
    """Shared, mutable state of one ``enable_psa``: schedule, clock, statistics.

    schedule: a ``PSAConfig`` (sparse at every step) or a preset (``config_for_step``).
    dense_fallback: the FLOP density above which a layer's mask counts as too dense to beat dense
        attention (``DENSE_FALLBACK_DENSITY``), None to never fall back.
    """

    def __init__(self, schedule: Any, *, dense_fallback: float | None = DENSE_FALLBACK_DENSITY) -> None:
        self.schedule = schedule
        self.dense_fallback = dense_fallback
        self.fallback_waits = 0
        """Forwards at whose start reading older densities had to wait for the device (should stay 0)."""
        self._layers: dict[str, list[tuple[str, Any, Any, int]]] = {}
        self._actions: dict[str, tuple[int, tuple[bool, ...] | None, str | None]] = {}
        """Per layer, this forward's (action, dense-head flags, why it is dense: None, DENSE_STEP or DENSE_FALLBACK)."""
        self._fallback: dict[str, tuple[bool, ...]] = {}
        self._fallback_age: dict[str, int] = {}  # forwards since a layer's whole-layer fallback began
        self._history: dict[str, deque] = {}
        self.plan: ForwardPlan | None = None
        """The plan of the forward in progress (None outside a forward): what the processors read."""
        self._current: ForwardInfo | None = None
        self._run: _Run | None = None
        self._plans: dict[tuple, ForwardPlan] = {}
        self.logged: set[str] = set()
        """Causes already logged for this state (one line per cause)."""

    # -------------------------------------------------------------- schedule
    @property
    def steady_config(self) -> PSAConfig:
        """The sparse-step budget (what a processor uses when it does not know the step)."""
        return self.schedule if isinstance(self.schedule, PSAConfig) else self.schedule.config

    @property
    def default_num_steps(self) -> int | None:
        return None if isinstance(self.schedule, PSAConfig) else self.schedule.num_steps

    def config_for(self, step: int, num_steps: int | None) -> tuple[PSAConfig | None, str | None]:
        """``(config, None)`` for a sparse step, ``(None, DENSE_STEP)`` for a dense one."""
        if isinstance(self.schedule, PSAConfig):
            return self.schedule, None
        num_steps = num_steps or self.schedule.num_steps
        config = self.schedule.config_for_step(min(step, num_steps - 1), num_steps)
        return (config, None) if config is not None else (None, DENSE_STEP)

    def _plan(self, config: PSAConfig | None, reason: str | None, grid) -> ForwardPlan:
        key = (config, reason, grid)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = ForwardPlan(config, reason, grid)
        return plan

    def register(self, transformer: str, layers: list[tuple[str, Any]]) -> None:
        """The ``(name, processor)`` self-attention layers of ``transformer``: the state writes their
        ``control`` at the start of each forward and collects what they did at its end."""
        entries = []
        for name, processor in layers:
            control = getattr(processor, "control", None)
            control = control.numpy() if control is not None else None
            entries.append((name, processor, control, len(control) - 1 if control is not None else 0))
        self._layers[transformer] = entries

    # -------------------------------------------------------------- clock
    @property
    def current(self) -> ForwardInfo | None:
        """The transformer forward in progress, None outside one."""
        return self._current

    def begin_forward(
        self,
        transformer: str,
        position: Position,
        grid: tuple[int, int, int] | None,
        *,
        reorder: bool,
        in_attention: bool = False,
    ) -> ForwardInfo:
        """Open a forward of ``transformer`` at ``position``: find its run and step, fix its plan.

        reorder: whether the step hook can put this forward's video tokens in Gilbert order; it does, for
        every forward of the run, when the sparse-step budget asks for that order and ``grid`` is known.
        in_attention: the processors put the tokens in Gilbert order inside attention instead, along
        ``ForwardInfo.grid`` (Ulysses context parallelism, where the blocks hold a share of the sequence).
        """
        run = self._run
        if run is None or not run.continues(transformer, position):
            self._finish(run)
            self._history.clear()
            self._fallback.clear()
            self._fallback_age.clear()
            run = self._run = _Run(
                num_steps=position.num_steps if position.step is not None else self.default_num_steps,
                schedule=weakref.ref(position.schedule) if position.schedule is not None else None,
                value_clock=position.step is None,
            )
        if position.step is not None:
            step = position.step
            if position.num_steps:
                run.num_steps = position.num_steps
        else:
            self.note(
                "unmatched step",
                f"a forward of {transformer} matches no denoising step (no cache-context step index, and its "
                "timestep is not an element of a scheduler's timesteps): steps are counted from timestep "
                "values, read on the host",
            )
            step = 0 if run.step < 0 else run.step + (position.timestep < run.timestep)
        if step != run.step:
            run.calls.clear()
        run.step, run.timestep = step, position.timestep
        run.calls.add((transformer, position.call))

        config, reason = self.config_for(step, run.num_steps)
        # Gilbert order for the whole run (dense steps too: attention does not care, and the plan the
        # compiled blocks guard on stays the same at the dense-to-sparse switch)
        order_grid = None
        if self.steady_config.token_order == "gilbert":
            if reorder and grid is not None:
                order_grid = grid
            elif config is not None and not (in_attention and grid is not None):
                self.note("no token grid", "the token grid is unknown: Gilbert order runs as raster order", transformer)
        self.plan = self._plan(config, reason, order_grid)
        self._decide(transformer, dense_step=config is None)
        self._current = ForwardInfo(
            transformer, step, run.num_steps, grid, "gilbert" if order_grid else "raster", position.call
        )
        return self._current

    def _decide(self, transformer: str, *, dense_step: bool) -> None:
        """Write each layer's action into its ``control``: dense on a dense step; else dense for the heads
        whose mask, two forwards of this transformer earlier, was denser than ``dense_fallback`` -- the
        whole call when that is every head."""
        history = self._history.get(transformer)
        if not dense_step and self.dense_fallback is not None and history is not None and len(history) == 2:
            pending = history[0]
            values, waited = pending.values()
            self.fallback_waits += waited
            for name, heads in zip(pending.layers, values):
                flags = tuple(value > self.dense_fallback for value in heads)
                if any(flags):
                    self._fallback[name] = flags
                else:
                    self._fallback.pop(name, None)
        for name, processor, control, _ in self._layers.get(transformer, ()):
            processor.last_density = processor.last_reason = None  # nothing left over from a failed forward
            flags = None if dense_step else self._fallback.get(name)
            if dense_step:
                action, why = DENSE, DENSE_STEP
            elif flags is not None and (all(flags) or control is None or len(flags) != len(control) - 1):
                # the whole layer falls back: its mask is built (to see whether it got sparser) only at
                # every REMEASURE_EVERY-th forward; in between it costs exactly dense attention
                age = self._fallback_age[name] = self._fallback_age.get(name, -1) + 1
                action, flags, why = (DENSE_MEASURED if age % REMEASURE_EVERY == 0 else DENSE), None, DENSE_FALLBACK
            else:
                self._fallback_age.pop(name, None)
                action, why = SPARSE, None if flags is None else DENSE_FALLBACK
            self._actions[name] = (action, flags, why)
            if control is not None:
                control[0] = action
                control[1:] = flags if flags is not None else 0

    def end_forward(self, transformer: str) -> None:
        """Close the forward of ``transformer``: collect what each of its processors did."""
        info, self._current, self.plan = self._current, None, None
        run = self._run
        names, reasons, flag_list, heads_list, measured, densities = [], [], [], [], [], []
        for name, processor, _, heads in self._layers.get(transformer, ()):
            density, reason = processor.last_density, processor.last_reason
            processor.last_density = processor.last_reason = None
            if density is None and reason is None:
                continue  # not called in this forward
            flags = None
            if reason == SCHEDULED:
                action, flags, reason = self._actions.get(name, (SPARSE, None, None))
                density = None if action == DENSE else density
            names.append(name)
            reasons.append(reason)
            flag_list.append(flags)
            heads_list.append(heads)
            measured.append(density is not None)
            if density is not None:
                densities.append(density.detach().to(torch.float64).reshape(-1))
            if reason is not None and reason != DENSE_STEP:
                self.note(reason, None, name)
        if info is None or run is None or not names:
            return
        stacked = torch.stack(densities) if densities else None  # [layers, H]: every layer has H heads
        record = _Record(info.step, *map(tuple, (names, reasons, flag_list, heads_list, measured)), stacked)
        run.records.append(record)
        if self.dense_fallback is not None:
            # one entry per forward, an empty one where nothing was measured: history[0] is always the
            # forward two earlier (a re-measurement is read two forwards after it, never later)
            layers = tuple(n for n, m in zip(names, measured) if m)
            pending = _pending(layers, stacked) if stacked is not None else _Pending((), None, None)
            if pending is not None:
                self._history.setdefault(transformer, deque(maxlen=2)).append(pending)

    def finish_run(self) -> None:
        """End the run in progress (the pipeline call is over): log its line; the next forward starts a run."""
        self._finish(self._run)
        self._current = self.plan = None

    flush = finish_run

    def _finish(self, run: _Run | None) -> None:
        if run is None or run.finished:
            return
        run.finished = True
        if not run.records or not logger.isEnabledFor(logging.INFO):
            return  # the line reads the densities on the host: only when it is shown
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

    # -------------------------------------------------------------- logging
    def note(self, cause: str, message: str | None, layer: str | None = None) -> None:
        """Log ``cause`` once per state. Without ``message`` the cause is a dense fallback."""
        if cause in self.logged:
            return
        self.logged.add(cause)
        where = f" (first seen in {layer})" if layer else ""
        level = logging.INFO if cause in EXPECTED_CAUSES else logging.WARNING
        logger.log(level, "PSA: %s%s", message or f"{cause} runs the stock dense computation", where)

    # -------------------------------------------------------------- statistics
    def stats(self) -> dict[int, dict[str, LayerStats]]:
        """Per step, per layer statistics of the run in progress, or else of the last finished run.

        Reads the run's densities from the device (one transfer per device), so call it when the
        numbers are wanted, not inside a step.
        """
        return _freeze(self._run) if self._run is not None else {}


def _freeze(run: _Run) -> dict[int, dict[str, LayerStats]]:
    if run.frozen is not None and run.frozen[0] == len(run.records):
        return run.frozen[1]
    values = _host_values([r.densities for r in run.records])
    steps: dict[int, dict[str, dict]] = {}
    for record, rows in zip(run.records, values):
        it = iter(rows)
        for name, reason, flags, heads, has_mask in zip(
            record.layers, record.reasons, record.flags, record.heads, record.measured
        ):
            acc = steps.setdefault(record.step, {}).setdefault(
                name, {"done": [], "mask": [], "dense": 0, "heads": [], "reasons": set()}
            )
            mask = next(it) if has_mask else None
            if flags is not None:  # some heads dense, the others sparse
                acc["done"].append(sum(1.0 if f else d for f, d in zip(flags, mask)) / len(mask))
                acc["heads"].append(sum(flags))
            elif reason is not None:  # the whole call dense
                acc["done"].append(1.0)
                acc["heads"].append(heads or len(mask or ()))
                acc["dense"] += 1
            else:
                acc["done"].append(sum(mask) / len(mask))
                acc["heads"].append(0)
            if mask:
                acc["mask"].append(sum(mask) / len(mask))
            if reason is not None:
                acc["reasons"].add(reason)
    stats = {
        step: {
            name: LayerStats(
                density=sum(a["done"]) / len(a["done"]),
                dense=a["dense"] == len(a["done"]),
                reason="; ".join(sorted(a["reasons"])) if a["reasons"] else None,
                calls=len(a["done"]),
                mask_density=sum(a["mask"]) / len(a["mask"]) if a["mask"] else None,
                dense_heads=sum(a["heads"]) / len(a["heads"]),
            )
            for name, a in sorted(layers.items())
        }
        for step, layers in sorted(steps.items())
    }
    run.frozen = (len(run.records), stats)
    return stats


def _pending(layers: tuple[str, ...], densities: torch.Tensor) -> _Pending | None:
    """Start copying ``densities`` to the host without waiting: pinned memory and an event on CUDA, the
    tensor itself on the CPU; None elsewhere (no asynchronous copy there: no dense fallback)."""
    if densities.device.type == "cpu":
        return _Pending(layers, densities, None)
    if densities.device.type != "cuda":
        return None
    host = torch.empty(densities.shape, dtype=densities.dtype, pin_memory=True)
    host.copy_(densities, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return _Pending(layers, host, event)


def _host_values(tensors: list[torch.Tensor | None]) -> list[list[list[float]]]:
    """The rows of each 2-D tensor (``[]`` for None), read with one transfer per device."""
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        if t is not None:
            by_device.setdefault(t.device, []).append(i)
    out: list[list[list[float]]] = [[] for _ in tensors]
    for indices in by_device.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in indices]).cpu().tolist()
        start = 0
        for i in indices:
            n, width = tensors[i].shape
            out[i] = [flat[start + j * width : start + (j + 1) * width] for j in range(n)]
            start += n * width
    return out


def mean_density(stats: dict[int, dict[str, LayerStats]]) -> float:
    """Mean density over every (step, layer) of ``stats``; NaN when empty."""
    values = [s.density for layers in stats.values() for s in layers.values()]
    return sum(values) / len(values) if values else math.nan
