"""The psa-diffusers command: presets table, bench without CUDA, argument errors (no model runs here)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from psa_diffusers.cli import main
from psa_diffusers.presets import list_presets


def test_presets_lists_all_seven(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    names = list_presets()
    assert len(names) == 7
    for name in names:
        assert name in out
    assert "CogVideoXDPMScheduler(timestep_spacing=trailing)" in out  # the 4-step recipe's extras
    assert "0.7 / 0.65 / 0.6" in out  # wan2.1-1.3b's similarity cap


def test_bench_without_cuda_prints_one_line_and_succeeds(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no CUDA GPU" in out[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "required: COMMAND"),
        (["frobnicate"], "invalid choice"),
        (["demo", "--steps", "x"], "invalid int value"),
        (["demo", "--height", "100"], "multiple of 16"),
        (["demo", "--frames", "8"], "4k + 1"),
        (["demo", "--steps", "0"], "must be >= 1"),
        (["demo", "--block-kv", "48"], "block_kv=48"),
        (["demo", "--models", "sora"], "invalid choice"),
        (["generate"], "--model"),
        (["generate", "--model", "m", "--output", "out.gif"], "must name an .mp4"),
        (["generate", "--model", "m", "--steps", "-3"], "--steps must be a positive integer"),
        (["generate", "--model", "m", "--preset", "nope"], "not a built-in preset"),
    ],
    ids=lambda value: "_".join(value) if isinstance(value, list) else None,
)
def test_bad_arguments_exit_nonzero_with_a_message(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_model_directory_is_an_error_not_a_traceback(capsys, tmp_path):
    assert main(["generate", "--model", str(tmp_path / "no-such-model")]) == 1
    err = capsys.readouterr().err
    assert "no such local pipeline directory" in err and "Traceback" not in err


def test_console_entry_point_runs_as_a_module():
    done = subprocess.run(
        [sys.executable, "-m", "psa_diffusers.cli", "presets"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "wan2.2-a14b" in done.stdout


def test_preset_for_model():
    from psa_diffusers.diffusers.families import preset_for_model

    assert preset_for_model("Wan-AI/Wan2.1-T2V-14B-Diffusers", "wan") == "wan2.1-14b"
    assert preset_for_model("/models/CogVideoX-5b", "cogvideox") == "cogvideox-5b"  # a local copy, same name
    with pytest.raises(ValueError, match="--preset"):
        preset_for_model("someone/my-finetune", "wan")


def test_generate_on_a_saved_tiny_wan_pipeline(tmp_path, capsys):
    """The whole generate path offline: a local pipeline directory, PSA on, an mp4 out."""
    import imageio.v3 as iio

    from psa_diffusers.diffusers.tiny import tiny_wan_pipeline

    model = tmp_path / "tiny-wan"
    tiny_wan_pipeline().save_pretrained(model)
    video = tmp_path / "out.mp4"
    argv = ["generate", "--model", str(model), "--preset", "wan2.1-1.3b", "--steps", "2", "--prompt", "a cat"]
    argv += ["--height", "64", "--width", "64", "--frames", "5", "--output", str(video), "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "seconds per step" in out and "mean attention density" in out
    assert iio.imread(video, index=None).shape == (5, 64, 64, 3)


@pytest.fixture(scope="module")
def tiny_cogvideox_with_lora(tmp_path_factory):
    """A saved tiny CogVideoX pipeline and a rank-4 LoRA for it in a folder."""
    from diffusers import CogVideoXPipeline

    from psa_diffusers.diffusers.tiny import tiny_cogvideox_pipeline

    root = tmp_path_factory.mktemp("cli-lora")
    pipe = tiny_cogvideox_pipeline()
    pipe.save_pretrained(root / "tiny-cogvideox")
    layers = {}
    for name, module in pipe.transformer.named_modules():
        if name.endswith(("attn1.to_q", "attn1.to_k")):
            layers[f"{name}.lora_A.weight"] = module.weight.new_full((4, module.in_features), 0.01)
            layers[f"{name}.lora_B.weight"] = module.weight.new_full((module.out_features, 4), 0.01)
    CogVideoXPipeline.save_lora_weights(root / "lora" / "sub", transformer_lora_layers=layers)
    return root


def test_generate_with_a_local_lora(tiny_cogvideox_with_lora, tmp_path, capsys):
    import imageio.v3 as iio

    root = tiny_cogvideox_with_lora
    video = tmp_path / "lora.mp4"
    argv = ["generate", "--model", str(root / "tiny-cogvideox"), "--prompt", "a cat", "--steps", "2"]
    argv += ["--lora", str(root / "lora"), "--lora-weight-name", "sub/pytorch_lora_weights.safetensors"]
    argv += ["--height", "64", "--width", "64", "--frames", "9", "--output", str(video), "--device", "cpu"]
    assert main(argv) == 0
    assert f"wrote {video}" in capsys.readouterr().out
    assert iio.imread(video, index=None).shape == (9, 64, 64, 3)


def test_generate_refuses_a_lora_weight_name_outside_the_folder(tiny_cogvideox_with_lora, tmp_path, capsys):
    root = tiny_cogvideox_with_lora
    argv = ["generate", "--model", str(root / "tiny-cogvideox"), "--lora", str(root / "lora" / "sub")]
    argv += ["--lora-weight-name", "../../tiny-cogvideox/model_index.json", "--output", str(tmp_path / "x.mp4")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "contains '..'" in err and "Traceback" not in err
    assert not (tmp_path / "x.mp4").exists()
