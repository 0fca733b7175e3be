"""Presets: the table of docs/design.md, section 4, step schedules, file loading and its error messages."""

from __future__ import annotations

import dataclasses
import inspect
import json
import time
from importlib import resources

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from psa_diffusers.config import PSAConfig
from psa_diffusers.presets import MAX_DEPTH, MAX_FILE_BYTES, Preset, get_preset, list_presets, load_preset

# docs/design.md, section 4, written out by hand (not read from the JSON files):
# name: (family, steps, dense steps, mode, budgets, block_q, block_kv, token_order, sim_thresholds)
DESIGN_TABLE = {
    "cogvideox-5b": ("cogvideox", 50, 15, "quota", (0.10, 0.05, 0.0, 0.20), 128, 128, "none", None),
    "cogvideox-5b-4step": ("cogvideox", 4, 0, "quota", (0.05, 0.10, 0.10, 0.25), 128, 128, "none", None),
    "cogvideox1.5-5b": ("cogvideox", 50, 15, "quota", (0.10, 0.05, 0.0, 0.20), 128, 32, "gilbert", None),
    "wan2.1-1.3b": ("wan", 50, 15, "mass", (0.5, 0.6, 0.7, 0.8), 128, 128, "gilbert", (0.7, 0.65, 0.6)),
    "wan2.1-14b": ("wan", 50, 15, "mass", (0.4, 0.5, 0.6, 0.8), 128, 128, "gilbert", None),
    "wan2.2-a14b": ("wan", 40, 12, "mass", (0.5, 0.6, 0.6, 0.8), 128, 32, "gilbert", None),
    "wan2.2-5b": ("wan", 50, 15, "mass", (0.6, 0.7, 0.7, 0.8), 128, 32, "gilbert", None),
}
MODELS = {
    "cogvideox-5b": "THUDM/CogVideoX-5b",
    "cogvideox-5b-4step": "THUDM/CogVideoX-5b",
    "cogvideox1.5-5b": "THUDM/CogVideoX1.5-5B",
    "wan2.1-1.3b": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    "wan2.1-14b": "Wan-AI/Wan2.1-T2V-14B-Diffusers",
    "wan2.2-a14b": "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
    "wan2.2-5b": "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
}


# -- the built-in presets ------------------------------------------------------------------------


def test_list_presets_is_the_design_table():
    assert sorted(list_presets()) == sorted(DESIGN_TABLE)
    assert len(list_presets()) == 7


def test_every_listed_preset_ships_as_json_and_nothing_else():
    files = {p.name for p in resources.files("psa_diffusers.presets").iterdir() if p.name.endswith(".json")}
    assert files == {f"{name}.json" for name in list_presets()}


@pytest.mark.parametrize("name", sorted(DESIGN_TABLE))
def test_preset_matches_design_table(name):
    family, steps, dense, mode, budgets, block_q, block_kv, order, sims = DESIGN_TABLE[name]
    p = get_preset(name)
    assert p.name == name
    assert (p.family, p.num_steps, p.dense_steps) == (family, steps, dense)
    c = p.config
    assert (c.mode, c.block_q, c.block_kv, c.token_order) == (mode, block_q, block_kv, order)
    assert c.budgets == budgets
    assert c.sim_thresholds == sims
    assert c.min_full_share == 0.06
    assert MODELS[name] in p.models
    assert p.description


@pytest.mark.parametrize("name", sorted(DESIGN_TABLE))
def test_preset_json_files_spell_out_every_field(name):
    text = resources.files("psa_diffusers.presets").joinpath(f"{name}.json").read_text(encoding="utf-8")
    data = json.loads(text)
    assert set(data) == {f.name for f in dataclasses.fields(Preset)}
    assert set(data["config"]) == {f.name for f in dataclasses.fields(PSAConfig)}


def test_four_step_recipe_extras():
    p = get_preset("cogvideox-5b-4step")
    assert p.guidance_scale == 1.0
    assert p.scheduler == "CogVideoXDPMScheduler"
    assert p.scheduler_kwargs_dict() == {"timestep_spacing": "trailing"}
    for name in set(DESIGN_TABLE) - {"cogvideox-5b-4step"}:
        other = get_preset(name)
        assert (other.guidance_scale, other.scheduler, other.scheduler_kwargs) == (None, None, ())


@pytest.mark.slow
def test_preset_schedulers_exist_in_diffusers():
    import diffusers
    for name in list_presets():
        p = get_preset(name)
        if p.scheduler is None:
            continue
        cls = getattr(diffusers, p.scheduler)
        params = inspect.signature(cls.__init__).parameters
        assert set(p.scheduler_kwargs_dict()) <= set(params), name


def test_get_preset_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="wan2.1-13b") as info:
        get_preset("wan2.1-13b")
    for name in DESIGN_TABLE:
        assert name in str(info.value)


def test_preset_is_frozen_and_hashable():
    p = get_preset("wan2.1-1.3b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.num_steps = 10  # type: ignore[misc]
    assert hash(p) == hash(Preset.from_dict(p.to_dict()))
    d = p.to_dict()
    d["config"]["budgets"].append(1.0)
    d["models"].clear()
    assert get_preset("wan2.1-1.3b") == p and p.models


# -- schedules -----------------------------------------------------------------------------------


def _dense_count(preset, num_steps):
    flags = [preset.config_for_step(i, num_steps) is None for i in range(num_steps)]
    dense = flags.count(True)
    assert flags == [True] * dense + [False] * (num_steps - dense)  # dense steps lead
    return dense


def test_cogvideox_5b_dense_for_15_of_50():
    p = get_preset("cogvideox-5b")
    assert _dense_count(p, 50) == 15
    assert p.config_for_step(14, 50) is None
    assert p.config_for_step(15, 50) == p.config


def test_four_step_preset_is_psa_from_step_0():
    p = get_preset("cogvideox-5b-4step")
    assert [p.config_for_step(i, 4) for i in range(4)] == [p.config] * 4
    assert _dense_count(p, 8) == 0


def test_wan22_a14b_dense_for_12_of_40():
    p = get_preset("wan2.2-a14b")
    assert _dense_count(p, 40) == 12
    assert p.config_for_step(12, 40) is p.config


@pytest.mark.parametrize(
    ("name", "num_steps", "dense"),
    [
        ("cogvideox-5b", 25, 8),  # round(7.5) -> 8 (ties to even)
        ("cogvideox-5b", 30, 9),
        ("cogvideox-5b", 100, 30),
        ("wan2.2-a14b", 50, 15),
        ("wan2.2-a14b", 20, 6),
        ("wan2.1-1.3b", 1, 0),
        ("wan2.1-1.3b", 4, 1),
    ],
)
def test_schedule_scales_with_step_count(name, num_steps, dense):
    p = get_preset(name)
    assert p.dense_steps_for(num_steps) == dense
    assert _dense_count(p, num_steps) == dense


@pytest.mark.parametrize(("step", "num_steps", "bad"), [(-1, 50, "-1"), (50, 50, "50"), (0, 0, "0"), (1.0, 50, "1.0")])
def test_config_for_step_rejects_bad_arguments(step, num_steps, bad):
    with pytest.raises(ValueError, match=bad):
        get_preset("cogvideox-5b").config_for_step(step, num_steps)


# -- constructing and overriding -----------------------------------------------------------------


def test_with_config_replaces_fields_and_validates():
    p = get_preset("wan2.1-14b")
    q = p.with_config(budgets=[0.3, 0.4, 0.5, 0.9], token_order="none")
    assert q.config.budgets == (0.3, 0.4, 0.5, 0.9) and q.config.token_order == "none"
    assert (q.name, q.num_steps, q.dense_steps, q.config.block_kv) == (p.name, 50, 15, 128)
    assert p.config.token_order == "gilbert"
    with pytest.raises(ValueError, match="96"):
        p.with_config(block_kv=96)
    with pytest.raises(ValueError, match="block_k"):
        p.with_config(block_k=64)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"family": "hunyuan"}, "family"),
        ({"num_steps": 0}, "num_steps"),
        ({"dense_steps": 51}, "dense_steps"),
        ({"dense_steps": True}, "dense_steps"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"scheduler": "not a class"}, "scheduler"),
        ({"models": "THUDM/CogVideoX-5b"}, "models"),
        ({"scheduler_kwargs": {"x": object()}}, "scheduler_kwargs.x"),
        ({"config": {"block_q": 128}}, "config"),
    ],
)
def test_constructor_validates(change, field):
    with pytest.raises(ValueError, match=f"'{field}'"):
        dataclasses.replace(get_preset("cogvideox-5b"), **change)


# -- files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DESIGN_TABLE))
@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_file_round_trip(tmp_path, name, suffix):
    p = get_preset(name)
    path = tmp_path / f"mine{suffix}"
    data = p.to_dict()
    path.write_text(json.dumps(data) if suffix == ".json" else yaml.safe_dump(data), encoding="utf-8")
    assert load_preset(path) == p
    assert load_preset(str(path)) == p


def test_yaml_file_may_leave_out_optional_fields(tmp_path):
    path = tmp_path / "short.yaml"
    path.write_text(
        "name: tiny\nfamily: wan\nnum_steps: 30\ndense_steps: 9\n"
        "config:\n  mode: mass\n  budgets: [0.5, 0.6, 0.7, 0.8]\n  block_kv: 32\n",
        encoding="utf-8",
    )
    p = load_preset(path)
    assert p.config == PSAConfig(mode="mass", budgets=(0.5, 0.6, 0.7, 0.8), block_kv=32)
    assert (p.description, p.models, p.guidance_scale, p.scheduler, p.scheduler_kwargs) == ("", (), None, None, ())
    assert p.dense_steps_for(30) == 9


def _base():
    return get_preset("cogvideox-5b-4step").to_dict()


def _with(path, value):
    data = _base()
    *parents, last = path.split(".")
    target = data
    for key in parents:
        target = target[key]
    target[last] = value
    return data


def _without(path):
    data = _base()
    *parents, last = path.split(".")
    target = data
    for key in parents:
        target = target[key]
    del target[last]
    return data


# (file name, file content as data or raw text, strings the message must contain)
BAD_FILES = [
    ("kv.yaml", _with("config.block_kv", 96), ["'config.block_kv'=96", "allowed values are (32, 64, 128)"]),
    ("mode.json", _with("config.mode", "fast"), ["'config.mode'='fast'"]),
    ("quota.yml", _with("config.budgets", [0.5, 0.5, 0.5, 0.5]), ["'config.budgets'", "sum"]),
    ("mass.yaml", _with("config.budgets", [0.5, 0.4, 0.6, 0.8]), ["'config.budgets'"]),
    ("sims.yaml", _with("config.sim_thresholds", [0.7, 0.6]), ["'config.sim_thresholds'"]),
    ("stride.yaml", _with("config.importance_stride", 3), ["'config.importance_stride'=3"]),
    ("q_type.yaml", _with("config.block_q", "128"), ["'config.block_q'='128'", "integer"]),
    ("q_float.json", _with("config.block_q", 128.0), ["'config.block_q'=128.0"]),
    ("budget_type.yaml", _with("config.budgets", "0.1 0.1 0.1 0.1"), ["'config.budgets'"]),
    ("share_type.yaml", _with("config.min_full_share", True), ["'config.min_full_share'=True"]),
    ("config_type.yaml", _with("config", [128, 128]), ["'config'"]),
    ("unknown.yaml", {**_base(), "dense_step": 3}, ["'dense_step'", "unknown"]),
    ("unknown_cfg.json", _with("config.block_k", 64), ["'config.block_k'", "unknown"]),
    ("missing.yaml", _without("num_steps"), ["'num_steps'", "missing"]),
    ("missing_cfg.json", _without("config"), ["'config'", "missing"]),
    ("steps_type.yaml", _with("num_steps", "50"), ["'num_steps'='50'"]),
    ("steps_float.json", _with("num_steps", 50.0), ["'num_steps'=50.0"]),
    ("dense.yaml", _with("dense_steps", 5), ["'dense_steps'=5"]),
    ("family.yaml", _with("family", "hunyuan"), ["'family'='hunyuan'"]),
    ("models.yaml", _with("models", "THUDM/CogVideoX-5b"), ["'models'"]),
    ("guidance.yaml", _with("guidance_scale", True), ["'guidance_scale'=True"]),
    ("guidance_neg.json", _with("guidance_scale", -1), ["'guidance_scale'=-1"]),
    ("sched.yaml", _with("scheduler", 3), ["'scheduler'=3"]),
    ("sched_kw.yaml", _with("scheduler_kwargs", ["trailing"]), ["'scheduler_kwargs'"]),
    ("sched_kw_value.yaml", _with("scheduler_kwargs", {"x": {"y": 1}}), ["'scheduler_kwargs.x'"]),
    ("name.yaml", _with("name", ""), ["'name'=''"]),
    ("dup.json", '{"name": "a", "name": "b"}', ["'name'", "twice"]),
    ("dup.yaml", "name: a\nname: b\n", ["'name'", "twice"]),
    ("syntax.yaml", "name: [a\nfamily: wan\n", ["invalid YAML", "line"]),
    ("syntax.json", '{"name": "a",}', ["invalid JSON", "line"]),
    ("list.yaml", "- a\n- b\n", ["mapping", "list"]),
    ("empty.yaml", "", ["mapping", "NoneType"]),
    ("preset.toml", "name = 'a'\n", ["extension", "'.toml'"]),
    ("latin1.yaml", b"name: caf\xe9\n", ["cannot read"]),
]


@pytest.mark.parametrize(("file_name", "content", "expected"), BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_file_errors_name_file_and_field(tmp_path, file_name, content, expected):
    path = tmp_path / file_name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    elif file_name.endswith(".json"):
        path.write_text(json.dumps(content), encoding="utf-8")
    else:
        path.write_text(yaml.safe_dump(content), encoding="utf-8")
    with pytest.raises(ValueError) as info:
        load_preset(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    for part in expected:
        assert part in message


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "absent.yaml"
    with pytest.raises(ValueError, match="absent.yaml: cannot read"):
        load_preset(path)


def test_from_dict_uses_source_in_errors():
    with pytest.raises(ValueError, match=r"^<dict>: field 'num_steps'"):
        Preset.from_dict(_with("num_steps", 0))
    with pytest.raises(ValueError, match=r"^cli: field 'config.mode'"):
        Preset.from_dict(_with("config.mode", "x"), source="cli")


# -- property: to_dict / from_dict round trip -------------------------------------------------------

_finite = st.floats(allow_nan=False, allow_infinity=False)
_scalar = st.one_of(st.none(), st.booleans(), st.integers(), _finite, st.text(max_size=8))


@st.composite
def psa_configs(draw):
    mode = draw(st.sampled_from(["quota", "mass"]))
    if mode == "quota":
        budgets = draw(st.lists(st.floats(0.0, 0.25), min_size=4, max_size=4))
    else:
        budgets = sorted(draw(st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4)))
    block_q = draw(st.sampled_from([64, 128]))
    block_kv = draw(st.sampled_from([32, 64, 128]))
    return PSAConfig(
        block_q=block_q,
        block_kv=block_kv,
        mode=mode,
        budgets=tuple(budgets),
        min_full_share=draw(st.floats(0.0, 1.0)),
        sim_thresholds=draw(st.none() | st.tuples(*[st.floats(-1.0, 1.0)] * 3)),
        token_order=draw(st.sampled_from(["gilbert", "none"])),
        importance_stride=draw(st.sampled_from([1, 2, 4, 8, 16, 32])),
    )


@st.composite
def presets(draw):
    num_steps = draw(st.integers(1, 200))
    return Preset(
        name=draw(st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True)),
        family=draw(st.sampled_from(["cogvideox", "wan"])),
        description=draw(st.text(max_size=40)),
        models=draw(st.lists(st.from_regex(r"[A-Za-z0-9-]{1,8}/[A-Za-z0-9._-]{1,12}", fullmatch=True), max_size=3)),
        num_steps=num_steps,
        dense_steps=draw(st.integers(0, num_steps)),
        guidance_scale=draw(st.none() | st.floats(0.0, 20.0)),
        scheduler=draw(st.none() | st.from_regex(r"[A-Z][A-Za-z0-9]{0,20}", fullmatch=True)),
        scheduler_kwargs=draw(
            st.dictionaries(
                st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True),
                _scalar | st.lists(_scalar, max_size=3),
                max_size=3,
            )
        ),
        config=draw(psa_configs()),
    )


@settings(max_examples=60, deadline=None)
@given(presets())
def test_to_dict_from_dict_round_trips(preset):
    data = preset.to_dict()
    assert Preset.from_dict(data) == preset
    assert Preset.from_dict(json.loads(json.dumps(data))) == preset
    assert Preset.from_dict(yaml.safe_load(yaml.safe_dump(data))) == preset
    assert hash(Preset.from_dict(data)) == hash(preset)


# -- untrusted files: bounded size, depth, aliases and numbers ------------------------------------


def _load_timed(path):
    """load_preset(path) must refuse the file with a ValueError naming it, in well under 2 s."""
    start = time.perf_counter()
    with pytest.raises(ValueError) as info:
        load_preset(path)
    assert time.perf_counter() - start < 2.0
    assert str(info.value).startswith(f"{path}: ")
    return str(info.value)


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    # "billion laughs": each level lists the previous one ten times, 10**7 strings once expanded
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 7)]
    data = {k: v for k, v in _base().items() if k != "scheduler_kwargs"}
    path = tmp_path / "bomb.yaml"
    path.write_text(yaml.safe_dump(data) + "scheduler_kwargs:\n  " + "\n  ".join(lines) + "\n", encoding="utf-8")
    assert len(path.read_bytes()) < 1500
    assert "aliases" in _load_timed(path)


def test_yaml_alias_is_refused_even_when_small(tmp_path):
    path = tmp_path / "alias.yaml"
    data = {k: v for k, v in _base().items() if k not in ("description", "models")}
    path.write_text(yaml.safe_dump(data) + "description: &d hi\nmodels: [*d]\n", encoding="utf-8")
    assert "aliases" in _load_timed(path)


def _nested(depth):
    """A preset whose deepest list sits ``depth`` lists/mappings deep (top mapping and scheduler_kwargs count)."""
    value = "leaf"
    for _ in range(depth - 2):
        value = [value]
    return _with("scheduler_kwargs", {"x": value})


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_nesting_up_to_the_limit_loads(tmp_path, suffix):
    path = tmp_path / f"deep{suffix}"
    data = _nested(MAX_DEPTH)
    path.write_text(json.dumps(data) if suffix == ".json" else yaml.safe_dump(data), encoding="utf-8")
    assert load_preset(path) == Preset.from_dict(data)
    path.write_text(json.dumps(_nested(MAX_DEPTH + 1)), encoding="utf-8")  # JSON is YAML too
    assert "nested deeper than 32 levels" in _load_timed(path)


DEEP_FILES = [
    ("flow.json", '{"name": ' + "[" * 50_000 + "]" * 50_000 + "}"),
    ("object.json", '{"a": ' * 50_000 + "1" + "}" * 50_000),
    ("unclosed.json", "[" * 500_000),
    ("flow.yaml", "name: " + "[" * 50_000 + "]" * 50_000 + "\n"),
    ("block.yaml", "".join(" " * i + "a:\n" for i in range(1000)) + " " * 1000 + "b: 1\n"),
    ("dashes.yml", "- " * 50_000 + "x\n"),
]


@pytest.mark.parametrize(("file_name", "text"), DEEP_FILES, ids=[f[0] for f in DEEP_FILES])
def test_deep_nesting_is_refused_quickly(tmp_path, file_name, text):
    path = tmp_path / file_name
    path.write_text(text, encoding="utf-8")
    assert "nested deeper than 32 levels" in _load_timed(path)


def test_json_brackets_inside_strings_do_not_count(tmp_path):
    path = tmp_path / "brackets.json"
    path.write_text(json.dumps(_with("description", '[{ "\\" ' * 100)), encoding="utf-8")
    assert load_preset(path).description == '[{ "\\" ' * 100


HUGE = "1" + "0" * 4999  # beyond Python's int-string conversion limit (4300 digits)
BIG = "1" + "0" * 350  # converts, but beyond the float range
HUGE_NUMBERS = [
    ("num_steps", HUGE),
    ("config.block_q", HUGE),
    ("config.importance_stride", "-" + HUGE),
    ("scheduler_kwargs.seed", HUGE),
    ("guidance_scale", BIG),
    ("config.min_full_share", BIG),
    ("config.target_density", BIG),
    ("dense_steps", BIG),
]


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
@pytest.mark.parametrize(("field", "literal"), HUGE_NUMBERS, ids=[f"{f}-{len(v)}" for f, v in HUGE_NUMBERS])
def test_huge_integers_name_file_and_field(tmp_path, suffix, field, literal):
    path = tmp_path / f"huge{suffix}"
    data = _with(field, 123456789)
    text = json.dumps(data) if suffix == ".json" else yaml.safe_dump(data)
    path.write_text(text.replace("123456789", literal), encoding="utf-8")
    message = _load_timed(path)
    assert f"field '{field}'" in message and "too large" in message
    assert len(message) < 300


@pytest.mark.parametrize("field", ["num_steps", "guidance_scale", "config.budgets", "scheduler_kwargs.seed"])
def test_from_dict_refuses_huge_integers_naming_the_field(field):
    value = [10**5000, 0, 0, 0] if field == "config.budgets" else 10**5000
    with pytest.raises(ValueError, match=rf"^src: field '{field}': integer too large"):
        Preset.from_dict(_with(field, value), source="src")


def test_oversized_file_is_refused(tmp_path):
    path = tmp_path / "big.json"
    path.write_text(json.dumps(_with("description", "x" * MAX_FILE_BYTES)), encoding="utf-8")
    assert f"larger than {MAX_FILE_BYTES} bytes" in _load_timed(path)
    path.write_text(json.dumps(_with("description", "x" * (MAX_FILE_BYTES - 2000))), encoding="utf-8")
    assert load_preset(path).description == "x" * (MAX_FILE_BYTES - 2000)
