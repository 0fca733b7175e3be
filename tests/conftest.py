"""Test setup: the Triton kernels run under Triton's interpreter where no CUDA device exists.

``TRITON_INTERPRET`` is read when a kernel is defined, so it must be set before
any kernel module is imported; conftest.py is imported before every test module.
Every test also runs with kernel outputs poisoned (NaN, -1 for integers) before
the kernels write them, so a tile a kernel forgets to write fails its comparison.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    from psa_diffusers.ops import triton_support

    monkeypatch.setattr(triton_support, "POISON_OUTPUTS", True)
