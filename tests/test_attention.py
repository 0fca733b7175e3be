"""psa_attention: input checks, reordering, text tokens, given masks."""

import pytest
import torch
import torch.nn.functional as F

from benchmarks.structured_qkv import structured_qkv
from psa_diffusers import PSAConfig, PyramidBlockMask, build_block_mask, psa_attention, psa_attention_reference
from psa_diffusers.ordering import reorder_tokens
from tests.helpers import rel_err

FULL = dict(budgets=(1.0, 0.0, 0.0, 0.0))


def _rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("order", ["none", "gilbert"])
@pytest.mark.parametrize("text_len", [0, 37])
def test_full_budget_equals_sdpa_with_reorder_and_text(order, text_len):
    grid = (3, 7, 9)
    length = 3 * 7 * 9 + text_len
    q, k, v = (_rand(2, 2, length, 32, seed=s) for s in range(3))
    cfg = PSAConfig(block_q=64, block_kv=32, token_order=order, **FULL)
    out = psa_attention(q, k, v, cfg, grid=grid, text_len=text_len)
    assert rel_err(out, F.scaled_dot_product_attention(q, k, v)) < 1e-5


def test_gilbert_order_changes_which_blocks_are_kept_and_is_undone_on_the_output():
    grid = (4, 8, 8)
    q, k, v = structured_qkv(*grid, heads=2, dim=32, seed=0, dtype=torch.float32)
    cfg = PSAConfig(block_q=64, block_kv=32, budgets=(0.1, 0.1, 0.0, 0.2), token_order="gilbert")
    out, mask = psa_attention(q, k, v, cfg, grid=grid, return_mask=True)
    # the same computation by hand: reorder, build, attend, compare in curve order
    qr, kr, vr = (reorder_tokens(t, grid) for t in (q, k, v))
    by_hand = psa_attention_reference(qr, kr, vr, build_block_mask(qr, kr, cfg))
    assert rel_err(reorder_tokens(out, grid), by_hand) < 1e-6
    raster = psa_attention(q, k, v, cfg.replace(token_order="none"), grid=grid)
    assert rel_err(out, raster) > 1e-3  # reordering really happened
    dense = F.scaled_dot_product_attention(q, k, v)
    assert rel_err(out, dense) < rel_err(raster, dense)  # and compact 3D blocks lose less than raster lines


def test_given_mask_is_used_and_returned():
    q, k, v = (_rand(1, 2, 100, 16, seed=s) for s in range(3))
    lm = torch.tensor([1, 0, 0, 8]).expand(1, 2, 2, 4).contiguous()
    mask = PyramidBlockMask.from_level_map(lm, block_q=64, block_kv=32)
    out, used = psa_attention(q, k, v, mask=mask, return_mask=True)
    assert used is mask
    assert rel_err(out, psa_attention_reference(q, k, v, mask)) == 0.0


@pytest.mark.parametrize(
    "shapes, error, words",
    [
        (((1, 2, 10, 16), (1, 2, 10), (1, 2, 10, 16)), ValueError, ["k", "4-D", "(1, 2, 10)"]),
        (((1, 2, 10, 16), (1, 3, 10, 16), (1, 3, 10, 16)), ValueError, ["batch and heads", "(1, 3, 10, 16)"]),
        (((1, 2, 10, 16), (1, 2, 10, 8), (1, 2, 10, 8)), ValueError, ["head dims", "(1, 2, 10, 8)"]),
        (((1, 2, 10, 16), (1, 2, 12, 16), (1, 2, 11, 16)), ValueError, ["equal length", "(1, 2, 11, 16)"]),
    ],
)
def test_bad_shapes_raise_naming_the_shapes(shapes, error, words):
    q, k, v = (_rand(*s) for s in shapes)
    with pytest.raises(error) as info:
        psa_attention(q, k, v)
    for w in words:
        assert w in str(info.value)


def test_bad_dtypes_backends_text_and_grid():
    q = _rand(1, 2, 64, 16)
    with pytest.raises(TypeError, match="floating"):
        psa_attention(q, q.long(), q)
    with pytest.raises(TypeError, match="one dtype"):
        psa_attention(q, q.double(), q.double())
    with pytest.raises(ValueError, match="backend='fast'"):
        psa_attention(q, q, q, backend="fast")
    with pytest.raises(ValueError, match="text_len=65"):
        psa_attention(q, q, q, text_len=65)
    with pytest.raises(ValueError, match=r"\(2, 4, 4\)"):
        psa_attention(q, q, q, PSAConfig(block_q=64, block_kv=32, token_order="gilbert"), grid=(2, 4, 4))
    mask = PyramidBlockMask.from_level_map(torch.ones(1, 2, 2, 2, dtype=torch.int64), block_q=64, block_kv=32)
    with pytest.raises(ValueError, match="does not fit"):
        psa_attention(q, q, q, mask=mask)


def test_cross_length_attention_works():
    q, k, v = _rand(2, 2, 70, 16), _rand(2, 2, 150, 16, seed=1), _rand(2, 2, 150, 16, seed=2)
    out = psa_attention(q, k, v, PSAConfig(block_q=64, block_kv=32, **FULL))
    assert rel_err(out, F.scaled_dot_product_attention(q, k, v)) < 1e-5
