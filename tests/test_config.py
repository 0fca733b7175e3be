import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from psa_diffusers.config import PSAConfig


def test_defaults_are_valid_and_frozen():
    cfg = PSAConfig()
    assert cfg.budgets == (0.10, 0.05, 0.0, 0.20)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.block_q = 64  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(block_q=32), ["block_q", "32", "(64, 128)"]),
        (dict(block_kv=96), ["block_kv", "96", "(32, 64, 128)"]),
        (dict(mode="topk"), ["mode", "topk", "quota"]),
        (dict(token_order="hilbert"), ["token_order", "hilbert"]),
        (dict(budgets=(0.1, -0.1, 0, 0)), ["budgets", "-0.1"]),
        (dict(budgets=(0.5, 0.3, 0.2, 0.2)), ["budgets", "sum"]),
        (dict(budgets=(0.1, 0.2)), ["budgets", "4 numbers"]),
        (dict(mode="mass", budgets=(0.5, 0.4, 0.7, 0.8)), ["budgets", "decrease"]),
        (dict(mode="mass", budgets=(0.5, 0.6, 0.7, 1.2)), ["budgets", "[0, 1]"]),
        (dict(min_full_share=1.5), ["min_full_share", "1.5"]),
        (dict(sim_thresholds=(0.7, 0.65)), ["sim_thresholds", "3 numbers"]),
        (dict(sim_thresholds=(0.7, 0.65, 2.0)), ["sim_thresholds", "[-1, 1]"]),
        (dict(importance_stride=3), ["importance_stride", "3"]),
        (dict(importance_stride=0), ["importance_stride", "0"]),
    ],
    ids=lambda x: str(x) if isinstance(x, dict) else "",
)
def test_invalid_values_name_field_and_value(kwargs, words):
    with pytest.raises(ValueError) as info:
        PSAConfig(**kwargs)
    for w in words:
        assert w in str(info.value)


def test_mass_mode_allows_equal_thresholds():
    assert PSAConfig(mode="mass", budgets=(0.5, 0.6, 0.6, 0.8)).budgets == (0.5, 0.6, 0.6, 0.8)


def test_from_dict_round_trip_and_unknown_field():
    cfg = PSAConfig(block_q=64, block_kv=32, mode="mass", budgets=(0.4, 0.5, 0.6, 0.8), sim_thresholds=(0.7, 0.6, 0.5))
    assert PSAConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="blocksize"):
        PSAConfig.from_dict({"blocksize": 64})


@given(
    shares=st.lists(st.floats(0, 0.25, allow_nan=False), min_size=4, max_size=4),
    bq=st.sampled_from([64, 128]),
    bkv=st.sampled_from([32, 64, 128]),
)
def test_any_quota_within_bounds_is_accepted(shares, bq, bkv):
    cfg = PSAConfig(block_q=bq, block_kv=bkv, budgets=tuple(shares))
    assert cfg.replace(mode="quota") == cfg


@pytest.mark.parametrize(
    "field, value",
    [
        ("block_q", 64.0),
        ("block_kv", 32.0),
        ("block_q", True),
        ("block_kv", False),
        ("importance_stride", True),
        ("importance_stride", 8.0),
    ],
    ids=lambda x: repr(x),
)
def test_integer_fields_refuse_floats_and_booleans(field, value):
    with pytest.raises(ValueError, match=rf"PSAConfig\.{field}=") as err:
        PSAConfig(**{field: value})
    assert "expected an int" in str(err.value)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(budgets=(True, 0.05, 0.0, 0.2)), "budgets"),
        (dict(sim_thresholds=(0.7, False, 0.6)), "sim_thresholds"),
        (dict(min_full_share=True), "min_full_share"),
        (dict(mode="budget", target_density=True), "target_density"),
        (dict(budgets=(10**400, 0, 0, 0)), "budgets"),
        (dict(budgets="abcd"), "budgets"),
        (dict(mode=1), "mode"),
    ],
    ids=["bool-budget", "bool-threshold", "bool-share", "bool-density", "huge-int", "string", "mode-int"],
)
def test_numeric_fields_refuse_booleans_and_junk(kwargs, field):
    with pytest.raises(ValueError, match=rf"PSAConfig\.{field}="):
        PSAConfig(**kwargs)


def test_integer_like_values_are_stored_as_int():
    import numpy as np
    cfg = PSAConfig(block_q=np.int64(64), block_kv=np.int32(32))
    assert type(cfg.block_q) is int and type(cfg.block_kv) is int and cfg.block_q == 64
