"""The fused budget allocation kernel against ``allocation.allocate_levels`` (Triton interpreter on CPU).

What is asserted, per case, and why:

(a) every row's cost stays within ``max(budget, cost of its best block at level 1)``: the
    reference's guarantee, which no rounding can loosen (costs are integers);
(b) the modelled error ``(s + W**2) / (1 - W)**2`` of every row (from ``error_tables``) is
    within 1e-4 relative of the reference's: the kernel computes the same float32 tables but
    with its own ``exp`` and summation order, so a hull step whose rate lies within a few ulps
    of another's can be taken instead of it; such a swap costs a negligible share of the
    error (observed: none in these cases, all maps are equal);
(c) at least 99.5% of the levels agree (in these small cases that leaves no room for a
    single difference, so they are in fact exact); and exact ties (identical blocks) are
    broken as the reference's stable sort breaks them, which a pure threshold search would not.

Outputs are poisoned (``_triton.POISON_OUTPUTS``): a row the kernel does not write holds -1.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.structured_qkv import structured_qkv
from psa_diffusers import kernels
from psa_diffusers.allocation import COST_UNIT, OPTIONS, allocate_levels, error_tables
from psa_diffusers.importance import PyramidStats, estimate_pyramid_statistics
from psa_diffusers.kernels import _triton
from psa_diffusers.kernels.allocation import allocate_levels_triton

DEVICE = "cuda" if torch.cuda.is_available() and not kernels.INTERPRETED else "cpu"

pytestmark = pytest.mark.skipif(
    not (kernels.HAS_TRITON and (kernels.INTERPRETED or torch.cuda.is_available())),
    reason="needs triton with CUDA, or TRITON_INTERPRET=1 set before import (tests/conftest.py does it on CPU)",
)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(_triton, "POISON_OUTPUTS", True)


def _structured_stats(batch: int) -> PyramidStats:
    """Statistics of 4x9x10 video tokens (360: 23 KV blocks of 16, the last with 8), 2 heads, 2 query blocks."""
    parts = []
    for seed in range(batch):
        q, k, _ = structured_qkv(4, 9, 10, heads=2, dim=32, seed=seed, dtype=torch.float32)
        parts.append(estimate_pyramid_statistics(q[:, :, 100:228], k, block_q=64, block_kv=16))
    return PyramidStats(*(torch.cat(t).to(DEVICE) for t in zip(*parts)))


def _random_stats(b, h, nq, nk, seed) -> PyramidStats:
    """Positive statistics with a heavy-tailed mass, a few zero blocks and blur growing with the factor."""
    g = torch.Generator().manual_seed(seed)
    mass = torch.rand(b, h, nq, nk, generator=g) ** 6
    mass[torch.rand(b, h, nq, nk, generator=g) < 0.1] = 0.0
    sq = mass**2 * (0.5 + torch.rand(b, h, nq, nk, generator=g))
    var = (torch.rand(b, h, nq, nk, 3, generator=g) * torch.tensor([0.3, 0.8, 2.0])).cumsum(-1)
    return PyramidStats(mass.to(DEVICE), sq.to(DEVICE), var.to(DEVICE))


def _tokens(nk: int, block: int, last: int) -> torch.Tensor:
    t = torch.full((nk,), block, dtype=torch.int64)
    t[-1] = last
    return t.to(DEVICE)


def _row_cost(levels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    per = torch.where(levels > 0, tokens * COST_UNIT // levels.clamp(min=1), torch.zeros_like(levels))
    return per.sum(-1)


def _modelled_error(stats: PyramidStats, levels: torch.Tensor, n: int) -> torch.Tensor:
    """``(s + W**2) / (1 - W)**2`` per row, float64, from the reference's error tables."""
    sep, lost = error_tables(stats, n)
    index = torch.zeros_like(levels[..., :n])
    for k, level in enumerate(OPTIONS):
        index[levels[..., :n] == level] = k
    s = sep.gather(-1, index.unsqueeze(-1)).squeeze(-1).double().sum(-1)
    w = lost.gather(-1, index.unsqueeze(-1)).squeeze(-1).double().sum(-1)
    return (s + w**2) / (1 - w).clamp(min=1e-6) ** 2


def _check(stats, budget, tokens, *, n=None, caps=None, **kw):
    """Run both, assert (a)-(c) of the module docstring; returns (kernel map, reference map)."""
    nk = stats.mass.shape[-1]
    n = nk if n is None else n
    ref = allocate_levels(stats, budget, tokens, num_blocks=n, caps=caps, **kw)
    out = allocate_levels_triton(stats, budget, tokens, num_blocks=None if n == nk else n, caps=caps, **kw)
    assert out.shape == ref.shape and out.dtype == torch.int64
    assert bool(torch.isin(out, torch.tensor(OPTIONS, device=out.device)).all())  # poison (-1) fails here
    assert bool((out[..., n:] == 0).all())
    # (a) cost within the budget, raised to the best block's full cost where smaller
    best_cost = tokens[:n][stats.mass[..., :n].argmax(-1)] * COST_UNIT
    limit = torch.maximum(torch.as_tensor(budget, device=out.device).expand_as(best_cost), best_cost)
    assert bool((_row_cost(out[..., :n], tokens[:n]) <= limit).all())
    # the best block is level 1 unless a cap below 1 forbids it
    if caps is None:
        assert bool((out[..., :n].gather(-1, stats.mass[..., :n].argmax(-1, keepdim=True)) == 1).all())
    # (b) modelled error
    e_out, e_ref = _modelled_error(stats, out, n), _modelled_error(stats, ref, n)
    assert bool(((e_out - e_ref).abs() <= 1e-4 * e_ref.abs() + 1e-9).all())
    # (c) level agreement
    assert (out == ref).double().mean().item() >= 0.995
    return out, ref


def test_structured_statistics_int_budget():
    stats = _structured_stats(batch=1)  # [1, 2, 2, 23]
    tokens = _tokens(23, 16, 8)
    out, _ = _check(stats, 900, tokens)  # ~30% of the 2944 of a dense row
    assert bool((out == 0).any()) and len(torch.unique(out)) >= 3


def test_structured_statistics_caps_text_columns_and_row_budgets():
    stats = PyramidStats(*(t[:, 1:] for t in _structured_stats(batch=2)))  # [2, 1, 2, 23]
    tokens = _tokens(23, 16, 8)
    g = torch.Generator().manual_seed(1)
    caps = torch.tensor([1, 2, 4, 8])[torch.randint(0, 4, (2, 1, 23), generator=g)].to(DEVICE)
    budget = torch.randint(0, 2500, (2, 1, 2), generator=g).to(DEVICE)
    budget[0, 0, 0] = 0  # raised to the best block's cost
    out, _ = _check(stats, budget, tokens, n=20, caps=caps)
    pooled = out[..., :20] > 0
    assert bool((out[..., :20][pooled] <= caps[..., :20].unsqueeze(-2).expand_as(out[..., :20])[pooled]).all())


@pytest.mark.parametrize(
    "nk, last, n, budgets",
    [
        (37, 5, 37, [0, 2000, 8000, 2**40]),  # zero .. beyond the full 9256
        (29, 32, 25, [700, 10**9, 1, 3000]),
    ],
)
def test_random_statistics_row_budgets(nk, last, n, budgets):
    stats = _random_stats(2, 1, 2, nk, seed=nk)
    tokens = _tokens(nk, 32, last)
    budget = torch.tensor(budgets, dtype=torch.int64).view(2, 1, 2).to(DEVICE)
    out, _ = _check(stats, budget, tokens, n=n)
    # a budget above the full cost buys every block with any mass whole
    rich = (budget >= tokens[:n].sum() * COST_UNIT).unsqueeze(-1) & (stats.mass[..., :n] > 0)
    assert bool(rich.any()) and bool((out[..., :n][rich] == 1).all())


@pytest.mark.parametrize(
    "budget, iterations, start_loss", [(0, 2, 0.1), (3000, 1, 0.1), (2500, 4, 0.3), (10**12, 2, 0.0)]
)
def test_random_statistics_int_budgets_and_iterations(budget, iterations, start_loss):
    stats = _random_stats(1, 1, 2, 31, seed=iterations)
    _check(stats, budget, _tokens(31, 32, 17), iterations=iterations, start_loss=start_loss)


def test_exact_ties_follow_the_reference_order():
    # every block alike except the best: all hull steps tie across blocks, the reference's stable
    # sort takes them block by block, and the budget runs out in the middle of a hull level
    nk = 24
    mass = torch.full((1, 1, 1, nk), 0.04)
    mass[..., 3] = 0.5
    sq = mass**2
    var = torch.tensor([0.05, 0.4, 3.0]).expand(1, 1, 1, nk, 3).clone()
    stats = PyramidStats(mass.to(DEVICE), sq.to(DEVICE), var.to(DEVICE))
    tokens = _tokens(nk, 32, 32)
    for budget in (256 + 5 * 32 + 3 * 64, 256 + 23 * 32 + 7 * 32):
        out, ref = _check(stats, budget, tokens)
        assert bool((out == ref).all())
        assert len(torch.unique(out[0, 0, 0])) > 2  # the tie was cut part-way: levels differ among alike blocks
    # room for exactly one step of a tied level: the first tied step fits with nothing to spare
    for budget in (256 + 32, 256 + 64, 256 + 128, 256 + 256):
        out, ref = _check(stats, budget, tokens)
        assert bool((out == ref).all())


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(num_blocks=24), ["num_blocks", "24"]),
        (dict(num_blocks=-1), ["num_blocks", "-1"]),
        (dict(budget=1.5), ["budget", "1.5"]),
        (dict(budget=torch.zeros(3, 3, dtype=torch.int64)), ["budget", "(3, 3)"]),
        (dict(budget=torch.zeros(1, 2, 2)), ["budget", "float32"]),
        (dict(caps=torch.ones(1, 2, 22, dtype=torch.int64)), ["caps", "(1, 2, 22)"]),
        (dict(block_tokens=torch.ones(22, dtype=torch.int64)), ["block_tokens", "(22,)"]),
        (dict(block_tokens=torch.ones(23)), ["block_tokens", "float32"]),
        (dict(iterations=2.0), ["iterations", "2.0"]),
        (dict(start_loss=float("nan")), ["start_loss", "nan"]),
        (dict(stats=PyramidStats(torch.zeros(1, 2, 2, 23, dtype=torch.float64), None, None)), ["mass", "float64"]),
        (dict(stats=PyramidStats(torch.zeros(1, 2, 2, 23), torch.zeros(1, 2, 2, 23), torch.zeros(1, 2, 2, 23, 2))),
         ["logit_var", "(1, 2, 2, 23, 2)"]),
    ],
    ids=lambda x: "" if isinstance(x, list) else ",".join(x),
)  # fmt: skip
def test_bad_arguments_name_the_value(change, words):
    zeros = torch.zeros(1, 2, 2, 23, device=DEVICE)
    stats = PyramidStats(zeros, zeros, torch.zeros(1, 2, 2, 23, 3, device=DEVICE))
    kw = dict(stats=stats, budget=100, block_tokens=torch.full((23,), 16, dtype=torch.int64, device=DEVICE))
    kw.update(change)
    with pytest.raises(ValueError) as info:
        allocate_levels_triton(kw.pop("stats"), kw.pop("budget"), kw.pop("block_tokens"), **kw)
    for w in words:
        assert w in str(info.value)
