"""Key smoothness and the similarity cap; key scatter and sink keys: the references by hand, the Triton kernels
against the references.

The kernel runs on CPU under Triton's interpreter; every launcher output is poisoned first
(``triton_support.POISON_OUTPUTS``), so an element the kernel forgets to write fails.
"""

from __future__ import annotations

import pytest
import torch

from psa_diffusers.config import PSAConfig
from psa_diffusers.mask_builder import build_block_mask
from psa_diffusers.ops.caps import (
    block_smoothness_reference,
    key_block_statistics_reference,
    key_block_statistics_triton,
    similarity_caps_reference,
    sink_keys,
    smoothness_and_caps_triton,
)
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


# --------------------------------------------------------------------------- key statistics and sink keys
def test_key_block_statistics_reference_by_hand():
    """Scatter and favourite keys of a 2-block, 100-token head (blocks of 64), computed here token by token."""
    g = torch.Generator().manual_seed(3)
    length = 100
    k = torch.randn(1, 1, length, 4, generator=g, dtype=torch.float64)
    q_mean = torch.randn(1, 1, 4, generator=g, dtype=torch.float64)
    scatter, top, arg = key_block_statistics_reference(k, q_mean, block_kv=64)
    for li, s in enumerate((2, 4, 8)):
        for j, (lo, hi) in enumerate([(0, 64), (64, length)]):
            total = 0.0
            for start in range(lo, hi, s):
                grp = k[0, 0, start : min(start + s, length)]
                total += (grp - grp.mean(0)).square().sum().item()
            assert abs(scatter[0, 0, j, li].item() - total / (hi - lo)) < 1e-5
    y = (k[0, 0] @ q_mean[0, 0]).tolist()
    runs = [(0, 32), (32, 64), (64, 96), (96, 100), (100, 100)]  # runs of SINK_SEGMENT keys; the last is padding
    assert top.shape == arg.shape == (1, 1, 4)
    for r, (lo, hi) in enumerate(runs[:4]):
        best = max(range(lo, hi), key=lambda t: y[t])
        assert arg[0, 0, r].item() == best and abs(top[0, 0, r].item() - y[best]) < 1e-5


def test_sink_keys_take_the_blocks_with_the_most_favoured_keys():
    top = torch.tensor([[[0.5, 3.0, 1.0, 3.0, -2.0]]])
    arg = torch.tensor([[[4, 13, 22, 30, 33]]])
    assert sink_keys(top, arg, 3).tolist() == [[[13, 30, 22]]]  # ties: the lower block first
    assert sink_keys(top, arg, 9).shape[-1] == 5  # at most one per run of keys


@needs_interpreter
@pytest.mark.parametrize(
    "d,dtype,bkv,length", [(64, torch.float32, 32, 203), (128, torch.float16, 64, 130), (128, torch.float32, 128, 97)]
)
def test_key_block_statistics_kernel_matches_reference(d, dtype, bkv, length):
    g = torch.Generator().manual_seed(d + length)
    k = (torch.randn(2, 3, length, d, generator=g) + torch.linspace(-1, 1, length).view(1, 1, -1, 1)).to(dtype)
    q_mean = torch.randn(2, 3, d, generator=g)
    k[0, 1, 5, 3] = float("nan")  # counts as 0 on both paths
    k[1, 2, 40] *= 4  # a clear favourite
    ref = key_block_statistics_reference(k, q_mean, block_kv=bkv)
    got = key_block_statistics_triton(k, q_mean, block_kv=bkv)
    # float32 sums in another order: relative 1e-5 of values ~ D
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-4)
    assert torch.equal(got[2], ref[2]) and got[2].dtype == torch.int64
