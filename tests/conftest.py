"""Test setup: the Triton kernels run under Triton's interpreter where no CUDA device exists.

``TRITON_INTERPRET`` is read when a kernel is defined, so it must be set before
any kernel module is imported; conftest.py is imported before every test module.
Nothing else here affects other tests.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
