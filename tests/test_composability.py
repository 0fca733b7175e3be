"""enable_psa beside the rest of diffusers: fused projections, attention backends, other LoRA adapters,
logging verbosity, and a failed enable."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0
from diffusers.utils import logging as diffusers_logging

from psa_diffusers.diffusers import PSAProcessor, enable_psa
from psa_diffusers.diffusers.hooks import find_step_hook
from tests.tiny_models import (  # noqa: F401  (one_thread, psa_logs are fixtures)
    SPARSE,
    build,
    one_thread,
    psa_logs_fixture,
    rel_err,
    tiny_cogvideox_transformer,
    tiny_preset,
    tiny_wan_transformer,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _attn1(pipe) -> dict[str, object]:
    return {k: v for k, v in pipe.transformer.attn_processors.items() if ".attn1." in k}


def _all_sparse(handle) -> bool:
    stats = handle.stats()
    return bool(stats) and all(not s.dense and s.density < 0.6 for layers in stats.values() for s in layers.values())


# ------------------------------------------------------------------------------------------ fused projections


def test_cogvideox_fuse_after_enable_keeps_psa_and_unfuse_after_disable_restores_stock():
    pipe, call = build("cogvideox")
    before = _attn1(pipe)
    handle = enable_psa(pipe, config=SPARSE)
    unfused = call(num_inference_steps=2)
    pipe.transformer.fuse_qkv_projections()  # swaps FusedCogVideoXAttnProcessor2_0 in everywhere
    fused = call(num_inference_steps=2)
    assert _all_sparse(handle)  # PSA stayed on: stats of the fused run
    assert all(isinstance(p, PSAProcessor) for p in _attn1(pipe).values())
    assert rel_err(fused, unfused) < 1e-5  # the same computation through to_qkv
    handle.disable()
    assert all(type(p) is FusedCogVideoXAttnProcessor2_0 for p in _attn1(pipe).values())  # what fuse set
    pipe.transformer.unfuse_qkv_projections()
    after = _attn1(pipe)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)  # the stock objects
    enable_psa(pipe, config=SPARSE).disable()  # nothing left behind that blocks a new enable


def test_cogvideox_fuse_then_unfuse_while_enabled_keeps_psa_and_disable_restores_stock():
    pipe, call = build("cogvideox")
    before = _attn1(pipe)
    handle = enable_psa(pipe, config=SPARSE)
    pipe.transformer.fuse_qkv_projections()
    call(num_inference_steps=1)
    pipe.transformer.unfuse_qkv_projections()
    call(num_inference_steps=1)
    assert _all_sparse(handle) and all(isinstance(p, PSAProcessor) for p in _attn1(pipe).values())
    handle.disable()
    after = _attn1(pipe)
    assert all(after[k] is before[k] for k in before)


def test_cogvideox_fuse_and_disable_without_a_call_between():
    pipe, _ = build("cogvideox")
    before = _attn1(pipe)
    handle = enable_psa(pipe, config=SPARSE)
    pipe.transformer.fuse_qkv_projections()
    handle.disable()
    pipe.transformer.unfuse_qkv_projections()  # must not bring PSA's processors back
    after = _attn1(pipe)
    assert all(after[k] is before[k] for k in before)
    assert not any(isinstance(p, PSAProcessor) for p in pipe.transformer.attn_processors.values())


def test_fused_before_enable():
    pipe, call = build("cogvideox")
    pipe.transformer.fuse_qkv_projections()
    before = _attn1(pipe)
    with enable_psa(pipe, config=SPARSE) as handle:
        call(num_inference_steps=1)
    assert _all_sparse(handle)
    assert all(_attn1(pipe)[k] is before[k] for k in before)


def test_a_custom_processor_set_meanwhile_is_left_alone(psa_logs):
    """Only processors whose computation PSA reproduces are taken back; others stay, and disable keeps them."""

    class Custom(CogVideoXAttnProcessor2_0):
        pass

    pipe, call = build("cogvideox")
    handle = enable_psa(pipe, config=SPARSE)
    layer = pipe.transformer.transformer_blocks[0].attn1
    custom = Custom()
    layer.set_processor(custom)
    call(num_inference_steps=1)
    assert layer.processor is custom
    assert list(handle.stats()[0]) == ["transformer.transformer_blocks.1.attn1"]
    handle.disable()
    assert layer.processor is custom
    assert any(r.levelno == logging.WARNING and "left as is" in r.getMessage() for r in psa_logs.records)


# ------------------------------------------------------------------------------------------ attention backends


@pytest.fixture
def restore_attention_backend():
    yield
    # ModelMixin.set_attention_backend also sets diffusers' global backend: back to the default
    tiny_cogvideox_transformer(num_layers=1).set_attention_backend("native")


@pytest.mark.usefixtures("restore_attention_backend")
@pytest.mark.parametrize("when", ["before", "after"])
def test_attention_backend_survives_disable(when):
    pipe, call = build("wan")
    stock = call(num_inference_steps=2)
    if when == "before":
        pipe.transformer.set_attention_backend("_native_math")
    handle = enable_psa(pipe, config=SPARSE)
    if when == "after":
        pipe.transformer.set_attention_backend("_native_math")
    call(num_inference_steps=1)
    assert _all_sparse(handle)
    handle.disable()
    processors = pipe.transformer.attn_processors
    assert processors and all(p._attention_backend == AttentionBackendName._NATIVE_MATH for p in processors.values())
    assert rel_err(call(num_inference_steps=2), stock) < 1e-5


@pytest.mark.usefixtures("restore_attention_backend")
def test_dense_steps_keep_a_chosen_attention_backend():
    """With a diffusers backend on the layers, dense steps go through it (dispatch_attention_fn)."""
    pipe, call = build("wan")
    pipe.transformer.set_attention_backend("_native_math")
    stock = call(num_inference_steps=2)
    with enable_psa(pipe, preset=tiny_preset("wan", num_steps=2, dense_steps=2)) as handle:
        out = call(num_inference_steps=2)
    assert all(s.dense for layers in handle.stats().values() for s in layers.values())
    assert rel_err(out, stock) < 1e-6


# ------------------------------------------------------------------------------------------ LoRA adapters


def test_load_psa_lora_keeps_other_active_adapters(tmp_path):
    from psa_diffusers.diffusers.lora import load_psa_lora
    from psa_diffusers.diffusers.tiny import tiny_cogvideox_pipeline
    from tests.test_lora import call, lora_layers, save_diffusers_lora

    pipe = tiny_cogvideox_pipeline()
    (tmp_path / "user").mkdir()
    (tmp_path / "psa").mkdir()
    save_diffusers_lora(tmp_path / "user", lora_layers(pipe.transformer, seed=1))
    psa_file = save_diffusers_lora(tmp_path / "psa", lora_layers(pipe.transformer, seed=2))
    pipe.load_lora_weights(str(tmp_path / "user"), adapter_name="user")
    pipe.set_adapters(["user"], [0.5])
    layer = pipe.transformer.transformer_blocks[0].attn1.to_q
    lora = load_psa_lora(pipe, psa_file)
    assert pipe.get_active_adapters() == ["user", "psa"]
    assert layer.scaling["user"] == pytest.approx(0.5 * layer.lora_alpha["user"] / layer.r["user"])
    call(pipe, **{**lora.call_kwargs, "num_inference_steps": 1})
    lora.remove()
    assert pipe.get_active_adapters() == ["user"]
    assert layer.scaling["user"] == pytest.approx(0.5 * layer.lora_alpha["user"] / layer.r["user"])


# ------------------------------------------------------------------------------------------ logging


def test_log_lines_follow_diffusers_verbosity(psa_logs):
    """PSA's lines obey diffusers.utils.logging: ``enable_psa`` and the end of a run say INFO, a
    transformer called with timesteps of its own gets a warning (no step to match)."""
    model = tiny_wan_transformer(num_layers=1)

    def levels_of_a_run() -> list[int]:
        psa_logs.clear()
        with enable_psa(model, config=SPARSE), torch.no_grad():
            model(**_wan_inputs())
        return [r.levelno for r in psa_logs.records if r.name.startswith("diffusers.psa_diffusers")]

    diffusers_logging.set_verbosity_error()
    assert levels_of_a_run() == []
    diffusers_logging.set_verbosity_warning()
    assert levels_of_a_run() == [logging.WARNING]
    diffusers_logging.set_verbosity_info()
    assert sorted(levels_of_a_run()) == [logging.INFO, logging.INFO, logging.WARNING]


def _wan_inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, 16, 5, 32, 32, generator=g),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 16, 32, generator=g),
    )


# ------------------------------------------------------------------------------------------ a failed enable


def test_a_failed_enable_leaves_the_pipeline_as_it_was(monkeypatch):
    import psa_diffusers.diffusers.enable as enable

    def broken(*args, **kwargs):
        raise RuntimeError("token-order hooks broke")

    pipe, call = build("wan")
    before = dict(pipe.transformer.attn_processors)
    stock = call(num_inference_steps=1)
    monkeypatch.setattr(enable, "register_order_hooks", broken)
    with pytest.raises(RuntimeError, match="token-order hooks broke"):
        enable_psa(pipe, config=SPARSE.replace(token_order="gilbert"))
    after = dict(pipe.transformer.attn_processors)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert find_step_hook(pipe.transformer) is None
    assert torch.equal(call(num_inference_steps=1), stock)
    monkeypatch.undo()
    enable_psa(pipe, config=SPARSE.replace(token_order="gilbert")).disable()
