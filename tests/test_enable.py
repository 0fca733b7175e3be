"""enable_psa / disable_psa on tiny random pipelines: stock equality at full budget, exact restore,
the preset's dense-step schedule through stats(), the step clock (guidance, two experts, bare
transformer), the token grid, and a real sparse budget."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers.hooks import HookRegistry
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from torch.utils._python_dispatch import TorchDispatchMode

from psa_diffusers import psa_attention
from psa_diffusers.diffusers import PSAHandle, PSAProcessor, disable_psa, enable_psa
from psa_diffusers.diffusers.hooks import HOOK_NAME, token_grid
from psa_diffusers.diffusers.state import DENSE_STEP
from psa_diffusers.presets import get_preset
from tests.tiny_models import (  # noqa: F401  (one_thread is a fixture)
    FAMILY,
    FULL,
    KV_BLOCKS,
    SPARSE,
    SPARSE_VIDEO_DENSITY,
    TINY_GRID,
    build,
    expected_density,
    one_thread,
    psa_logs_fixture,
    rel_err,
    tiny_call_kwargs,
    tiny_cogvideox_transformer,
    tiny_preset,
    tiny_wan_transformer,
)

pytestmark = pytest.mark.usefixtures("one_thread")
PSA_LOGGERS = "diffusers.psa_diffusers."


def _processors(pipe):
    return {
        attr: dict(getattr(pipe, attr).attn_processors)
        for attr in ("transformer", "transformer_2")
        if getattr(pipe, attr, None) is not None
    }


def _same_objects(a, b):
    return a.keys() == b.keys() and all(a[t].keys() == b[t].keys() and all(a[t][k] is b[t][k] for k in a[t]) for t in a)


@pytest.mark.parametrize(
    "kind, fuse, order",
    [
        ("cogvideox", False, "none"),
        ("cogvideox-sincos", False, "none"),
        ("wan", False, "gilbert"),
        ("wan-i2v", False, "none"),
        ("wan", True, "none"),
    ],
    ids=["cogvideox-rotary", "cogvideox-sincos", "wan-t2v-gilbert", "wan-i2v", "wan-fused"],
)
def test_full_budget_equals_stock(kind, fuse, order):
    pipe, call = build(kind)
    if fuse:
        pipe.transformer.fuse_qkv_projections()
    stock = call(num_inference_steps=1)
    with enable_psa(pipe, config=FULL.replace(token_order=order)) as handle:
        out = call(num_inference_steps=1)
    assert rel_err(out, stock) < 1e-5
    stats = handle.stats()
    assert sorted(stats) == [0]
    assert all(not s.dense and s.density == pytest.approx(1.0) for layers in stats.values() for s in layers.values())


def test_disable_restores_the_same_objects_and_output():
    pipe, call = build("wan")
    before = _processors(pipe)
    stock = call(num_inference_steps=2, guidance_scale=1.0)
    handle = enable_psa(pipe, config=SPARSE)
    installed = _processors(pipe)["transformer"]
    assert {k for k, v in installed.items() if v is not before["transformer"][k]} == {
        "blocks.0.attn1.processor",
        "blocks.1.attn1.processor",
    }  # cross-attention keeps its stock processor
    assert rel_err(call(num_inference_steps=2, guidance_scale=1.0), stock) > 1e-4
    disable_psa(pipe)
    assert not handle.enabled
    assert _same_objects(_processors(pipe), before)
    assert HookRegistry.check_if_exists_or_initialize(pipe.transformer).get_hook(HOOK_NAME) is None
    assert torch.equal(call(num_inference_steps=2, guidance_scale=1.0), stock)
    handle.disable()  # a second disable is a no-op
    with pytest.raises(ValueError, match="not enabled"):
        disable_psa(pipe)


def test_context_manager_and_handle_restore():
    pipe, _ = build("cogvideox")
    before = _processors(pipe)
    with enable_psa(pipe, preset=tiny_preset("cogvideox")) as handle:
        assert isinstance(handle, PSAHandle) and handle.enabled
        with pytest.raises(ValueError, match="already enabled"):
            enable_psa(pipe)
    assert _same_objects(_processors(pipe), before)
    enable_psa(pipe.transformer, config=FULL).disable()  # a bare transformer too
    assert _same_objects(_processors(pipe), before)


def test_disable_leaves_a_processor_replaced_meanwhile(psa_logs):
    pipe, _ = build("wan")
    handle = enable_psa(pipe, config=FULL)
    layer = pipe.transformer.blocks[0].attn1
    replacement = WanAttnProcessor()
    layer.set_processor(replacement)
    handle.disable()
    assert layer.processor is replacement
    assert any("replaced since enable_psa" in r.getMessage() for r in psa_logs.records)


def test_enable_refuses_processors_set_by_hand():
    pipe, _ = build("cogvideox")
    pipe.transformer.set_attn_processor(PSAProcessor(FULL))
    with pytest.raises(ValueError, match="already has a PSAProcessor"):
        enable_psa(pipe)
    assert HookRegistry.check_if_exists_or_initialize(pipe.transformer).get_hook(HOOK_NAME) is None


def test_wrong_family_or_model_changes_nothing():
    pipe, _ = build("cogvideox")
    before = _processors(pipe)
    with pytest.raises(ValueError, match="wan"):
        enable_psa(pipe, preset="wan2.1-1.3b")
    with pytest.raises(ValueError, match="wan"):
        enable_psa(pipe, preset=tiny_preset("wan"))
    with pytest.raises(ValueError, match="supports"):
        enable_psa(pipe.vae)
    with pytest.raises(ValueError, match="block_q"):
        enable_psa(pipe, config=FULL, block_q=96)
    assert _same_objects(_processors(pipe), before)
    assert HookRegistry.check_if_exists_or_initialize(pipe.transformer).get_hook(HOOK_NAME) is None


def test_default_preset_and_overrides():
    pipe, _ = build("wan")
    with enable_psa(pipe, block_q=64) as handle:
        assert handle.schedule.name == "wan2.1-1.3b"
        assert handle.config == get_preset("wan2.1-1.3b").config.replace(block_q=64)
    with enable_psa(pipe, preset="wan2.1-1.3b", config=SPARSE) as handle:
        assert handle.config == SPARSE and handle.schedule.dense_steps == 15


@pytest.mark.parametrize("guidance", [6.0, 1.0], ids=["guidance", "no-guidance"])
@pytest.mark.parametrize("kind", ["cogvideox", "wan"])
def test_preset_schedule_dense_then_sparse(kind, guidance, psa_logs):
    pipe, call = build(kind)
    with enable_psa(pipe, preset=tiny_preset(FAMILY[kind])) as handle:
        out = call(num_inference_steps=4, guidance_scale=guidance)
        lines = [r.getMessage() for r in psa_logs.records if "mean attention density" in r.getMessage()]
        assert len(lines) == 1 and "4 step(s) x 2 layer(s)" in lines[0]  # logged at the end of the call
    stats = handle.stats()
    assert sorted(stats) == [0, 1, 2, 3]
    calls = 2 if kind == "wan" and guidance > 1 else 1  # Wan: separate cond and uncond calls
    for step, layers in stats.items():
        assert len(layers) == 2
        for s in layers.values():
            assert s.calls == calls
            if step < 2:
                assert s.dense and s.reason == DENSE_STEP and s.density == 1.0
            else:
                assert not s.dense and s.reason is None and s.density < 0.6
    assert torch.isfinite(out).all()


def test_two_experts_share_one_step_clock():
    pipe, call = build("wan2.2")
    with enable_psa(pipe, preset=tiny_preset("wan")) as handle:
        call(num_inference_steps=4)
    stats = handle.stats()
    assert sorted(stats) == [0, 1, 2, 3]
    experts = {step: {layer.split(".")[0] for layer in layers} for step, layers in stats.items()}
    assert all(len(e) == 1 for e in experts.values())
    assert {e for es in experts.values() for e in es} == {"transformer", "transformer_2"}
    assert [all(s.dense for s in stats[step].values()) for step in range(4)] == [True, True, False, False]


def test_bare_transformer_counts_steps_from_timesteps():
    """Without the pipeline the clock follows the timesteps; the run length is the preset's."""
    pipe, call = build("wan")
    with enable_psa(pipe.transformer, preset=tiny_preset("wan")) as handle:
        call(num_inference_steps=4)
        first = handle.stats()
        call(num_inference_steps=4, guidance_scale=1.0)  # a second run starts again at step 0
        second = handle.stats()
    for stats, calls in ((first, 2), (second, 1)):
        assert sorted(stats) == [0, 1, 2, 3]
        assert [all(s.dense for s in stats[i].values()) for i in range(4)] == [True, True, False, False]
        assert all(s.calls == calls for layers in stats.values() for s in layers.values())


@pytest.mark.parametrize("kind", ["cogvideox", "wan"])
def test_sparse_budget(kind):
    pipe, call = build(kind)
    dense = call(num_inference_steps=2)
    with enable_psa(pipe, config=SPARSE) as handle:
        out = call(num_inference_steps=2)
    assert torch.isfinite(out).all()
    assert rel_err(out, dense) > 1e-3
    expected = expected_density(FAMILY[kind])
    stats = handle.stats()
    densities = [s.density for layers in stats.values() for s in layers.values()]
    assert len(densities) == 4 and not any(s.dense for layers in stats.values() for s in layers.values())
    assert all(abs(d - expected) <= 1 / KV_BLOCKS for d in densities), (densities, expected)
    assert handle.mean_density() == pytest.approx(sum(densities) / 4)


def test_budget_mode_through_enable_psa():
    """The README's opt-in: a preset with mode="budget" overrides; every sparse layer meets its target density."""
    pipe, call = build("wan")
    with enable_psa(pipe, preset="wan2.1-1.3b", mode="budget", target_density=0.3) as handle:
        assert handle.config.mode == "budget" and handle.config.target_density == 0.3
    dense = call(num_inference_steps=2)
    with enable_psa(pipe, config=SPARSE.replace(mode="budget", target_density=0.3)) as handle:
        out = call(num_inference_steps=2)
    assert torch.isfinite(out).all() and rel_err(out, dense) > 1e-4
    densities = [s.density for layers in handle.stats().values() for s in layers.values()]
    assert len(densities) == 4
    # each row spends at most its budget, and leaves less than one KV block of it unused
    assert all(0.3 - 1 / KV_BLOCKS < d <= 0.3 + 1e-9 for d in densities), densities


@pytest.mark.parametrize("order", ["gilbert", "none"])
def test_hook_reads_the_token_grid(order):
    pipe, call = build("cogvideox")
    seen = []
    with enable_psa(pipe, config=SPARSE.replace(token_order=order)) as handle:
        attn = pipe.transformer.transformer_blocks[0].attn1
        hook = attn.register_forward_pre_hook(lambda *_: seen.append(handle.state.current))
        call(num_inference_steps=1, guidance_scale=1.0)
        hook.remove()
    assert [(info.grid, info.token_order) for info in seen] == [(TINY_GRID, "raster" if order == "none" else order)]


def test_token_grid_from_patch_sizes():
    cog = tiny_cogvideox_transformer(num_layers=1).config
    cog15 = tiny_cogvideox_transformer(num_layers=1, patch_size_t=2).config
    assert token_grid("cogvideox", cog, (2, 5, 4, 32, 32)) == (5, 16, 16)
    assert token_grid("cogvideox", cog15, (2, 6, 4, 32, 32)) == (3, 16, 16)
    wan = type("Config", (), {"patch_size": (1, 2, 2)})
    assert token_grid("wan", wan, (1, 16, 5, 32, 32)) == (5, 16, 16)
    assert token_grid("wan", wan, (1, 16, 32, 32)) is None


def test_cogvideox15_temporal_patch_full_budget_gilbert():
    """CogVideoX1.5's temporal patch: the grid from patch_size_t lets Gilbert order run; full budget = stock."""
    model = tiny_cogvideox_transformer(num_layers=1, patch_size_t=2)
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 4, 4, 32, 32, generator=g),
        encoder_hidden_states=torch.randn(1, 16, 32, generator=g),
        timestep=torch.tensor([500]),
        return_dict=False,
    )
    with torch.no_grad():
        stock = model(**inputs)[0]
        with enable_psa(model, config=FULL.replace(token_order="gilbert")) as handle:
            out = model(**inputs)[0]
    assert rel_err(out, stock) < 1e-5
    assert handle.stats()[0]["transformer.transformer_blocks.0.attn1"].density == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------ the step clock


def _density_lines(records) -> list[str]:
    return [r.getMessage() for r in records if "mean attention density" in r.getMessage()]


def test_one_step_wan_run_with_guidance_is_one_run(psa_logs):
    """Cond and uncond of the only step belong to one run; the next call is a run of its own."""
    pipe, call = build("wan")
    with enable_psa(pipe, config=SPARSE) as handle:
        call(num_inference_steps=1)
        first = handle.stats()
        call(num_inference_steps=1)
        second = handle.stats()
    for stats in (first, second):
        assert sorted(stats) == [0]
        assert [s.calls for s in stats[0].values()] == [2, 2]
    lines = _density_lines(psa_logs.records)
    assert len(lines) == 2 and all(line.startswith("PSA: 1 step(s) x 2 layer(s)") for line in lines)


@pytest.mark.parametrize("kind", ["cogvideox", "wan"])
def test_exception_in_a_step_callback_closes_the_run(kind, psa_logs):
    """A run cut short by an exception keeps its statistics; the next call does not continue it."""

    def broken(pipe, i, t, kwargs):
        raise RuntimeError("callback broke")

    pipe, call = build(kind)
    with enable_psa(pipe, preset=tiny_preset(FAMILY[kind])) as handle:
        with pytest.raises(RuntimeError, match="callback broke"):
            call(num_inference_steps=4, callback_on_step_end=broken)
        interrupted = handle.stats()
        call(num_inference_steps=4)
        stats = handle.stats()
    calls = 2 if kind == "wan" else 1
    assert sorted(interrupted) == [0] and all(s.calls == calls for s in interrupted[0].values())
    assert sorted(stats) == [0, 1, 2, 3]
    assert all(s.calls == calls for layers in stats.values() for s in layers.values())
    assert [all(s.dense for s in stats[i].values()) for i in range(4)] == [True, True, False, False]
    lines = _density_lines(psa_logs.records)
    assert len(lines) == 2 and "1 step(s)" in lines[0] and "4 step(s)" in lines[1]


@pytest.mark.parametrize("kind", ["cogvideox", "wan"])
def test_from_pipe_copy_runs_the_schedule_of_its_own_steps(kind, psa_logs):
    """A from_pipe copy with its own scheduler shares the transformer (and PSA) but not the scheduler:
    its 6 steps run the preset scaled to 6 (round(2 * 6 / 4) = 3 dense), not the preset's 4."""
    pipe, _ = build(kind)
    copy = type(pipe).from_pipe(pipe, scheduler=type(pipe.scheduler).from_config(pipe.scheduler.config))
    assert copy.transformer is pipe.transformer and copy.scheduler is not pipe.scheduler
    with enable_psa(pipe, preset=tiny_preset(FAMILY[kind])) as handle, torch.no_grad():
        copy(**tiny_call_kwargs(num_inference_steps=6, guidance_scale=1.0))
    stats = handle.stats()
    assert sorted(stats) == list(range(6))
    assert [all(s.dense for s in stats[i].values()) for i in range(6)] == [True] * 3 + [False] * 3
    assert not [r for r in psa_logs.records if r.name.startswith(PSA_LOGGERS) and r.levelno >= logging.WARNING]


def test_unmatched_timesteps_warn_and_count_steps_from_values(psa_logs):
    """A transformer called with its own timestep tensors (no cache context, not a view of a schedule):
    one warning, then steps from the values: lower is the next step, equal the same, higher a new run."""
    model = tiny_wan_transformer(num_layers=1)
    g = torch.Generator().manual_seed(0)
    x, ehs = torch.randn(1, 16, 5, 32, 32, generator=g), torch.randn(1, 16, 32, generator=g)
    seen = []
    with torch.no_grad(), enable_psa(model, preset=tiny_preset("wan", num_steps=3, dense_steps=1)) as handle:
        for value in (900.0, 600.0, 600.0, 300.0, 800.0):
            model(hidden_states=x, timestep=torch.tensor([value]), encoder_hidden_states=ehs)
            seen.append(handle.stats())
    steps = [{step: next(iter(layers.values())) for step, layers in stats.items()} for stats in seen]
    assert sorted(steps[3]) == [0, 1, 2]
    assert [steps[3][i].calls for i in range(3)] == [1, 2, 1]
    assert [steps[3][i].dense for i in range(3)] == [True, False, False]
    assert sorted(steps[4]) == [0]  # 800 > 300: a new run
    warnings = [r.getMessage() for r in psa_logs.records if r.name.startswith(PSA_LOGGERS) and r.levelno >= 30]
    assert len(warnings) == 1 and "matches no denoising step" in warnings[0]


# ------------------------------------------------------------------------------------------ Gilbert order


class _OpCounter(TorchDispatchMode):
    """Counts the psa ops called inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith("psa."):
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["cogvideox", "wan"])
def test_gilbert_order_once_per_forward(kind):
    """Two gathers in (tokens, and the rotary tables: two more) and one out per forward, none per layer."""
    pipe, call = build(kind)
    with enable_psa(pipe, config=SPARSE.replace(token_order="gilbert")), _OpCounter() as ops:
        call(num_inference_steps=2, guidance_scale=1.0)
    forwards, layers = 2, 2
    assert ops.counts == {
        "psa.permute_tokens.default": 4 * forwards,
        "psa.attention_or_dense.default": layers * forwards,
    }


class _PerLayerGilbert(PSAProcessor):
    """The reference: a processor that reorders q, k, v in every layer (``psa_attention`` with the grid)."""

    def _attend(self, kind, q, k, v, config, *, text_len, reordered):
        return psa_attention(q, k, v, config, text_len=text_len, grid=TINY_GRID)


@pytest.mark.parametrize("kind", ["cogvideox", "wan"])
def test_gilbert_once_per_forward_equals_reordering_in_every_layer(kind):
    """At a sparse budget the blocks see the same curve-ordered tokens as a per-layer reorder would give
    them, so the masks and outputs agree; raster order gives other blocks and another output."""
    config = SPARSE.replace(token_order="gilbert")
    pipe, call = build(kind)
    with enable_psa(pipe, config=config):
        once = call(num_inference_steps=1, guidance_scale=1.0)
    with enable_psa(pipe, config=SPARSE):
        raster = call(num_inference_steps=1, guidance_scale=1.0)
    originals = dict(pipe.transformer.attn_processors)
    for name, module in pipe.transformer.named_modules():
        if name.endswith("attn1"):
            module.set_processor(_PerLayerGilbert(config))
    per_layer = call(num_inference_steps=1, guidance_scale=1.0)
    pipe.transformer.set_attn_processor(originals)
    assert rel_err(once, per_layer) < 1e-5 < rel_err(once, raster) / 10


@pytest.mark.parametrize("num_layers", [1, 2])
def test_wan_per_token_timesteps_follow_the_tokens(num_layers):
    """Wan2.2-TI2V-style per-token timesteps ``[B, L]`` are put in curve order with the tokens: at full
    budget the output equals the stock model's."""
    model = tiny_wan_transformer(num_layers=num_layers)
    g = torch.Generator().manual_seed(0)
    x, ehs = torch.randn(1, 16, 5, 32, 32, generator=g), torch.randn(1, 16, 32, generator=g)
    timestep = torch.rand(1, 5 * 16 * 16, generator=g) * 1000
    with torch.no_grad():
        stock = model(hidden_states=x, timestep=timestep, encoder_hidden_states=ehs).sample
        with enable_psa(model, config=FULL.replace(token_order="gilbert")) as handle:
            with model.cache_context("cond", step_index=0, num_inference_steps=1):
                out = model(hidden_states=x, timestep=timestep, encoder_hidden_states=ehs).sample
        shuffled = model(hidden_states=x, timestep=timestep.flip(-1), encoder_hidden_states=ehs).sample
    assert handle.stats()[0][f"transformer.blocks.{num_layers - 1}.attn1"].density == pytest.approx(1.0)
    assert rel_err(out, stock) < 1e-5
    assert rel_err(shuffled, stock) > 1e-3  # the timesteps' order matters: the test can fail


@pytest.mark.parametrize("kind", ["cogvideox", "cogvideox-sincos"])
def test_cogvideox_gilbert_full_budget_equals_stock(kind):
    """CogVideoX's joint sequence: text first in the model, [video, text] inside PSA, video and its RoPE
    tables (or its sincos position embeddings, added in the patch embedding) in curve order through the
    blocks; at full budget the output is the stock one."""
    pipe, call = build(kind)
    stock = call(num_inference_steps=2)
    with enable_psa(pipe, config=FULL.replace(token_order="gilbert")) as handle:
        out = call(num_inference_steps=2)
    assert rel_err(out, stock) < 1e-5
    assert all(s.density == pytest.approx(1.0) for layers in handle.stats().values() for s in layers.values())


def test_with_grad_enabled_psa_stays_differentiable():
    """Outside no_grad the processors take the differentiable path (psa_attention), schedule included."""
    model = tiny_wan_transformer(num_layers=1)
    g = torch.Generator().manual_seed(0)
    x, ehs = torch.randn(1, 16, 5, 32, 32, generator=g), torch.randn(1, 16, 32, generator=g)
    timesteps = torch.tensor([900.0, 100.0])
    with enable_psa(model, preset=tiny_preset("wan", num_steps=2, dense_steps=1)) as handle:
        for t in timesteps:
            out = model(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=ehs).sample
            out.square().mean().backward()
    grad = model.blocks[0].attn1.to_q.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    stats = handle.stats()
    assert [stats[i]["transformer.blocks.0.attn1"].dense for i in range(2)] == [True, False]
    assert stats[1]["transformer.blocks.0.attn1"].density == pytest.approx(SPARSE_VIDEO_DENSITY)
