"""Level choice: the quota and mass rules, and the fused level and compaction kernels against the reference.

The kernels run on CPU under Triton's interpreter; every launcher output is poisoned first
(``triton_support.POISON_OUTPUTS``: -1 for the integer counts and indices), so an element a
kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import pytest
import torch

from psa_diffusers.config import PSAConfig
from psa_diffusers.mask import PyramidBlockMask
from psa_diffusers.mask_builder import build_block_mask
from psa_diffusers.ops.caps import similarity_caps_reference
from psa_diffusers.ops.importance import estimate_block_importance_reference
from psa_diffusers.ops.levels import build_mask_triton, compact_levels_triton, levels_from_importance
from tests.helpers import needs_interpreter, random_level_map, random_qkv


# --------------------------------------------------------------------------- rules (reference)
def test_quota_levels_follow_the_importance_ranking():
    g = torch.Generator().manual_seed(0)
    imp = torch.rand(2, 3, 5, 40, generator=g)
    cfg = PSAConfig(budgets=(0.1, 0.05, 0.1, 0.2), min_full_share=0.0)
    lm = levels_from_importance(imp, cfg)
    counts = torch.stack([(lm == s).sum(-1) for s in (1, 2, 4, 8)], -1)
    assert torch.all(counts == torch.tensor([4, 2, 4, 8]))
    # finer levels always hold more important blocks than coarser ones, skipped blocks the least
    order = {1: 0, 2: 1, 4: 2, 8: 3, 0: 4}
    rank_of = lm.clone().apply_(lambda s: order[s])
    for idx in [(0, 0, 0), (1, 2, 4)]:
        ranks = rank_of[idx][imp[idx].argsort(descending=True)]
        assert torch.all(ranks[1:] >= ranks[:-1])
    assert torch.all(lm.gather(-1, imp.argmax(-1, keepdim=True)) == 1)


def test_min_full_share_and_best_block_rule():
    imp = torch.rand(1, 1, 4, 50, generator=torch.Generator().manual_seed(1))
    lm = levels_from_importance(imp, PSAConfig(budgets=(0.0, 0.0, 0.0, 0.5), min_full_share=0.1))
    assert torch.all((lm == 1).sum(-1) == 5)
    lm = levels_from_importance(imp, PSAConfig(budgets=(0.0, 0.0, 0.0, 0.0), min_full_share=0.0))
    assert torch.all((lm == 1).sum(-1) == 1) and torch.all((lm > 0).sum(-1) == 1)


def test_mass_levels_follow_cumulative_thresholds():
    # one row, importance already sorted: masses 0.4, 0.2, 0.15, 0.1, 0.1, 0.05
    imp = torch.tensor([[[[0.4, 0.2, 0.15, 0.1, 0.1, 0.05]]]])
    cfg = PSAConfig(mode="mass", budgets=(0.5, 0.6, 0.7, 0.8), min_full_share=0.0)
    # predecessors' mass: 0, .4, .6, .75, .85, .95 -> levels 1, 1, 4, 0, 0, 0
    # (.6 reaches 0.6 so not 2x, is below 0.7 so 4x; .75 reaches 0.7 but not 0.8 -> 8x)
    assert levels_from_importance(imp, cfg).tolist() == [[[[1, 1, 4, 8, 0, 0]]]]


# --------------------------------------------------------------------------- kernels (interpreted)
@needs_interpreter
@pytest.mark.parametrize(
    "mode,budgets,sims,text_len",
    [
        ("quota", (0.10, 0.05, 0.05, 0.20), None, 0),
        ("quota", (0.20, 0.10, 0.0, 0.30), (0.7, 0.65, 0.6), 70),
        ("mass", (0.5, 0.6, 0.7, 0.8), None, 0),
        ("mass", (0.4, 0.5, 0.6, 0.8), (0.7, 0.65, 0.6), 70),
    ],
    ids=lambda x: str(x),
)
def test_levels_kernel_matches_mask_builder(mode, budgets, sims, text_len):
    cfg = PSAConfig(block_q=64, block_kv=32, mode=mode, budgets=budgets, sim_thresholds=sims)
    q, k, _, _ = random_qkv(1, 2, 450, 450, 16, torch.float32, seed=11)
    k = k + torch.linspace(0, 3, 450).view(1, 1, -1, 1)  # some smooth keys, so the caps vary
    imp = estimate_block_importance_reference(q * 2, k, block_q=64, block_kv=32, stride=8)
    imp[0, 1, 1] = imp[0, 1, 1].round(decimals=2)  # exact ties: the stable order must match
    ref = build_block_mask(q, k, cfg, text_len=text_len, importance=imp)
    caps = similarity_caps_reference(k, block_kv=cfg.block_kv, thresholds=sims) if sims is not None else None
    video = dict(num_kv_blocks=(450 - text_len) // 32, num_q_blocks=(450 - text_len) // 64) if text_len else {}
    got = build_mask_triton(imp, cfg, caps=caps, **video)
    assert torch.equal(got.kv_counts, ref.kv_counts.to(torch.int32))
    assert torch.equal(got.kv_indices, ref.kv_indices.to(torch.int32))


@needs_interpreter
@pytest.mark.parametrize("nv,qv", [(None, None), (9, 5)], ids=["no-text", "text"])
def test_compact_kernel_matches_compact(nv, qv):
    lm = random_level_map(2, 3, 7, 13, generator=torch.Generator().manual_seed(5))  # Nk=13: padded to 16
    got = compact_levels_triton(lm, block_q=64, block_kv=32, num_kv_blocks=nv, num_q_blocks=qv)
    forced = lm.clone()
    if nv is not None:
        forced[..., nv:] = 1
        forced[..., qv:, :] = 1
    ref = PyramidBlockMask.from_valid_level_map(forced, block_q=64, block_kv=32)
    assert not torch.equal(forced, lm) or nv is None  # the text case really changes the map
    assert torch.equal(got.kv_counts, ref.kv_counts) and torch.equal(got.kv_indices, ref.kv_indices)
    assert torch.equal(got.to_level_map(), forced)
