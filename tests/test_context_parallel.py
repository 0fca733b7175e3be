"""PSA under diffusers' Ulysses context parallelism, on the CPU: two processes joined by gloo.

One spawn runs everything that needs the two ranks (``_worker``); the tests compare what each rank
produced with single-process PSA on the same inputs, computed here:

* ``ulysses_attention`` on random q, k, v split along the sequence: each rank's heads get exactly the
  single-device masks; outputs and gradients match;
* a tiny random 4-head Wan transformer under ``enable_psa`` and
  ``enable_parallelism(ContextParallelConfig(ulysses_degree=2))`` over three forwards, with a Gilbert
  budget and a dense-fallback threshold that sends some heads, not all, to dense attention from the
  third forward: outputs, per-layer statistics and dense heads match single-process PSA;
* under ring attention the processor runs the stock dense computation, with one log line.

diffusers builds its device mesh on ``torch.accelerator.device_count()`` devices, which a CPU build of
torch reports as 0; the workers report 1 (a CPU "device").
"""

from __future__ import annotations

import logging
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import WanTransformer3DModel
from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

from psa_diffusers.attention import psa_attention
from psa_diffusers.config import PSAConfig
from psa_diffusers.diffusers import PSAProcessor, enable_psa
from psa_diffusers.diffusers.context_parallel import (
    RING_ATTENTION,
    ULYSSES_ANYTHING,
    dense_reason,
    local_heads,
    ulysses_attention,
)
from psa_diffusers.diffusers.tiny import tiny_wan_transformer

WORLD = 2
HEADS = 4
# random q, k, v for ulysses_attention: [B, L, H, D] (diffusers' layout) on a (3, 5, 10) grid; L = 150 is
# a partial last block of 64 queries and of 32 keys
QKV_SHAPE = (2, 150, HEADS, 16)
QKV_GRID = (3, 5, 10)
QKV_CONFIG = PSAConfig(block_q=64, block_kv=32, mode="mass", budgets=(0.4, 0.5, 0.6, 0.8), token_order="gilbert")
# the tiny Wan transformer: latent [1, 16, 4, 24, 16], patch (1, 2, 2) -> a (4, 12, 8) grid of 384 tokens
LATENT_SHAPE = (1, 16, 4, 24, 16)
MODEL_CONFIG = QKV_CONFIG
TIMESTEPS = (999.0, 900.0, 800.0)
# Outputs are compared in float32. Each rank runs the very ops one device runs on the same values (the
# all-to-all moves bits, PSA acts per head), only on fewer heads and, outside attention, fewer tokens:
# a few float32 ulps of the linear layers' accumulation order. Masks are compared exactly.
ATOL = 1e-5


def _wan() -> WanTransformer3DModel:
    return tiny_wan_transformer(num_heads=HEADS, seed=0)


def _model_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(LATENT_SHAPE, generator=g)
    context = torch.randn(1, 8, 32, generator=g)
    return latents, context, torch.tensor(TIMESTEPS)


def _forwards(model, handle) -> tuple[list[torch.Tensor], dict, list[dict[str, torch.Tensor]]]:
    """Three forwards at the steps of one schedule: outputs, ``handle.stats()``, and each forward's per-head
    mask densities per layer (read from the processors right after each attention call)."""
    latents, context, timesteps = _model_inputs()
    densities: list[dict[str, torch.Tensor]] = []
    hooks = [
        module.register_forward_hook(
            lambda m, args, out, name=name: densities[-1].__setitem__(name, m.processor.last_density.clone())
        )
        for name, module in model.named_modules()
        if name.endswith("attn1")
    ]
    outputs = []
    with torch.no_grad():
        for i in range(len(TIMESTEPS)):
            densities.append({})
            # timesteps[i].expand(B), as the pipelines pass it: the step hook finds the step on the host
            outputs.append(model(latents, timesteps[i].expand(1), context, return_dict=False)[0])
    for hook in hooks:
        hook.remove()
    return outputs, handle.stats(), densities


def _qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    q, k, v, w = (torch.randn(QKV_SHAPE, generator=g) for _ in range(4))
    return q, k, v, w


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelno, record.getMessage()))


def _ring(rank: int) -> tuple[str, list[tuple[int, str]]]:
    """A PSA processor under ring parallelism (ring_degree 2) on the first layer, called twice: diffusers'
    error (its native backend has no ring attention) and the log lines of diffusers' logger tree."""
    ring = ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=WORLD))
    mesh = dist.device_mesh.init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("ring", "ulysses"))
    ring.setup(rank, WORLD, torch.device("cpu"), mesh=mesh)
    model = _wan()
    processor = PSAProcessor(MODEL_CONFIG)
    processor._parallel_config = ring
    model.blocks[0].attn1.set_processor(processor)
    latents, context, timesteps = _model_inputs()
    handler = _Lines()
    logging.getLogger("diffusers").addHandler(handler)
    error = ""
    try:
        for _ in range(2):
            try:
                with torch.no_grad():
                    model(latents, timesteps[0].expand(1), context, return_dict=False)
            except ValueError as e:
                error = str(e)
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    return error, handler.lines


def _worker(rank: int, path: str, threshold: float) -> None:
    torch.set_num_threads(1)
    torch.accelerator.device_count = lambda: 1  # a CPU build reports 0 accelerators; diffusers divides by it
    dist.init_process_group("gloo", init_method=f"file://{path}/store", rank=rank, world_size=WORLD)
    try:
        results: dict = {}
        # ulysses_attention on random inputs, each rank with its half of the sequence
        parallel = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=WORLD))
        mesh = dist.device_mesh.init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("ring", "ulysses"))
        parallel.setup(rank, WORLD, torch.device("cpu"), mesh=mesh)
        q, k, v, w = _qkv()
        share = slice(rank * QKV_SHAPE[1] // WORLD, (rank + 1) * QKV_SHAPE[1] // WORLD)
        q, k, v = (t[:, share].clone().requires_grad_() for t in (q, k, v))
        masks = []

        def attend(q_, k_, v_, record=True):
            out, mask = psa_attention(q_, k_, v_, QKV_CONFIG, grid=QKV_GRID, return_mask=True)
            if record:  # the backward's recomputation is not counted
                masks.append(mask)
            return out

        out = ulysses_attention(q, k, v, parallel, attend)
        (out * w[:, share]).sum().backward()
        results["qkv"] = {
            "share": share,
            "heads": local_heads(parallel, HEADS),
            "out": out.detach(),
            "grads": [t.grad for t in (q, k, v)],
            "levels": masks[0].to_level_map(),
            "recorded": len(masks),  # the forward's call only: the backward recomputes with record=False
        }

        # the tiny Wan transformer under enable_psa and Ulysses context parallelism
        model = _wan()
        handle = enable_psa(model, config=MODEL_CONFIG, dense_fallback=threshold)
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
        results["model"] = _forwards(model, handle)
        results["ring"] = _ring(rank)
        torch.save(results, os.path.join(path, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def reference():
    """Single-process PSA: the per-head densities of a first run without the dense fallback, a threshold
    between them, and the run with that threshold."""
    model = _wan()
    with enable_psa(model, config=MODEL_CONFIG, dense_fallback=None) as handle:
        _, _, first = _forwards(model, handle)
    # a threshold between two head densities of the first forward (the fallback's decisions in the third)
    # whose flags differ between the ranks' head groups in some layer, so each rank must use its own
    values = sorted({float(x) for d in first[0].values() for x in d})
    per_rank = HEADS // WORLD

    def rank_flags_differ(threshold: float) -> bool:
        for d in first[0].values():
            flags = [bool(x > threshold) for x in d]
            if len({tuple(flags[r * per_rank : (r + 1) * per_rank]) for r in range(WORLD)}) > 1:
                return True
        return False

    candidates = [(a + b) / 2 for a, b in zip(values, values[1:])]
    threshold = next(t for t in candidates if rank_flags_differ(t))
    with enable_psa(model, config=MODEL_CONFIG, dense_fallback=threshold) as handle:
        outputs, stats, densities = _forwards(model, handle)
    return threshold, outputs, stats, densities


@pytest.fixture(scope="module")
def ranks(reference):
    """What each rank produced, from one spawn of ``WORLD`` processes."""
    threshold = reference[0]
    with tempfile.TemporaryDirectory() as path:
        mp.spawn(_worker, args=(path, threshold), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(path, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def test_ulysses_attention_matches_one_device(ranks):
    q, k, v, w = (t.requires_grad_() for t in _qkv())
    to_bhld = [t.transpose(1, 2) for t in (q, k, v)]
    ref, mask = psa_attention(*to_bhld, QKV_CONFIG, grid=QKV_GRID, return_mask=True)
    ref = ref.transpose(1, 2)
    (ref * w).sum().backward()
    levels = mask.to_level_map()
    covered = torch.zeros(HEADS, dtype=torch.bool)
    for rank, result in enumerate(ranks):
        got, share, heads = result["qkv"], result["qkv"]["share"], result["qkv"]["heads"]
        assert heads == slice(rank * HEADS // WORLD, (rank + 1) * HEADS // WORLD)
        covered[heads] = True
        assert torch.equal(got["levels"], levels[:, heads]), f"rank {rank}: masks differ from one device"
        assert got["recorded"] == 1, f"rank {rank}: the backward's recomputation was recorded"
        torch.testing.assert_close(got["out"], ref[:, share].detach(), atol=ATOL, rtol=0)
        for name, grad, ref_grad in zip("qkv", got["grads"], (q.grad, k.grad, v.grad)):
            torch.testing.assert_close(grad, ref_grad[:, share], atol=ATOL, rtol=0, msg=f"d{name}, rank {rank}")
    assert covered.all()
    assert 0.0 < mask.density(QKV_SHAPE[1], QKV_SHAPE[1]) < 0.9  # PSA really skipped and pooled blocks


def test_wan_under_ulysses_matches_one_device(reference, ranks):
    _, outputs, stats, densities = reference
    # the run exercises what it should: sparse layers, and from the third forward a dense fallback that
    # takes some heads of a layer, not all
    assert all(s.reason is None and s.density < 0.9 for layers in (stats[0], stats[1]) for s in layers.values())
    assert any(0 < s.dense_heads < HEADS for s in stats[2].values())
    for rank, result in enumerate(ranks):
        got_outputs, got_stats, got_densities = result["model"]
        for step, (got, ref) in enumerate(zip(got_outputs, outputs)):
            torch.testing.assert_close(got, ref, atol=ATOL, rtol=0, msg=f"forward {step}, rank {rank}")
        # the same masks: per-head densities equal exactly (every rank gathers all heads)
        for step, (got, ref) in enumerate(zip(got_densities, densities)):
            assert got.keys() == ref.keys()
            for name in ref:
                assert torch.equal(got[name], ref[name]), f"forward {step}, {name}, rank {rank}"
        assert got_stats == stats


def test_ring_attention_runs_dense_with_one_log_line(ranks):
    assert dense_reason(ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=2))) == RING_ATTENTION
    assert dense_reason(ContextParallelConfig(ulysses_degree=2, ulysses_anything=True)) == ULYSSES_ANYTHING
    assert dense_reason(ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))) is None
    for rank, result in enumerate(ranks):
        error, lines = result["ring"]
        # diffusers' own error: its native backend cannot return the LSE ring attention merges with
        assert "return_lse" in error, f"rank {rank}: {error}"
        ring_lines = [level for level, message in lines if RING_ATTENTION in message]
        # one line in all: diffusers' loggers let only rank 0 speak (above DEBUG)
        assert ring_lines == ([logging.WARNING] if rank == 0 else []), f"rank {rank}: {lines}"


def test_bench_script_arguments_and_cpu(capsys):
    from benchmarks import context_parallel as bench

    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "0"])
    assert bench.parse_args([]).layers == bench.CASE.default_layers
    assert bench.parse_args(["--tiny"]).layers is None
    if not torch.cuda.is_available():
        assert bench.main([]) == 0
        assert "needs CUDA GPUs" in capsys.readouterr().out
