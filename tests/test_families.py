"""Model-family detection in one place (psa_diffusers.diffusers.families): transformers, pipelines,
hub ids / local pipeline directories (model_index.json), and the preset listing a model."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from psa_diffusers.diffusers import enable_psa  # noqa: E402
from psa_diffusers.diffusers.families import (  # noqa: E402
    FAMILIES,
    FPS,
    family_of_model,
    family_of_pipeline,
    family_of_transformer,
    preset_for_model,
)
from psa_diffusers.diffusers.tiny import (  # noqa: E402
    tiny_cogvideox_pipeline,
    tiny_cogvideox_transformer,
    tiny_wan_pipeline,
    tiny_wan_transformer,
)


def test_family_of_transformer():
    assert family_of_transformer(tiny_cogvideox_transformer()) == "cogvideox"
    assert family_of_transformer(tiny_cogvideox_transformer(rotary=False, patch_size_t=2)) == "cogvideox"
    assert family_of_transformer(tiny_wan_transformer()) == "wan"
    assert family_of_transformer(torch.nn.Linear(4, 4)) is None
    assert family_of_transformer(None) is None


def test_family_of_pipeline():
    assert family_of_pipeline(tiny_cogvideox_pipeline()) == "cogvideox"
    assert family_of_pipeline(tiny_wan_pipeline()) == "wan"
    assert family_of_pipeline(tiny_wan_pipeline(two_experts=True)) == "wan"
    # Wan2.2 may run with the low-noise expert only
    assert family_of_pipeline(SimpleNamespace(transformer=None, transformer_2=tiny_wan_transformer())) == "wan"
    assert family_of_pipeline(SimpleNamespace(transformer=torch.nn.Linear(4, 4))) is None
    assert family_of_pipeline(object()) is None


def _pipeline_dir(tmp_path, class_name: str):
    directory = tmp_path / class_name
    directory.mkdir()
    (directory / "model_index.json").write_text(json.dumps({"_class_name": class_name, "_diffusers_version": "0.42.1"}))
    return directory


@pytest.mark.parametrize(
    "class_name, family",
    [
        ("CogVideoXPipeline", "cogvideox"),
        ("CogVideoXImageToVideoPipeline", "cogvideox"),
        ("WanPipeline", "wan"),
        ("WanImageToVideoPipeline", "wan"),
    ],
)
def test_family_of_model_reads_model_index(tmp_path, class_name, family):
    assert family_of_model(_pipeline_dir(tmp_path, class_name)) == family
    assert family_of_model(str(tmp_path / class_name)) == family  # a str as well as a Path


def test_family_of_a_saved_pipeline(tmp_path):
    tiny_wan_pipeline().save_pretrained(tmp_path / "tiny-wan")
    assert family_of_model(tmp_path / "tiny-wan") == "wan"


def test_unknown_model_is_a_clear_error(tmp_path):
    directory = _pipeline_dir(tmp_path, "StableDiffusionPipeline")
    with pytest.raises(ValueError, match="StableDiffusionPipeline is neither CogVideoX nor Wan") as err:
        family_of_model(directory)
    assert str(directory) in str(err.value)


def test_missing_or_unreadable_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such local pipeline directory"):
        family_of_model(tmp_path / "no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="cannot read the pipeline's model_index.json"):
        family_of_model(tmp_path / "empty")


def test_enable_psa_refuses_an_unknown_transformer_clearly():
    with pytest.raises(ValueError, match="PSA supports CogVideoXTransformer3DModel and WanTransformer3DModel"):
        enable_psa(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_preset_for_model():
    assert preset_for_model("THUDM/CogVideoX-5b", "cogvideox") == "cogvideox-5b"  # not the -4step LoRA preset
    assert preset_for_model("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "wan") == "wan2.1-1.3b"
    assert preset_for_model("/models/wan2.1-t2v-1.3b-diffusers", "wan") == "wan2.1-1.3b"  # a local copy
    with pytest.raises(ValueError, match="no built-in preset lists this model"):
        preset_for_model("THUDM/CogVideoX-5b", "wan")  # a model of the other family


def test_every_family_has_a_frame_rate():
    assert set(FPS) == set(FAMILIES) == {"cogvideox", "wan"}
