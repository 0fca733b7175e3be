"""examples/*.py run end to end on tiny pipelines saved to local directories (offline, CPU)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import imageio.v3 as iio
import pytest
from diffusers import CogVideoXPipeline  # noqa: E402

from psa_diffusers.diffusers.tiny import tiny_cogvideox_pipeline, tiny_wan_pipeline  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SIZE = ["--height", "64", "--width", "64", "--frames", "9", "--steps", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    cog = tiny_cogvideox_pipeline()
    cog.save_pretrained(root / "tiny-cogvideox")
    tiny_wan_pipeline().save_pretrained(root / "tiny-wan")
    layers = {}
    for name, module in cog.transformer.named_modules():
        if name.endswith(("attn1.to_q", "attn1.to_v")):
            layers[f"{name}.lora_A.weight"] = module.weight.new_zeros(4, module.in_features) + 0.01
            layers[f"{name}.lora_B.weight"] = module.weight.new_zeros(module.out_features, 4) + 0.01
    CogVideoXPipeline.save_lora_weights(root / "lora", transformer_lora_layers=layers)
    return root


def run_example(monkeypatch, name: str, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")


@pytest.mark.parametrize(
    "name, model, preset",
    [("cogvideox_t2v.py", "tiny-cogvideox", "cogvideox-5b"), ("wan_t2v.py", "tiny-wan", "wan2.1-1.3b")],
)
@pytest.mark.parametrize("dense", [False, True], ids=["psa", "dense"])
def test_text_to_video_examples(models, tmp_path, monkeypatch, capsys, name, model, preset, dense):
    video = tmp_path / "out.mp4"
    args = ["--model", str(models / model), "--preset", preset, "--prompt", "a cat", "--seed", "1"]
    run_example(monkeypatch, name, *args, *SIZE, "--output", str(video), *(["--dense"] if dense else []))
    out = capsys.readouterr().out
    assert "mean attention density: " in out and f"wrote {video}" in out
    if dense:
        assert "mean attention density: 1.000" in out
    assert iio.imread(video, index=None).shape == (9, 64, 64, 3)


def test_lora_example(models, tmp_path, monkeypatch, capsys):
    video = tmp_path / "lora.mp4"
    lora = models / "lora" / "pytorch_lora_weights.safetensors"
    args = ["--model", str(models / "tiny-cogvideox"), "--lora", str(lora), "--prompt", "a cat"]
    run_example(monkeypatch, "cogvideox_4step_lora.py", *args, *SIZE, "--output", str(video))
    assert f"wrote {video}" in capsys.readouterr().out
    assert iio.imread(video, index=None).shape == (9, 64, 64, 3)


def test_examples_reject_bad_arguments(monkeypatch, capsys):
    for name in ("cogvideox_t2v.py", "wan_t2v.py", "cogvideox_4step_lora.py"):
        with pytest.raises(SystemExit) as exit_:
            run_example(monkeypatch, name, "--output", "video.gif")
        assert exit_.value.code == 2
        assert "must name an .mp4" in capsys.readouterr().err
