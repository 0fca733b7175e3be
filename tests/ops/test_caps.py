"""Key smoothness and the similarity cap: the reference's limits, and the Triton kernel against the reference.

The kernel runs on CPU under Triton's interpreter; every launcher output is poisoned first
(``triton_support.POISON_OUTPUTS``), so an element the kernel forgets to write fails.
"""

from __future__ import annotations

import pytest
import torch

from psa_diffusers.config import PSAConfig
from psa_diffusers.mask_builder import build_block_mask
from psa_diffusers.ops.caps import block_smoothness_reference, similarity_caps_reference, smoothness_and_caps_triton
from tests.helpers import needs_interpreter


def test_similarity_cap_limits_rough_blocks():
    g = torch.Generator().manual_seed(0)
    smooth = torch.randn(1, 1, 1, 16, generator=g).expand(1, 1, 64, 16)  # identical keys: cos 1
    rough = torch.randn(1, 1, 64, 16, generator=g)  # random keys: cos ~ 0
    k = torch.cat([smooth, rough], dim=2).contiguous()
    s = block_smoothness_reference(k, block_kv=64)
    assert torch.allclose(s[0, 0, 0], torch.ones(3)) and torch.all(s[0, 0, 1].abs() < 0.5)
    q = torch.randn(1, 1, 128, 16, generator=g)
    cfg = PSAConfig(
        block_q=64, block_kv=64, budgets=(0.0, 0.0, 0.0, 1.0), min_full_share=0.0, sim_thresholds=(0.7, 0.65, 0.6)
    )
    lm = build_block_mask(q, k, cfg, importance=torch.tensor([[[[0.9, 0.1], [0.1, 0.9]]]])).to_level_map()
    # row 0: best block 0 at level 1, block 1 wants 8x but is rough -> capped to 1
    # row 1: best block 1 at level 1, block 0 wants 8x and is smooth -> stays 8
    assert lm.tolist() == [[[[1, 1], [8, 1]]]]


@needs_interpreter
@pytest.mark.parametrize("d,bkv,length", [(16, 32, 203), (72, 64, 130)])
def test_smoothness_and_caps_match_reference(d, bkv, length):
    g = torch.Generator().manual_seed(d)
    k = torch.randn(2, 2, length, d, generator=g) * 0.3 + torch.linspace(-2, 2, length).view(1, 1, -1, 1)
    k[1, 1] = torch.randn(length, d, generator=g)  # a rough head: caps at 1
    sims = (0.7, 0.65, 0.6)
    smooth, caps = smoothness_and_caps_triton(k, block_kv=bkv, thresholds=sims)
    torch.testing.assert_close(smooth, block_smoothness_reference(k, block_kv=bkv), rtol=1e-5, atol=1e-6)
    cfg = PSAConfig(block_q=64, block_kv=bkv, sim_thresholds=sims)
    ref_caps = similarity_caps_reference(k, block_kv=cfg.block_kv, thresholds=cfg.sim_thresholds)
    assert torch.equal(caps.long(), ref_caps) and len(ref_caps.unique()) > 1
