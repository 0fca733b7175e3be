"""Budget mode on hostile inputs: huge logits, NaN in q or k, non-finite statistics.

Issue 16's defects, each with the behaviour it used to have:

* logits of about 68 and more: the log-normal squared-mass estimate ``c * exp(2 zbar + 2 V)``
  overflowed float32, the error tables turned NaN and rows were left with no block at all (the
  whole output NaN);
* one NaN in a query made its whole query block's statistics NaN, and that row lost its blocks;
* one NaN in a key emptied every row of that head, and the density read 0.

Every row must keep at least its best block, whatever the input. A non-finite entry of q or k now
counts as 0, so the expected mask is the mask of the same input with that entry set to 0 (an
independent computation: the fixed input never holds a NaN). Both backends; the Triton one under
the interpreter in float16 (bfloat16 ``tl.dot`` is wrong in the interpreter).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.structured_qkv import structured_qkv
from psa_diffusers.budget import PyramidStats, estimate_pyramid_statistics
from psa_diffusers.budget.allocation import allocate_levels, option_costs
from psa_diffusers.config import PSAConfig
from psa_diffusers.mask_builder import build_block_mask
from psa_diffusers.ops.attention import psa_attention_reference
from tests.helpers import needs_interpreter

BQ, BKV = 64, 32
CFG = PSAConfig(block_q=BQ, block_kv=BKV, mode="budget", target_density=0.1)

BACKENDS = ["reference", pytest.param("triton", marks=needs_interpreter)]


def _inputs(backend: str, logit_gain: float = 1.0):
    """4x8x16 video tokens (L 512), 2 heads, dim 64; float16 for the Triton backend."""
    q, k, v = structured_qkv(4, 8, 16, heads=2, dim=64, seed=3, dtype=torch.float32)
    q, k = q * logit_gain, k * logit_gain
    dtype = torch.float16 if backend == "triton" else torch.float32
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _levels(q, k, backend):
    return build_block_mask(q, k, CFG, backend=backend).to_level_map()


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_logits_keep_every_row_and_the_target_density(backend):
    q, k, v = _inputs(backend, logit_gain=2.6)
    top = (q.float() @ k.float().transpose(-1, -2) * 64**-0.5).max().item()
    assert top > 68.0  # the regime where the squared-mass estimate used to overflow
    stats = estimate_pyramid_statistics(q, k, block_q=BQ, block_kv=BKV, backend=backend)
    assert all(torch.isfinite(t).all() for t in stats)
    mask = build_block_mask(q, k, CFG, backend=backend)
    lm = mask.to_level_map()
    assert torch.all((lm > 0).any(-1)), "a row was left with no block"
    # each row spends at most its budget (plus the best block); the greedy leaves under one block unspent
    assert 0.1 - BKV / 512 <= mask.density(512, 512) <= 0.1 + 1e-9
    out = psa_attention_reference(q.float(), k.float(), v.float(), mask)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["q", "k"])
def test_one_nan_costs_only_its_own_token(backend, where):
    q, k, _ = _inputs(backend)
    bad = {"q": q.clone(), "k": k.clone()}
    zeroed = {"q": q.clone(), "k": k.clone()}
    bad[where][0, 1, 70, 5] = float("nan")  # query block 1 / KV block 2 of head 1
    zeroed[where][0, 1, 70, 5] = 0.0
    got = _levels(bad["q"], bad["k"], backend)
    want = _levels(zeroed["q"], zeroed["k"], backend)
    assert torch.all((got > 0).any(-1)), "a row was left with no block"
    assert torch.equal(got, want)
    assert build_block_mask(bad["q"], bad["k"], CFG, backend=backend).density(512, 512) > 0.05


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_row_keeps_its_best_block_whatever_the_statistics(backend):
    g = torch.Generator().manual_seed(0)
    b, h, nq, nk = 1, 2, 6, 16
    mass = torch.rand(b, h, nq, nk, generator=g)
    sq = mass.square()
    var = torch.rand(b, h, nq, nk, 3, generator=g)
    mass[0, 0, 0] = float("nan")  # a whole row of NaN: block 0 is then the first maximum (all 0)
    mass[0, 0, 1, 3] = float("inf")  # an infinite mass counts as 0
    sq[0, 1, 2] = float("inf")
    var[0, 1, 3] = float("nan")  # unknown blur: no pooling, but the best block stays full
    mass[0, 1, 4, 7] = 5.0  # a clear best block
    stats = PyramidStats(mass, sq, var)
    tokens = torch.full((nk,), BKV)
    budget = int(option_costs(tokens)[0, -1]) * 3  # three full blocks per row
    lm = allocate_levels(stats, budget, tokens, backend=backend)
    assert torch.all((lm == 1).any(-1))
    assert lm[0, 0, 0, 0] == 1  # all-NaN row: the first block
    assert lm[0, 1, 4, 7] == 1
