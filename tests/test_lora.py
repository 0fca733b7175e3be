"""load_psa_lora on a tiny random CogVideoX pipeline (offline): a good LoRA loads and changes the output;
every bad file is refused with a ValueError naming it and leaves the pipeline bit-identical."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers import CogVideoXPipeline  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from psa_diffusers.diffusers import enable_psa  # noqa: E402
from psa_diffusers.diffusers.lora import load_psa_lora  # noqa: E402
from psa_diffusers.diffusers.state import DENSE_FALLBACK, DENSE_STEP  # noqa: E402
from psa_diffusers.diffusers.tiny import tiny_call_kwargs, tiny_cogvideox_pipeline  # noqa: E402

RANK = 4
TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")
WEIGHT = "pytorch_lora_weights.safetensors"


def lora_layers(transformer, *, scale: float = 0.3, zero_b: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """A rank-4 LoRA on every self-attention projection: ``{"<module>.lora_A.weight": ...}`` (no prefix)."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in transformer.named_modules():
        if name.endswith(TARGETS):
            layers[f"{name}.lora_A.weight"] = torch.randn(RANK, module.in_features, generator=g) * scale
            b = torch.randn(module.out_features, RANK, generator=g) * scale
            layers[f"{name}.lora_B.weight"] = torch.zeros_like(b) if zero_b else b
    return layers


def save_diffusers_lora(directory, layers) -> str:
    """Save through diffusers' own writer, so the key layout is exactly diffusers'."""
    CogVideoXPipeline.save_lora_weights(directory, transformer_lora_layers=layers)
    return str(directory / WEIGHT)


@pytest.fixture(scope="module")
def good_lora(tmp_path_factory):
    directory = tmp_path_factory.mktemp("good")
    return save_diffusers_lora(directory, lora_layers(tiny_cogvideox_pipeline().transformer))


@pytest.fixture(scope="module")
def identity_lora(tmp_path_factory):
    """The same modules with lora_B = 0: loading it changes nothing but the scheduler and PSA."""
    directory = tmp_path_factory.mktemp("identity")
    return save_diffusers_lora(directory, lora_layers(tiny_cogvideox_pipeline().transformer, zero_b=True))


@pytest.fixture
def pipe():
    return tiny_cogvideox_pipeline()


def call(pipe, **extra):
    kwargs = tiny_call_kwargs(num_inference_steps=2, guidance_scale=1.0, height=64, width=64)
    kwargs.update(extra)
    return pipe(**kwargs).frames


def snapshot(pipe) -> dict:
    transformer = pipe.transformer
    state = {f"p:{k}": v.detach().clone() for k, v in transformer.named_parameters()}
    state.update({f"b:{k}": v.detach().clone() for k, v in transformer.named_buffers()})
    registry = getattr(transformer, "_diffusers_hook", None)
    return {
        "tensors": state,
        "modules": [(name, type(m)) for name, m in transformer.named_modules()],
        "scheduler": pipe.scheduler,
        "scheduler_class": type(pipe.scheduler),
        "scheduler_config": dict(pipe.scheduler.config),
        "processors": dict(transformer.attn_processors),
        "peft": {a: transformer.__dict__.get(a, "<absent>") for a in ("peft_config", "_hf_peft_config_loaded")},
        "pipe_config": dict(pipe.config),
        # enable_psa/disable_psa leave an empty diffusers HookRegistry behind: no hooks == no registry
        "hooks": sorted(registry.hooks) if registry is not None else [],
    }


def assert_unchanged(pipe, before: dict) -> None:
    after = snapshot(pipe)
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, value in before["tensors"].items():
        assert torch.equal(after["tensors"][key], value), key
    assert after["modules"] == before["modules"]
    assert after["scheduler"] is before["scheduler"]
    assert after["scheduler_class"] is before["scheduler_class"]
    assert after["scheduler_config"] == before["scheduler_config"]
    assert after["processors"].keys() == before["processors"].keys()
    for key, proc in before["processors"].items():
        assert after["processors"][key] is proc, key
    assert after["peft"] == before["peft"] == {"peft_config": "<absent>", "_hf_peft_config_loaded": "<absent>"}
    assert after["pipe_config"] == before["pipe_config"]
    assert after["hooks"] == before["hooks"]


# ------------------------------------------------------------------------------------------ good file


def test_load_switches_scheduler_enables_psa_and_returns_call_kwargs(pipe, good_lora):
    lora = load_psa_lora(pipe, good_lora)
    assert lora.call_kwargs == {"num_inference_steps": 4, "guidance_scale": 1.0}
    assert type(pipe.scheduler).__name__ == "CogVideoXDPMScheduler"
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    assert lora.modules == 2 * len(TARGETS)
    assert "psa" in pipe.transformer.peft_config
    assert lora.handle.enabled
    call(pipe, **lora.call_kwargs)
    stats = lora.handle.stats()
    assert sorted(stats) == [0, 1, 2, 3]  # PSA from step 0 on all four steps: no dense warm-up step
    layers = [s for layers in stats.values() for s in layers.values()]
    assert all(s.reason != DENSE_STEP for s in layers)
    # a mask in every call, but for layers the dense fallback runs dense without measuring (random weights)
    assert all(s.mask_density < 1 for s in layers if s.mask_density is not None)
    assert all(s.mask_density is not None or s.reason == DENSE_FALLBACK for s in layers)
    assert all(s.mask_density is not None for s in stats[0].values())


def test_lora_weights_change_the_output(good_lora, identity_lora):
    """Same scheduler, PSA and steps; only the LoRA's weights differ."""
    outputs = []
    for file in (identity_lora, good_lora):
        pipe = tiny_cogvideox_pipeline()
        lora = load_psa_lora(pipe, file)
        outputs.append(call(pipe, **{**lora.call_kwargs, "num_inference_steps": 2}))
    assert torch.isfinite(outputs[1]).all()
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3


def test_remove_restores_the_pipeline_and_its_output(pipe, good_lora):
    before = snapshot(pipe)
    base = call(pipe)
    lora = load_psa_lora(pipe, good_lora)
    lora.remove()
    assert_unchanged(pipe, before)
    assert torch.equal(call(pipe), base)


def test_fuse_matches_unfused_and_remove_unfuses(pipe, good_lora):
    before = snapshot(pipe)
    other = tiny_cogvideox_pipeline()
    unfused = call(other, **{**load_psa_lora(other, good_lora).call_kwargs, "num_inference_steps": 2})
    fused = load_psa_lora(pipe, good_lora, fuse=True)
    assert fused.fused
    out = call(pipe, **{**fused.call_kwargs, "num_inference_steps": 2})
    assert torch.allclose(out, unfused, rtol=1e-4, atol=1e-4)
    fused.remove()
    assert_unchanged(pipe, before)


def test_directory_and_file_paths(pipe, good_lora, tmp_path):
    from pathlib import Path

    lora = load_psa_lora(pipe, Path(good_lora).parent, WEIGHT)
    assert lora.weight_file == good_lora
    lora.remove()
    lora = load_psa_lora(pipe, good_lora, weight_name=None)  # a file: weight_name is not needed
    lora.remove()


# ------------------------------------------------------------------------------------------ bad files


def _good(pipe) -> dict[str, torch.Tensor]:
    return {f"transformer.{k}": v for k, v in lora_layers(pipe.transformer).items()}


def _bad_files(pipe):
    good = _good(pipe)
    q_a = "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight"
    q_b = "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight"
    return {
        "no_lora_keys": ({"transformer.transformer_blocks.0.attn1.to_q.weight": torch.zeros(32, 32)}, "no LoRA keys"),
        "wan_keys": (
            {k.replace("transformer.transformer_blocks.", "transformer.blocks."): v for k, v in good.items()},
            "another model family",
        ),
        "partial": (
            {
                **good,
                "transformer.transformer_blocks.7.attn1.to_q.lora_A.weight": good[q_a],
                "transformer.transformer_blocks.7.attn1.to_q.lora_B.weight": good[q_b],
            },
            "partial match: 1 of 9",
        ),
        "shape": ({**good, q_a: torch.zeros(RANK, 48), q_b: torch.zeros(48, RANK)}, "shape mismatch"),
        "rank": ({**good, q_b: torch.zeros(32, 8)}, "rank mismatch"),
        "unpaired": ({k: v for k, v in good.items() if k != q_b}, "no lora_B.weight"),
        "no_prefix": ({k[len("transformer.") :]: v for k, v in good.items()}, "not for the pipeline's transformer"),
        "non_finite": ({**good, q_a: torch.full((RANK, 32), float("nan"))}, "NaN"),
        "integer": ({**good, q_a: torch.zeros(RANK, 32, dtype=torch.int32)}, "not floating point"),
    }


BAD_CASES = ["no_lora_keys", "wan_keys", "partial", "shape", "rank", "unpaired", "no_prefix", "non_finite", "integer"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_file_is_refused_and_pipeline_untouched(pipe, tmp_path, case):
    tensors, reason = _bad_files(pipe)[case]
    path = tmp_path / f"{case}.safetensors"
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path))
    before = snapshot(pipe)
    with pytest.raises(ValueError) as err:
        load_psa_lora(pipe, path)
    assert str(path) in str(err.value)
    assert reason in str(err.value)
    assert_unchanged(pipe, before)


def test_metadata_rank_disagreeing_with_tensors_is_refused(pipe, tmp_path):
    path = tmp_path / "meta.safetensors"
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 8, "transformer.lora_alpha": 8}), "format": "pt"}
    save_file(_good(pipe), str(path), metadata=meta)
    before = snapshot(pipe)
    with pytest.raises(ValueError, match="metadata says r=8"):
        load_psa_lora(pipe, path)
    assert_unchanged(pipe, before)


def test_garbage_file_is_refused(pipe, tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"this is not a safetensors file")
    before = snapshot(pipe)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_psa_lora(pipe, path)
    assert_unchanged(pipe, before)


def test_missing_local_file(pipe, tmp_path):
    before = snapshot(pipe)
    with pytest.raises(FileNotFoundError, match="no such LoRA file"):
        load_psa_lora(pipe, tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="no such LoRA file"):
        load_psa_lora(pipe, tmp_path, "missing.safetensors")
    assert_unchanged(pipe, before)


def test_hub_offline_says_so(pipe, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    before = snapshot(pipe)
    with pytest.raises(OSError, match="HF_HUB_OFFLINE is set") as err:
        load_psa_lora(pipe)  # GYP666/BLADE: not cached here
    assert "GYP666/BLADE" in str(err.value) and "local path" in str(err.value)
    assert_unchanged(pipe, before)


def test_unreachable_hub_says_so(pipe, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    def no_network(*args, **kwargs):
        raise LocalEntryNotFoundError("connection error")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    with pytest.raises(OSError, match="cannot be reached"):
        load_psa_lora(pipe)


# ------------------------------------------------------------------------------------------ refusals and rollback


def test_failure_after_loading_rolls_everything_back(pipe, good_lora, monkeypatch):
    import psa_diffusers.diffusers.enable as enable

    def broken(*args, **kwargs):
        raise RuntimeError("enable_psa broke")

    monkeypatch.setattr(enable, "enable_psa", broken)
    before = snapshot(pipe)
    base = call(pipe)
    with pytest.raises(RuntimeError, match="enable_psa broke"):
        load_psa_lora(pipe, good_lora)
    assert_unchanged(pipe, before)
    assert torch.equal(call(pipe), base)


def test_failure_while_fusing_rolls_back(pipe, good_lora, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("fuse broke")

    monkeypatch.setattr(type(pipe), "fuse_lora", broken)
    before = snapshot(pipe)
    with pytest.raises(RuntimeError, match="fuse broke"):
        load_psa_lora(pipe, good_lora, fuse=True)
    monkeypatch.undo()
    assert_unchanged(pipe, before)


def test_refuses_when_psa_is_already_enabled(pipe, good_lora):
    handle = enable_psa(pipe)
    scheduler = pipe.scheduler
    with pytest.raises(ValueError, match="already enabled"):
        load_psa_lora(pipe, good_lora)
    assert pipe.scheduler is scheduler and "peft_config" not in pipe.transformer.__dict__
    handle.disable()


def test_refuses_a_preset_of_another_family(pipe, good_lora):
    before = snapshot(pipe)
    with pytest.raises(ValueError, match="wan"):
        load_psa_lora(pipe, good_lora, preset="wan2.1-1.3b")
    assert_unchanged(pipe, before)


# ------------------------------------------------------------------------------------------ untrusted files


Q = "transformer.transformer_blocks.0.attn1.to_q"
MODULES = [f"transformer.transformer_blocks.{i}.{t}" for i in range(2) for t in TARGETS]

MALFORMED_METADATA = {
    "not_json": "{not json",
    "json_list": "[1, 2]",
    "json_number": "4",
    "json_null": "null",
    "no_transformer_entries": json.dumps({"r": 4, "lora_alpha": 4}),
    "r_not_an_integer": json.dumps({"transformer.r": "4", "transformer.lora_alpha": 4}),
    "rank_pattern_a_list": json.dumps({"transformer.r": 4, "transformer.rank_pattern": ["to_q", 2]}),
    "rank_pattern_a_string": json.dumps({"transformer.r": 4, "transformer.rank_pattern": "to_q"}),
    "rank_pattern_bad_regex": json.dumps({"transformer.r": 4, "transformer.rank_pattern": {"to_(q": 4}}),
    "rank_pattern_rank_not_an_integer": json.dumps({"transformer.r": 4, "transformer.rank_pattern": {"to_q": "four"}}),
    "lora_bias_not_a_bool": json.dumps({"transformer.r": 4, "transformer.lora_bias": "no"}),
}


def _metadata(text: str) -> dict[str, str]:
    return {"lora_adapter_metadata": text, "format": "pt"}


@pytest.mark.parametrize("case", sorted(MALFORMED_METADATA))
def test_malformed_metadata_is_a_value_error_naming_the_file(pipe, tmp_path, case):
    path = tmp_path / f"{case}.safetensors"
    save_file(_good(pipe), str(path), metadata=_metadata(MALFORMED_METADATA[case]))
    before = snapshot(pipe)
    with pytest.raises(ValueError) as err:
        load_psa_lora(pipe, path)
    assert str(path) in str(err.value) and "lora_adapter_metadata" in str(err.value)
    assert_unchanged(pipe, before)


def test_metadata_with_a_rank_pattern_loads(pipe, tmp_path):
    """diffusers-style metadata (prefixed entries, a regex rank_pattern) is accepted and loads."""
    tensors = _good(pipe)
    for module in MODULES:
        if module.endswith("to_q"):  # rank 2 on to_q, 4 elsewhere
            tensors[f"{module}.lora_A.weight"] = tensors[f"{module}.lora_A.weight"][:2].clone()
            tensors[f"{module}.lora_B.weight"] = tensors[f"{module}.lora_B.weight"][:, :2].clone()
    meta = {"r": RANK, "lora_alpha": RANK, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
    meta |= {"rank_pattern": {r"attn1\.to_q": 2}, "alpha_pattern": {r"attn1\.to_q": 2}}
    path = tmp_path / "meta_ok.safetensors"
    save_file(tensors, str(path), metadata=_metadata(json.dumps({f"transformer.{k}": v for k, v in meta.items()})))
    lora = load_psa_lora(pipe, path)
    assert lora.modules == len(MODULES)
    assert pipe.transformer.get_submodule(Q[len("transformer.") :]).r["psa"] == 2
    lora.remove()


@pytest.mark.parametrize("part", ["lora_B.bias", "lora_magnitude_vector"])
def test_a_part_on_only_some_modules_is_refused(pipe, tmp_path, part):
    """diffusers gives every module the part if any key has it, and loads the others only partially."""
    path = tmp_path / "some.safetensors"
    save_file({**_good(pipe), f"{Q}.{part}": torch.ones(32)}, str(path))
    before = snapshot(pipe)
    with pytest.raises(ValueError) as err:
        load_psa_lora(pipe, path)
    message = str(err.value)
    assert str(path) in message and part in message
    assert "transformer_blocks.0.attn1.to_k" in message  # one module without the part
    assert_unchanged(pipe, before)


@pytest.mark.parametrize("part", ["lora_B.bias", "lora_magnitude_vector"])
def test_a_part_on_every_module_loads_in_full(pipe, tmp_path, part):
    before = snapshot(pipe)
    values = {
        module: torch.rand(32, generator=torch.Generator().manual_seed(i)) + 0.5 for i, module in enumerate(MODULES)
    }
    path = tmp_path / "all.safetensors"
    save_file({**_good(pipe), **{f"{m}.{part}": v for m, v in values.items()}}, str(path))
    lora = load_psa_lora(pipe, path)
    for module, value in values.items():
        layer = pipe.transformer.get_submodule(module[len("transformer.") :])
        loaded = layer.lora_B["psa"].bias if part == "lora_B.bias" else layer.lora_magnitude_vector["psa"].weight
        assert torch.equal(loaded.detach(), value), module
    lora.remove()
    assert_unchanged(pipe, before)


def test_metadata_without_lora_bias_for_a_file_with_biases_is_refused(pipe, tmp_path):
    """With metadata, diffusers takes lora_bias from it: the file's biases would be dropped with a warning."""
    path = tmp_path / "bias_meta.safetensors"
    tensors = {**_good(pipe), **{f"{m}.lora_B.bias": torch.ones(32) for m in MODULES}}
    meta = {"transformer.r": RANK, "transformer.lora_alpha": RANK, "transformer.target_modules": ["to_q"]}
    save_file(tensors, str(path), metadata=_metadata(json.dumps(meta)))
    before = snapshot(pipe)
    with pytest.raises(ValueError, match="lora_bias") as err:
        load_psa_lora(pipe, path)
    assert str(path) in str(err.value)
    assert_unchanged(pipe, before)


def _escaping_names(folder, good_lora) -> dict[str, str]:
    import os
    from pathlib import Path

    (folder / "link").symlink_to(Path(good_lora).parent, target_is_directory=True)
    return {
        "dot_dot": os.path.relpath(good_lora, folder),
        "dot_dot_inside": "sub/../" + os.path.relpath(good_lora, folder),
        "absolute": str(Path(good_lora).resolve()),
        "backslash_dot_dot": "..\\" + Path(good_lora).name,
        "symlinked_folder": f"link/{WEIGHT}",
    }


@pytest.mark.parametrize("case", ["dot_dot", "dot_dot_inside", "absolute", "backslash_dot_dot", "symlinked_folder"])
def test_weight_name_outside_the_folder_is_refused(pipe, good_lora, tmp_path, case):
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    weight_name = _escaping_names(folder, good_lora)[case]
    before = snapshot(pipe)
    with pytest.raises(ValueError, match="weight_name") as err:
        load_psa_lora(pipe, folder, weight_name)
    assert str(folder) in str(err.value)
    assert_unchanged(pipe, before)


def test_weight_name_in_a_subfolder_and_a_symlinked_file_are_accepted(pipe, good_lora, tmp_path):
    """The default weight_name has a subfolder; hub cache snapshots hold files as symlinks to ../../blobs."""
    import shutil

    folder = tmp_path / "snapshot"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(good_lora, folder / "sub" / WEIGHT)
    (folder / WEIGHT).symlink_to(good_lora)
    for weight_name in (f"sub/{WEIGHT}", WEIGHT):
        load_psa_lora(pipe, folder, weight_name).remove()


def test_hub_weight_name_with_dot_dot_is_refused_before_any_download(pipe, monkeypatch):
    import huggingface_hub

    def no_download(*args, **kwargs):
        raise AssertionError("hf_hub_download must not be called")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    with pytest.raises(ValueError, match="weight_name"):
        load_psa_lora(pipe, "GYP666/BLADE", "../../outside.safetensors")
