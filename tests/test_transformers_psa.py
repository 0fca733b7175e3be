"""The transformers integration on a tiny random Qwen2.5-VL built in code (no download).

At full budget PSA's logits equal SDPA's (float32: only summation order differs, observed ~2e-7
against logits of size ~1, so 1e-5 absolute); at a sparse budget the logits differ (PSA ran) and
generation with the KV cache gives finite logits, with the decode steps on SDPA; bad settings raise
ValueError naming the bad value.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from psa_diffusers.config import PSAConfig
from psa_diffusers.transformers import (
    CausalPSASettings,
    configure,
    get_settings,
    register_psa_attention,
    settings_of,
)
from psa_diffusers.transformers.tiny import tiny_qwen2_5_vl, tiny_video_inputs

LOGGER = "psa_diffusers.transformers.attention"
GRID = (4, 16, 16)  # 256 video tokens: 290 tokens in all
FULL = CausalPSASettings(
    config=PSAConfig(block_q=64, block_kv=32, mode="quota", budgets=(1.0, 0.0, 0.0, 0.0)), min_seq_len=64,
    backend="reference",
)  # fmt: skip
SPARSE = CausalPSASettings(
    config=PSAConfig(block_q=64, block_kv=32, mode="quota", budgets=(0.2, 0.2, 0.0, 0.2)), min_seq_len=64,
    sink_tokens=32, recent_tokens=32, dense_tail_tokens=16, backend="reference",
)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def registered():
    register_psa_attention()


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_full_budget_equals_sdpa_from_pretrained_and_set_attn_implementation(tmp_path):
    inputs = tiny_video_inputs(GRID)
    sdpa = _logits(tiny_qwen2_5_vl("sdpa"), inputs)
    model = tiny_qwen2_5_vl("sdpa")
    model.save_pretrained(tmp_path)
    from transformers import Qwen2_5_VLForConditionalGeneration

    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="psa").eval()
    configure(loaded, FULL)
    assert loaded.config.text_config._attn_implementation == "psa"
    assert (_logits(loaded, inputs) - sdpa).abs().max() < 1e-5
    model.set_attn_implementation("psa")
    configure(model, FULL)
    assert (_logits(model, inputs) - sdpa).abs().max() < 1e-5


def test_sparse_prefill_runs_psa_and_generation_decodes_dense(caplog):
    inputs = tiny_video_inputs(GRID)
    model = tiny_qwen2_5_vl("psa")
    configure(model, SPARSE)
    sdpa = _logits(tiny_qwen2_5_vl("sdpa"), inputs)
    sparse = _logits(model, inputs)
    assert torch.isfinite(sparse).all()
    assert (sparse - sdpa).abs().max() > 1e-3  # the sparse budget changed something: PSA ran
    with caplog.at_level(logging.DEBUG, logger=LOGGER), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)  # fmt: skip
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 3
    assert all(torch.isfinite(x).all() for x in out.logits)
    decode = [r for r in caplog.records if "decode or a cached prefix" in r.getMessage()]
    assert len(decode) == 2 * 2  # 2 decode steps x 2 decoder layers
    assert not [r for r in caplog.records if "layer 0 runs SDPA: 290" in r.getMessage()]


def test_short_and_padded_inputs_run_dense(caplog):
    model = tiny_qwen2_5_vl("psa")
    configure(model, dataclasses.replace(SPARSE, min_seq_len=1000))
    inputs = tiny_video_inputs(GRID)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        short = _logits(model, inputs)
    assert any("fewer than min_seq_len=1000" in r.getMessage() for r in caplog.records)
    assert (short - _logits(tiny_qwen2_5_vl("sdpa"), inputs)).abs().max() < 1e-5
    configure(model, SPARSE)
    padded = dict(inputs, attention_mask=inputs["attention_mask"].clone())
    padded["attention_mask"][0, :3] = 0
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        _logits(model, padded)
    assert any("attention mask" in r.getMessage() for r in caplog.records)


def test_settings_round_trip_and_presets():
    model = tiny_qwen2_5_vl("psa")
    settings = configure(model, preset="qwen2.5-vl")
    assert settings == get_settings("qwen2.5-vl")
    layer = model.model.language_model.layers[0].self_attn
    assert settings_of(layer) == settings
    assert isinstance(model.config.text_config.to_dict()["psa"], dict)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(config=PSAConfig(mode="density", target_density=0.2)), "mode"),
        (dict(min_seq_len=0), "min_seq_len=0"),
        (dict(recent_tokens=-5), "recent_tokens=-5"),
        (dict(sink_tokens=1.5), "sink_tokens=1.5"),
        (dict(backend="cuda"), "backend='cuda'"),
        (dict(config={"block_q": 64}), "config="),
    ],
    ids=["density-mode", "min-len", "recent", "sink-float", "backend", "config-dict"],
)
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CausalPSASettings(**kwargs)


def test_bad_configure_calls_raise():
    model = tiny_qwen2_5_vl("psa")
    with pytest.raises(ValueError, match="unknown causal PSA preset 'nope'"):
        configure(model, preset="nope")
    with pytest.raises(ValueError, match="not both"):
        configure(model, FULL, preset="qwen2.5-vl")
    with pytest.raises(ValueError, match="no causal attention layer"):
        configure(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown field"):
        CausalPSASettings.from_dict({"min_len": 3})


def test_example_runs_tiny(monkeypatch, capsys):
    import runpy
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "examples" / "qwen2_5_vl_video_qa.py"
    monkeypatch.setattr(sys, "argv", [example.name, "--tiny", "--max-new-tokens", "2"])
    runpy.run_path(str(example), run_name="__main__")
    assert "290 prompt tokens, psa attention" in capsys.readouterr().out
