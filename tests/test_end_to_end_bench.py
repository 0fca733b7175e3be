"""benchmarks/end_to_end.py on a CPU: its arguments, its refusal without a GPU, and the call pattern
its timed steps use (the cache context that tells PSA the step, as WanPipeline does)."""

from __future__ import annotations

import pytest
import torch

from benchmarks import end_to_end
from psa_diffusers.diffusers import enable_psa
from tests.tiny_models import SPARSE, psa_logs_fixture, tiny_preset, tiny_wan_transformer  # noqa: F401


def test_help_lists_the_compile_option(capsys):
    with pytest.raises(SystemExit) as done:
        end_to_end.main(["--help"])
    assert done.value.code == 0
    assert "--compile [{whole,blocks}]" in capsys.readouterr().out


@pytest.mark.parametrize("argv, compile_", [([], None), (["--compile"], "whole"), (["--compile", "blocks"], "blocks")])
def test_compile_option(argv, compile_):
    assert end_to_end.parse_args(argv).compile == compile_


@pytest.mark.parametrize("argv", [["--compile", "all"], ["--layers", "0"], ["--models", "sd3"]])
def test_bad_arguments_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as done:
        end_to_end.parse_args(argv)
    assert done.value.code == 2 and "usage:" in capsys.readouterr().err


def test_cogvideox_compiles_whole_when_blocks_are_asked():
    cases = end_to_end.CASES
    assert end_to_end.compile_mode(cases["cogvideox-5b"], "blocks") == "whole"
    assert end_to_end.compile_mode(cases["wan2.1-1.3b-480p"], "blocks") == "blocks"
    assert end_to_end.compile_mode(cases["wan2.1-1.3b-480p"], None) is None
    with pytest.raises(ValueError, match="compile='all'"):
        end_to_end.compile_model(torch.nn.Linear(1, 1), "all")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_it_says_so_and_succeeds(capsys):
    assert end_to_end.main(["--compile"]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out


@pytest.mark.parametrize("forwards", [1, 2])
def test_step_runner_gives_psa_its_steps_from_the_host(forwards, psa_logs):
    model = tiny_wan_transformer(num_layers=1)
    g = torch.Generator().manual_seed(0)
    args = dict(
        hidden_states=torch.randn(1, 16, 5, 32, 32, generator=g),
        encoder_hidden_states=torch.randn(1, 16, 32, generator=g),
        timestep=torch.full((1,), 500, dtype=torch.long),  # not a schedule view: the context tells the step
        return_dict=False,
    )
    runner = end_to_end.StepRunner(model, args, forwards, num_steps=4)
    with torch.no_grad(), enable_psa(model, preset=tiny_preset("wan", config=SPARSE)) as handle:
        for _ in range(4):
            runner()
        stats = handle.stats()
    layers = [next(iter(stats[i].values())) for i in range(4)]
    assert [s.dense for s in layers] == [True, True, False, False]
    assert all(s.calls == forwards for s in layers)
    assert not [r for r in psa_logs.records if r.name.startswith("diffusers.psa_diffusers") and r.levelno >= 30]


def test_mean_mask_density_skips_calls_without_a_mask():
    from psa_diffusers.diffusers import LayerStats

    stats = {
        0: {"a": LayerStats(1.0, True, "dense step (preset schedule)", 1)},
        1: {"a": LayerStats(1.0, True, "dense fallback", 1, mask_density=0.8, dense_heads=2)},
        2: {"a": LayerStats(0.2, False, None, 1, mask_density=0.2)},
    }
    assert end_to_end.mean_mask_density(stats) == pytest.approx(0.5)
    assert end_to_end.mean_mask_density({}) != end_to_end.mean_mask_density({})  # NaN
