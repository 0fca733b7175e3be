"""Pyramid pooling: the Triton kernel against the PyTorch reference, on CPU under Triton's interpreter.

Every launcher output is poisoned with NaN first (``triton_support.POISON_OUTPUTS``), so an
element the kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import pytest
import torch

from psa_diffusers.ops.pooling import pool_pyramid_reference, pool_pyramid_triton
from tests.helpers import DT_IDS, needs_interpreter

pytestmark = needs_interpreter


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DT_IDS.get)
@pytest.mark.parametrize("length", [203, 64, 9])
def test_pooling_matches_reference(dtype, length):
    x = torch.randn(2, 2, length, 40, generator=torch.Generator().manual_seed(length)).to(dtype)
    got = pool_pyramid_triton(x)
    ref = pool_pyramid_reference(x)
    assert sorted(got) == [1, 2, 4, 8]
    for s in (1, 2, 4, 8):
        assert got[s][0].shape == ref[s][0].shape and got[s][0].dtype == dtype
        assert torch.equal(got[s][1], ref[s][1])
        # fp32 sums in another order; for fp16 then one rounding: at most one fp16 ulp apart
        tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-10, atol=1e-4)
        torch.testing.assert_close(got[s][0], ref[s][0], **tol)
