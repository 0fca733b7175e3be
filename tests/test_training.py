"""Training with PSA on the CPU: gradients through enable_psa with gradient checkpointing, and the LoRA example.

The reference backend runs here (the Triton backward is checked in tests/ops/test_attention_backward.py).
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from psa_diffusers import PSAConfig
from psa_diffusers.diffusers import enable_psa, load_psa_lora
from psa_diffusers.diffusers.tiny import tiny_wan_pipeline, tiny_wan_transformer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CONFIG = PSAConfig(block_q=64, block_kv=32, budgets=(0.2, 0.1, 0.1, 0.2))


def _lora_grads(checkpointing: bool) -> tuple[list[torch.Tensor], float]:
    """Gradients of a tiny Wan's LoRA weights (lora_B made nonzero) under PSA, and the mean attention density."""
    transformer = tiny_wan_transformer(seed=0)
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(1)
    for name, p in transformer.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    handle = enable_psa(transformer, config=CONFIG, backend="reference")
    x = torch.randn(1, 16, 2, 16, 32, generator=g)  # 2 x 8 x 16 = 256 tokens: 4 query blocks, 8 key blocks
    text = torch.randn(1, 16, 32, generator=g)
    out = transformer(hidden_states=x, timestep=torch.tensor([400.0]), encoder_hidden_states=text, return_dict=False)[0]
    out.pow(2).mean().backward()
    density = handle.mean_density()
    handle.disable()
    return [p.grad.clone() for _, p in sorted(transformer.named_parameters()) if p.requires_grad], density


def test_enable_psa_trains_with_gradient_checkpointing():
    plain, density = _lora_grads(checkpointing=False)
    checkpointed, density_ckpt = _lora_grads(checkpointing=True)
    assert density < 0.6 and density_ckpt == pytest.approx(density)  # PSA really ran sparse, the same masks
    assert len(plain) == 2 * 4 * 2 * 2  # A and B of 4 projections, 2 attentions per block, 2 blocks
    assert all(g.abs().sum() > 0 for g in plain)
    for a, b in zip(checkpointed, plain):
        # the recomputed forward is the same float32 computation (the mask estimate is deterministic)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_train_lora_example_loss_decreases_and_saves_a_loadable_lora(tmp_path, monkeypatch, capsys):
    out = tmp_path / "lora"
    args = ["--output_dir", str(out), "--max_train_steps", "8", "--eval_every", "4", "--latent_grid", "2,8,16",
            "--samples", "2", "--train_batch_size", "1", "--learning_rate", "1e-2",
            "--backend", "reference"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["train_lora_psa.py", *args])
    runpy.run_path(str(EXAMPLES / "train_lora_psa.py"), run_name="__main__")
    assert f"wrote {out / 'pytorch_lora_weights.safetensors'}" in capsys.readouterr().out
    history = json.loads((out / "losses.json").read_text())
    evals = [loss for _, loss in history["eval"]]
    assert [step for step, _ in history["eval"]] == [0, 4, 8]
    assert evals[-1] < evals[1] < evals[0], f"eval loss did not decrease: {evals}"
    assert history["mean_density"] < 0.6
    pipe = tiny_wan_pipeline()
    lora = load_psa_lora(pipe, history["lora_file"], preset="wan2.1-1.3b")
    assert lora.modules == 4 * 2 * 2  # every attention projection of both blocks
    lora.remove()
