"""Causal PSA: the causal level rule, the causal reference, and the Triton kernel against the reference.

The reference (``psa_attention_reference(..., causal=True)``) is checked against a per-row brute
force of the causal rule (a row sees a pooled token only if its last key is not later than the row),
and at full budget against ``scaled_dot_product_attention(is_causal=True)``, gradients included.
The level rule is checked for its structure (diagonal level 1, nothing above it, sink and recent
blocks level 1). The kernel test runs under Triton's interpreter (fp32: tolerance 1e-5, as in
tests/ops/test_attention.py: only the summation order differs). The one-launch causal levels kernel
(``build_causal_mask_triton``, interpreted, outputs poisoned) must give exactly the PyTorch rule's mask
(``causal_levels_reference``) in quota mode, ties and ties-to-even rounding of the per-row quotas
included, and in mass mode on importance whose cumulative masses stay away from the thresholds.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from psa_diffusers.attention import psa_attention
from psa_diffusers.config import PSAConfig
from psa_diffusers.mask import PyramidBlockMask, ceil_div
from psa_diffusers.mask_builder import build_causal_block_mask
from psa_diffusers.ops.attention import psa_attention_backward_reference, psa_attention_reference
from psa_diffusers.ops.levels import (
    build_causal_mask_triton,
    causal_density,
    causal_levels,
    causal_levels_reference,
    causal_relation,
)
from psa_diffusers.ops.levels.causal import DIAGONAL, FUTURE, PAST, causal_forced_full
from psa_diffusers.ops.triton_support import HAS_TRITON, INTERPRETED
from tests.helpers import needs_interpreter, random_level_map, rel_err

FULL = dict(mode="quota", budgets=(1.0, 0.0, 0.0, 0.0))
SPARSE = dict(mode="quota", budgets=(0.2, 0.2, 0.2, 0.2))
# float32 against float32 SDPA: only the summation order differs (observed ~5e-7 relative).
TOL_F32 = 1e-5


def _qkv(b, h, length, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, length, d, generator=g).to(dtype) for _ in range(3))


def causal_map(b, h, length, bq, bkv, seed=0, future_levels=False):
    """A random level map that is valid for causal attention: diagonal blocks level 1, past random,
    future blocks skipped (or random with ``future_levels``: the causal mask must hide them anyway)."""
    g = torch.Generator().manual_seed(seed)
    nq, nk = ceil_div(length, bq), ceil_div(length, bkv)
    lm = random_level_map(b, h, nq, nk, generator=g)
    rel = causal_relation(length, bq, bkv)
    lm = torch.where(rel == DIAGONAL, torch.ones_like(lm), lm)
    return lm if future_levels else lm.masked_fill(rel == FUTURE, 0)


def brute_force_causal(q, k, v, level_map, bq, bkv, scale):
    """One row at a time, pooled tokens listed explicitly, those ending after the row left out (float64)."""
    b, h, length, d = q.shape
    out = torch.empty(b, h, length, d, dtype=torch.float64)
    for bb in range(b):
        for hh in range(h):
            for r in range(length):
                logits, values = [], []
                for j in range(level_map.shape[-1]):
                    s = int(level_map[bb, hh, r // bq, j])
                    for g0 in range(j * bkv, min(length, (j + 1) * bkv), s or 1):
                        g1 = min(g0 + s, length)
                        if s == 0 or g1 - 1 > r:
                            continue
                        logits.append(scale * (q[bb, hh, r].double() @ k[bb, hh, g0:g1].double().mean(0)))
                        logits[-1] += math.log(g1 - g0)
                        values.append(v[bb, hh, g0:g1].double().mean(0))
                out[bb, hh, r] = torch.softmax(torch.stack(logits), 0) @ torch.stack(values)
    return out


# ----------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize(
    "length,bq,bkv,future", [(200, 64, 32, False), (130, 64, 128, True), (97, 128, 32, True)],
    ids=["L200-64x32", "L130-64x128-future", "L97-128x32-future"],
)  # fmt: skip
def test_reference_matches_brute_force(length, bq, bkv, future):
    q, k, v = _qkv(2, 1, length, 8, seed=length)
    lm = causal_map(2, 1, length, bq, bkv, seed=length, future_levels=future)
    mask = PyramidBlockMask.from_level_map(lm, block_q=bq, block_kv=bkv)
    out = psa_attention_reference(q, k, v, mask, causal=True)
    ref = brute_force_causal(q, k, v, lm, bq, bkv, 8**-0.5)
    assert rel_err(out, ref) < TOL_F32


@pytest.mark.parametrize(
    "length,d,bq,bkv", [(333, 64, 128, 64), (200, 128, 64, 128), (65, 64, 64, 32)],
    ids=["L333-d64-128x64", "L200-d128-64x128", "L65-d64-64x32"],
)  # fmt: skip
def test_full_budget_equals_causal_sdpa(length, d, bq, bkv):
    q, k, v = _qkv(2, 2, length, d, seed=1)
    config = PSAConfig(block_q=bq, block_kv=bkv, **FULL)
    out = psa_attention(q, k, v, config, causal=True, backend="reference", sink_tokens=0, recent_tokens=0)
    assert rel_err(out, F.scaled_dot_product_attention(q, k, v, is_causal=True)) < TOL_F32


def test_full_budget_gradients_equal_causal_sdpa():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 150, 32, seed=2))
    config = PSAConfig(block_q=64, block_kv=32, **FULL)
    grad = torch.randn(1, 2, 150, 32, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad(psa_attention(q, k, v, config, causal=True, backend="reference"), (q, k, v), grad)
    want = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), grad)
    for name, a, b in zip("qkv", got, want):
        assert rel_err(a, b) < TOL_F32, name


def test_sparse_backward_reference_matches_autograd():
    """The hand-written causal backward against autograd through the causal forward reference."""
    q, k, v = (t.double().requires_grad_() for t in _qkv(1, 1, 150, 8, seed=4))
    lm = causal_map(1, 1, 150, 64, 32, seed=4)
    mask = PyramidBlockMask.from_level_map(lm, block_q=64, block_kv=32)
    grads = psa_attention_backward_reference(torch.ones_like(q), q, k, v, mask, causal=True)
    want = torch.autograd.grad(psa_attention_reference(q, k, v, mask, causal=True).sum(), (q, k, v))
    for a, b in zip(grads, want):
        assert rel_err(a, b) < 1e-10  # float64 both ways: the same sums in another order


def test_no_look_ahead():
    """With a fixed sparse causal mask, changing the keys and values after token t leaves rows <= t alone."""
    length, t = 300, 170
    q, k, v = _qkv(1, 2, length, 16, seed=5)
    config = PSAConfig(block_q=64, block_kv=32, **SPARSE)
    out, mask = psa_attention(q, k, v, config, causal=True, backend="reference", sink_tokens=32,
                              recent_tokens=32, return_mask=True)  # fmt: skip
    k2, v2 = k.clone(), v.clone()
    k2[:, :, t + 1 :] = torch.randn_like(k2[:, :, t + 1 :]) * 10
    v2[:, :, t + 1 :] = torch.randn_like(v2[:, :, t + 1 :]) * 10
    out2 = psa_attention(q, k2, v2, mask=mask, causal=True, backend="reference")
    assert torch.equal(out[:, :, : t + 1], out2[:, :, : t + 1])
    assert not torch.allclose(out[:, :, t + 1 :], out2[:, :, t + 1 :])


# ----------------------------------------------------------------------------------------- level rule
@pytest.mark.parametrize("bq,bkv", [(64, 32), (64, 128), (128, 64)], ids=["64x32", "64x128", "128x64"])
@pytest.mark.parametrize("mode", ["quota", "mass"])
def test_level_rule_structure(bq, bkv, mode):
    length, sink, recent = 1000, 100, 200
    q, k, _ = _qkv(2, 2, length, 16, seed=6)
    budgets = (0.1, 0.1, 0.1, 0.2) if mode == "quota" else (0.3, 0.5, 0.6, 0.7)
    config = PSAConfig(block_q=bq, block_kv=bkv, mode=mode, budgets=budgets, min_full_share=0.0)
    lm = build_causal_block_mask(q, k, config, sink_tokens=sink, recent_tokens=recent).to_level_map()
    rel = causal_relation(length, bq, bkv).expand_as(lm)
    assert (lm[rel == DIAGONAL] == 1).all()
    assert (lm[rel == FUTURE] == 0).all()
    first_row = torch.arange(lm.shape[2]).view(-1, 1) * bq
    first_key = torch.arange(lm.shape[3]).view(1, -1) * bkv
    sink_blocks = (first_key < sink) & (rel[0, 0] == PAST)
    recent_blocks = (first_key + bkv > first_row - recent) & (rel[0, 0] == PAST)
    assert (lm[..., sink_blocks] == 1).all() and (lm[..., recent_blocks] == 1).all()
    competing = (rel == PAST) & ~(sink_blocks | recent_blocks)
    assert (lm[competing] == 0).any(), "the rule skipped nothing: the test would not see a broken rule"


def test_quota_shares_follow_each_rows_competing_blocks():
    """Row i of an 8x32 grid has its own number of past blocks; quota shares apply to that number."""
    length, bq, bkv = 1024, 128, 32
    importance = torch.rand(1, 1, 8, 32, generator=torch.Generator().manual_seed(7))
    config = PSAConfig(block_q=bq, block_kv=bkv, mode="quota", budgets=(0.25, 0.25, 0.0, 0.5), min_full_share=0.0)
    lm = causal_levels(importance, config, length=length, sink_tokens=0, recent_tokens=0).to_level_map()[0, 0]
    for i in range(8):
        past = 4 * i  # KV blocks wholly before query block i
        row = lm[i, :past]
        n1, n2, n8 = round(0.25 * past) or (1 if past else 0), round(0.25 * past), round(0.5 * past)
        assert [(row == s).sum().item() for s in (1, 2, 8)] == [n1, n2, min(n8, past - n1 - n2)]
        if past:
            assert row[importance[0, 0, i, :past].argmax()] == 1  # the best block is level 1


def test_causal_density():
    length, bq, bkv = 300, 64, 32
    nq, nk = ceil_div(length, bq), ceil_div(length, bkv)
    full = PyramidBlockMask.from_level_map(torch.ones(1, 1, nq, nk, dtype=torch.int64), block_q=bq, block_kv=bkv)
    assert causal_density(full, length).item() == pytest.approx(1.0)
    lm = causal_map(1, 1, length, bq, bkv, seed=8)
    mask = PyramidBlockMask.from_level_map(lm, block_q=bq, block_kv=bkv)
    brute = 0  # pooled tokens seen, row by row
    for r in range(length):
        for j in range(nk):
            s = int(lm[0, 0, r // bq, j])
            if s:
                brute += sum(1 for g0 in range(j * bkv, min(length, (j + 1) * bkv), s) if min(g0 + s, length) - 1 <= r)
    assert causal_density(mask, length).item() == pytest.approx(brute / (length * (length + 1) / 2))


def test_bad_causal_inputs():
    q, k, v = _qkv(1, 1, 130, 8)
    with pytest.raises(ValueError, match="mode"):
        psa_attention(q, k, v, PSAConfig(mode="density", target_density=0.3, block_q=64, block_kv=32), causal=True)
    with pytest.raises(ValueError, match="Lq == Lkv"):
        psa_attention(q[:, :, :100], k, v, causal=True)
    with pytest.raises(ValueError, match="grid"):
        psa_attention(q, k, v, causal=True, grid=(1, 10, 13))
    with pytest.raises(ValueError, match="recent_tokens=-1"):
        psa_attention(q, k, v, causal=True, recent_tokens=-1)
    lm = torch.ones(1, 1, 3, 5, dtype=torch.int64)
    lm[0, 0, 1, 2] = 2  # query block 1 (rows 64..127) against keys 64..95: a diagonal block, pooled
    with pytest.raises(ValueError, match="crosses the diagonal"):
        psa_attention(q, k, v, mask=PyramidBlockMask.from_level_map(lm, block_q=64, block_kv=32), causal=True)


# ----------------------------------------------------------------------------------------- kernel
@needs_interpreter
@pytest.mark.parametrize(
    "length,d,bq,bkv,dtype,future",
    [
        (200, 64, 64, 32, torch.float32, False),
        (130, 32, 64, 128, torch.float32, True),
        (160, 128, 128, 64, torch.float16, True),
    ],
    ids=["L200-d64-64x32-fp32", "L130-d32-64x128-fp32-future", "L160-d128-128x64-fp16-future"],
)
def test_kernel_matches_reference(length, d, bq, bkv, dtype, future):
    """Needs ``psa_attention_triton(..., causal=True)``: docs/design.md, section 8 (which tiles get the mask)."""
    from psa_diffusers.ops.attention import psa_attention_triton

    q, k, v = _qkv(2, 1, length, d, seed=9, dtype=dtype)
    lm = causal_map(2, 1, length, bq, bkv, seed=9, future_levels=future)
    mask = PyramidBlockMask.from_level_map(lm, block_q=bq, block_kv=bkv)
    out = psa_attention_triton(q, k, v, mask, causal=True)
    ref = psa_attention_reference(q.float(), k.float(), v.float(), mask, causal=True)
    assert not out.isnan().any()
    # fp16: the kernel's P and output roundings (tests/ops/test_attention.py, TOL)
    assert rel_err(out, ref) < (TOL_F32 if dtype == torch.float32 else 3e-3)


# ----------------------------------------------------------------------------------------- ops
def test_ops_pass_opcheck_and_compile():
    """``psa.build_causal_mask`` and ``psa.attention(causal=True)``: schema, fake and autograd registrations,
    and one graph under ``torch.compile(fullgraph=True)``."""
    from psa_diffusers import library

    q, k, v = _qkv(1, 2, 150, 16, seed=10)
    config = PSAConfig(block_q=64, block_kv=32, **SPARSE)
    args = (*library.config_op_args(config), 0, 32, 32, 0.25, "reference")
    torch.library.opcheck(torch.ops.psa.build_causal_mask, (q, k, *args), test_utils=("test_schema", "test_faketensor"))
    counts, indices = torch.ops.psa.build_causal_mask(q, k, *args)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.psa.attention, (qg, kg, vg, counts, indices, 64, 32, 0.25, "reference", True))

    def run(q, k, v):
        return psa_attention(q, k, v, config, causal=True, backend="reference", sink_tokens=32, recent_tokens=32)

    compiled = torch.compile(run, fullgraph=True, backend="eager")
    assert torch.equal(compiled(q, k, v), run(q, k, v))


@pytest.mark.parametrize("bq, bkv", [(128, 32), (64, 128)], ids=["4-diagonal-kv-blocks-per-row", "wide-kv-blocks"])
def test_a_given_mask_with_a_pooled_or_skipped_diagonal_block_is_refused(bq, bkv):
    """``psa_attention(..., mask=, causal=True)`` checks every diagonal block is level 1 (each query must see
    its own key): with several diagonal KV blocks per query block, any one of them pooled or skipped fails."""
    length = 300
    q, k, v = _qkv(1, 2, length, 16, seed=11)
    lm = causal_map(1, 2, length, bq, bkv, seed=11)
    diag = (causal_relation(length, bq, bkv) == DIAGONAL).nonzero()
    good = PyramidBlockMask.from_level_map(lm, block_q=bq, block_kv=bkv)
    psa_attention(q, k, v, PSAConfig(block_q=bq, block_kv=bkv), mask=good, causal=True, backend="reference")
    for level in (0, 2):
        i, j = diag[len(diag) // 2].tolist()  # a diagonal block in the middle of the sequence
        bad = lm.clone()
        bad[0, 1, i, j] = level
        mask = PyramidBlockMask.from_level_map(bad, block_q=bq, block_kv=bkv)
        with pytest.raises(ValueError, match=f"\\(0, 1, {i}, {j}\\)"):
            psa_attention(q, k, v, PSAConfig(block_q=bq, block_kv=bkv), mask=mask, causal=True, backend="reference")


# ----------------------------------------------------------------------------------------- levels kernel
def _importance(b, h, length, bq, bkv, seed, integer):
    """Random importance ``[B, H, Nq, Nk]`` >= 0; ``integer``: values in {0, 1, 2, 3} (many exact ties)."""
    g = torch.Generator().manual_seed(seed)
    imp = torch.rand(b, h, ceil_div(length, bq), ceil_div(length, bkv), generator=g)
    return (imp * 4).floor() if integer else imp


def _caps(b, h, length, bkv, seed):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.tensor([1, 2, 4, 8])[torch.randint(0, 4, (b, h, ceil_div(length, bkv)), generator=g)]


def _competing_counts(length, bq, bkv, sink, recent, text_len):
    """``[Nq]``: each row's number of competing blocks (past and not forced), from the torch rule's matrices."""
    rel = causal_relation(length, bq, bkv)
    forced = causal_forced_full(length, bq, bkv, sink_tokens=sink, recent_tokens=recent, text_len=text_len)
    return ((rel == PAST) & ~forced).sum(-1)


def _assert_same_mask(got, ref):
    assert torch.equal(got.kv_counts, ref.kv_counts.to(torch.int32))
    assert torch.equal(got.kv_indices, ref.kv_indices.to(torch.int32))


# (length, bq, bkv, sink, recent, text_len, budgets, min_full_share, integer importance, caps)
QUOTA_CASES = {
    "L1000-128x128-sink128-recent256": (1000, 128, 128, 128, 256, 0, (0.1, 0.1, 0.1, 0.2), 0.0, False, False),
    "L555-64x32-no-sink-recent-text-ties-caps": (555, 64, 32, 0, 0, 0, (0.15, 0.1, 0.05, 0.3), 0.05, True, True),
    # shares k/8: many rows where share * n ends in .5 exactly (ties to even, as torch.round)
    "L700-64x64-eighths-text70-caps": (700, 64, 64, 40, 100, 70, (0.125, 0.25, 0.375, 0.25), 0.0625, True, True),
    # 0.1 * 5, 0.3 * 5, 0.7 * 5: products that round to .5 in float64
    "L901-128x32-tenths-text1": (901, 128, 32, 128, 200, 1, (0.1, 0.3, 0.0, 0.5), 0.1, False, False),
}


@needs_interpreter
@pytest.mark.parametrize("case", sorted(QUOTA_CASES))
def test_causal_levels_kernel_equals_torch_rule_quota(case):
    """Quota mode: the one-launch kernel gives exactly the mask of the PyTorch rule (batch 2 x 3 heads)."""
    length, bq, bkv, sink, recent, text_len, budgets, mfs, integer, with_caps = QUOTA_CASES[case]
    seed = length
    imp = _importance(2, 3, length, bq, bkv, seed, integer)
    caps = _caps(2, 3, length, bkv, seed) if with_caps else None
    config = PSAConfig(block_q=bq, block_kv=bkv, mode="quota", budgets=budgets, min_full_share=mfs)
    kwargs = dict(length=length, sink_tokens=sink, recent_tokens=recent, text_len=text_len, caps=caps)
    ref = causal_levels_reference(imp, config, **kwargs)
    got = build_causal_mask_triton(imp, config, **kwargs)
    _assert_same_mask(got, ref)
    # the case exercises what it claims: rows of different sizes, some pooled and some skipped blocks
    n = _competing_counts(length, bq, bkv, sink, recent, text_len)
    assert len(set(n.tolist())) >= 3
    lm = ref.to_level_map()
    assert (lm == 0).any() and (lm > 1).any()
    if "eighths" in case or "tenths" in case:  # some share * n is a tie that rounds down to an even number
        shares = torch.tensor(budgets, dtype=torch.float64)
        x = shares.unsqueeze(0) * n.double().unsqueeze(1)
        assert ((x - x.floor() == 0.5) & (x.floor() % 2 == 0)).any()


def _mass_margin(imp, length, bq, bkv, sink, recent, text_len, thresholds):
    """The least distance (float64) between a competing block's predecessors' mass and a threshold."""
    n = ceil_div(length, bq)
    rel = causal_relation(length, bq, bkv)
    forced = causal_forced_full(length, bq, bkv, sink_tokens=sink, recent_tokens=recent, text_len=text_len)
    competing = (rel == PAST) & ~forced
    margin = float("inf")
    for i in range(n):
        if not competing[i].any():
            continue
        vals = imp[..., i, competing[i]].double().sort(-1, descending=True).values
        mass = vals / vals.sum(-1, keepdim=True)
        before = mass.cumsum(-1) - mass
        margin = min(margin, min((before - t).abs().min().item() for t in thresholds))
    return margin


@needs_interpreter
@pytest.mark.parametrize(
    "length,bq,bkv,sink,recent,text_len,mfs,with_caps",
    [(700, 64, 32, 64, 64, 0, 0.0, True), (1100, 128, 128, 0, 128, 130, 0.1, False)],
    ids=["L700-64x32-caps", "L1100-128x128-text130-min-full"],
)  # fmt: skip
def test_causal_levels_kernel_equals_torch_rule_mass(length, bq, bkv, sink, recent, text_len, mfs, with_caps):
    """Mass mode: equal masks on importance whose cumulative masses stay away from the thresholds (the
    kernel's float32 cumulative sum runs in another order than ``torch.cumsum``: within rounding of a
    threshold a block may land one level apart, ``ops/levels/kernel.py``)."""
    thresholds = (0.4, 0.55, 0.7, 0.85)
    imp = _importance(2, 3, length, bq, bkv, length, integer=False)
    assert _mass_margin(imp, length, bq, bkv, sink, recent, text_len, thresholds) > 1e-5  # float32 sums: ~1e-7
    caps = _caps(2, 3, length, bkv, length) if with_caps else None
    config = PSAConfig(block_q=bq, block_kv=bkv, mode="mass", budgets=thresholds, min_full_share=mfs)
    kwargs = dict(length=length, sink_tokens=sink, recent_tokens=recent, text_len=text_len, caps=caps)
    ref = causal_levels_reference(imp, config, **kwargs)
    _assert_same_mask(build_causal_mask_triton(imp, config, **kwargs), ref)
    lm = ref.to_level_map()
    assert (lm == 0).any() and (lm > 1).any()


@needs_interpreter
def test_causal_mask_builder_dispatches_to_the_kernel(monkeypatch):
    """``build_causal_block_mask(backend="triton")`` runs the kernel (the torch rule is not called) and gives the
    reference backend's mask for the same importance."""
    from psa_diffusers.ops.levels import causal as causal_module

    length = 300
    q, k, _ = _qkv(1, 2, length, 16, seed=12)
    imp = _importance(1, 2, length, 64, 32, 12, integer=True)
    config = PSAConfig(block_q=64, block_kv=32, mode="quota", budgets=(0.2, 0.2, 0.2, 0.2), min_full_share=0.0)
    kwargs = dict(sink_tokens=32, recent_tokens=32, text_len=20, importance=imp)
    ref = build_causal_block_mask(q, k, config, backend="reference", **kwargs)

    def refuse(*args, **kw):
        raise AssertionError("the torch rule ran on the Triton backend")

    monkeypatch.setattr(causal_module, "causal_levels_reference", refuse)
    monkeypatch.setattr("psa_diffusers.ops.levels.causal_levels_reference", refuse)
    _assert_same_mask(build_causal_block_mask(q, k, config, backend="triton", **kwargs), ref)


class _Ops(TorchDispatchMode):
    """Records every torch op run under it."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@needs_interpreter
def test_causal_levels_launch_runs_no_torch_op_besides_its_outputs(monkeypatch):
    """Around its one launch, the Triton causal path makes only its two outputs: no relation or forced
    matrices, no tensors made from host data, nothing per call that could be cached. (The launch is
    replaced by a recorder: the interpreter's own copies are torch ops too.)"""
    from psa_diffusers.ops.levels import kernel as kernel_module

    launches = []
    monkeypatch.setattr(kernel_module, "_levels_kernel", {(30,): lambda *a, **kw: launches.append(kw)})
    imp = _importance(2, 3, 300, 64, 32, 13, integer=False)
    for mode in ("quota", "mass"):
        config = PSAConfig(block_q=64, block_kv=32, mode=mode, budgets=(0.1, 0.2, 0.3, 0.4))
        with _Ops() as seen:
            build_causal_mask_triton(imp, config, length=300, sink_tokens=32, recent_tokens=32, text_len=10)
        assert len(seen.ops) == 2 and all(op in ("aten.full.default", "aten.empty.memory_format") for op in seen.ops)
    assert [kw["CAUSAL"] for kw in launches] == [True, True]
    with _Ops() as seen:  # the check can fail: the torch rule runs many ops
        causal_levels_reference(imp, config, length=300, sink_tokens=32, recent_tokens=32, text_len=10)
    assert len(seen.ops) > 20


def test_bad_causal_levels_inputs():
    config = PSAConfig(block_q=64, block_kv=32)
    imp = torch.rand(1, 1, 4, 7)
    with pytest.raises(ValueError, match="does not match"):
        causal_levels(imp, config, length=300, sink_tokens=0, recent_tokens=0, backend="reference")
    if HAS_TRITON and INTERPRETED:
        with pytest.raises(ValueError, match="does not match"):
            build_causal_mask_triton(imp, config, length=300, sink_tokens=0, recent_tokens=0)
        with pytest.raises(ValueError, match="sink_tokens"):
            build_causal_mask_triton(torch.rand(1, 1, 5, 10), config, length=300, sink_tokens=-1, recent_tokens=0)
