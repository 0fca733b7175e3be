"""The kernel configuration table: lookup order, overrides and their errors."""

from __future__ import annotations

import pytest
import torch

from psa_diffusers.ops import kernel_configs
from psa_diffusers.ops.kernel_configs import ANY, INTERPRETER, KERNEL_CONFIGS, kernel_config


@pytest.fixture
def table(monkeypatch):
    """A private table for the lookup tests, on a pretend sm90 device."""
    fake = {
        "k": {
            (ANY, 64, ANY): {"tile": 1},
            (ANY, 128, ANY): {"tile": 2},
            ("sm90", 128, ANY): {"tile": 3},
            ("sm90", 128, "float16"): {"tile": 4},
        }
    }
    monkeypatch.setattr(kernel_configs, "KERNEL_CONFIGS", fake)
    monkeypatch.setattr(kernel_configs, "device_arch", lambda device: "sm90")
    return fake


def test_exact_arch_and_dtype_win_then_the_smallest_head_dim_bound(table):
    assert kernel_config("k", device="cuda", head_dim=128, dtype=torch.float16)["tile"] == 4
    assert kernel_config("k", device="cuda", head_dim=128, dtype=torch.bfloat16)["tile"] == 3
    assert kernel_config("k", device="cuda", head_dim=64, dtype=torch.bfloat16)["tile"] == 3  # arch before dim
    table["k"].pop(("sm90", 128, ANY))
    table["k"].pop(("sm90", 128, "float16"))
    assert kernel_config("k", device="cuda", head_dim=48, dtype=torch.bfloat16)["tile"] == 1
    assert kernel_config("k", device="cuda", head_dim=80, dtype=torch.bfloat16)["tile"] == 2


def test_override_is_laid_over_a_copy(table):
    cfg = kernel_config("k", device="cuda", head_dim=64, dtype=torch.float16, override={"tile": 9})
    assert cfg == {"tile": 9}
    assert table["k"][("sm90", 128, "float16")] == {"tile": 4}


def test_unknown_kernel_or_override_key_is_a_clear_error(table):
    with pytest.raises(ValueError, match="kernel='nope'"):
        kernel_config("nope", device="cuda", head_dim=64, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['BLOCK_Z'\]"):
        kernel_config("k", device="cuda", head_dim=64, dtype=torch.float16, override={"BLOCK_Z": 1})
    with pytest.raises(ValueError, match="head_dim=512"):
        kernel_config("k", device="cuda", head_dim=512, dtype=torch.float16)


def test_every_kernel_has_an_entry_for_every_head_dim_and_dtype_on_every_arch(monkeypatch):
    for arch in ("sm80", "sm90", INTERPRETER):
        monkeypatch.setattr(kernel_configs, "device_arch", lambda device, arch=arch: arch)
        for kernel in KERNEL_CONFIGS:
            for d in (16, 64, 80, 128, 256):
                for dtype in (torch.float16, torch.bfloat16, torch.float32):
                    assert kernel_config(kernel, device="cuda", head_dim=d, dtype=dtype)
