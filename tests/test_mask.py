import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from psa_diffusers.mask import PyramidBlockMask
from tests.helpers import random_level_map


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 2), h=st.integers(1, 3), nq=st.integers(1, 6), nk=st.integers(1, 9), seed=st.integers(0, 10_000)
)
def test_level_map_round_trip(b, h, nq, nk, seed):
    lm = random_level_map(b, h, nq, nk, generator=torch.Generator().manual_seed(seed))
    m = PyramidBlockMask.from_level_map(lm, block_q=64, block_kv=32)
    assert torch.equal(m.to_level_map(), lm)
    # compact form: counts per level, indices a permutation grouped by level, ascending inside a group
    assert torch.equal(m.kv_counts.long(), torch.stack([(lm == s).sum(-1) for s in (1, 2, 4, 8)], -1))
    assert torch.equal(m.kv_indices.sort(-1).values.long(), torch.arange(nk).expand(b, h, nq, nk))
    ends = m.kv_counts.long().cumsum(-1)
    for bb, hh, ii in [(0, 0, 0), (b - 1, h - 1, nq - 1)]:
        idx = m.kv_indices[bb, hh, ii].long()
        start = 0
        for g, s in enumerate((1, 2, 4, 8)):
            group = idx[start : ends[bb, hh, ii, g]]
            assert torch.all(lm[bb, hh, ii, group] == s)
            assert torch.all(group[1:] > group[:-1])
            start = ends[bb, hh, ii, g]


def test_rejects_bad_values_empty_rows_and_shapes():
    lm = torch.ones(1, 1, 2, 3, dtype=torch.int64)
    bad = lm.clone()
    bad[0, 0, 0, 1] = 3
    with pytest.raises(ValueError, match=r"\[3\]"):
        PyramidBlockMask.from_level_map(bad, block_q=64, block_kv=64)
    empty = lm.clone()
    empty[0, 0, 1] = 0
    with pytest.raises(ValueError, match=r"\(0, 0, 1\)"):
        PyramidBlockMask.from_level_map(empty, block_q=64, block_kv=64)
    with pytest.raises(ValueError, match="4-D"):
        PyramidBlockMask.from_level_map(lm[0], block_q=64, block_kv=64)
    with pytest.raises(ValueError, match="integer"):
        PyramidBlockMask.from_level_map(lm.float(), block_q=64, block_kv=64)
    m = PyramidBlockMask.from_level_map(lm, block_q=64, block_kv=64)
    with pytest.raises(ValueError, match="does not fit"):
        m.density(64 * 3, 64 * 3)


def test_density_counts_partial_tail_blocks_by_real_size():
    # 2 query blocks (64 + 36 rows), 3 KV blocks (32 + 32 + 8 tokens)
    lq, lkv = 100, 72
    lm = torch.tensor([[[[1, 2, 0], [0, 8, 4]]]])
    m = PyramidBlockMask.from_level_map(lm, block_q=64, block_kv=32)
    expected = (64 * (32 + 32 / 2) + 36 * (32 / 8 + 8 / 4)) / (lq * lkv)
    assert m.density(lq, lkv) == pytest.approx(expected, rel=1e-12)
    assert m.sparsity(lq, lkv) == pytest.approx(1 - expected, rel=1e-12)
    full = PyramidBlockMask.from_level_map(torch.ones_like(lm), block_q=64, block_kv=32)
    assert full.density(lq, lkv) == pytest.approx(1.0)


def test_repr_is_short_and_informative():
    m = PyramidBlockMask.from_level_map(torch.ones(2, 3, 4, 5, dtype=torch.int64), block_q=128, block_kv=64)
    r = repr(m)
    assert "B=2" in r and "H=3" in r and "4x5" in r and "density" in r and len(r) < 200
