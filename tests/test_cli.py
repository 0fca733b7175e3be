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
    from psa_diffusers.video import preset_for_model

    assert preset_for_model("Wan-AI/Wan2.1-T2V-14B-Diffusers", "wan") == "wan2.1-14b"
    assert preset_for_model("/models/CogVideoX-5b", "cogvideox") == "cogvideox-5b"  # a local copy, same name
    with pytest.raises(ValueError, match="--preset"):
        preset_for_model("someone/my-finetune", "wan")


def test_generate_on_a_saved_tiny_wan_pipeline(tmp_path, capsys):
    """The whole generate path offline: a local pipeline directory, PSA on, an mp4 out."""
    pytest.importorskip("diffusers")
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
