"""Gilbert token order: permutation, locality, block compactness, reorder/restore, caching."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from psa_diffusers import ordering
from psa_diffusers.ordering import gilbert_order, reorder_tokens, restore_tokens, video_permutation


def _coords(perm: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """``[N, 3]`` (t, h, w) of the raster indices in ``perm``."""
    _, h, w = grid
    return torch.stack([perm // (h * w), (perm // w) % h, perm % w], dim=1)


def _unit_step_fraction(grid: tuple[int, int, int]) -> float:
    c = _coords(gilbert_order(grid), grid)
    manhattan = (c[1:] - c[:-1]).abs().sum(1)
    return (manhattan == 1).double().mean().item()


def _block_stats(perm: torch.Tensor, grid: tuple[int, int, int], block: int) -> tuple[float, float]:
    """Mean bounding-box volume and mean radius of gyration of the full ``block``-token runs of ``perm``."""
    n = perm.numel() // block * block
    c = _coords(perm[:n], grid).view(-1, block, 3)
    volume = (c.amax(1) - c.amin(1) + 1).prod(1).double().mean().item()
    cf = c.double()
    gyration = ((cf - cf.mean(1, keepdim=True)) ** 2).sum(-1).mean(1).sqrt().mean().item()
    return volume, gyration


def _check_permutation(grid: tuple[int, int, int]) -> None:
    n = grid[0] * grid[1] * grid[2]
    perm, inverse = video_permutation(grid)
    assert perm.dtype == inverse.dtype == torch.int64
    assert perm.shape == inverse.shape == (n,)
    assert torch.equal(perm.sort().values, torch.arange(n))
    assert torch.equal(inverse[perm], torch.arange(n))
    assert torch.equal(gilbert_order(grid), perm)
    assert perm[0].item() == 0
    if n > 1:  # every step goes to one of the 26 neighbours: no jumps, at worst a diagonal
        c = _coords(perm, grid)
        assert (c[1:] - c[:-1]).abs().amax().item() == 1


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 12))
def test_permutation_small_grids(t: int, h: int, w: int) -> None:
    _check_permutation((t, h, w))


@pytest.mark.parametrize(
    "grid", [(21, 30, 52), (13, 30, 45), (9, 17, 33), (16, 16, 16), (1, 45, 80), (33, 1, 2), (2, 99, 3), (1, 1, 1)]
)
def test_permutation_larger_grids(grid: tuple[int, int, int]) -> None:
    _check_permutation(grid)


def test_degenerate_grids_are_lines_and_planes() -> None:
    assert torch.equal(gilbert_order((1, 1, 7)), torch.arange(7))
    assert torch.equal(gilbert_order((5, 1, 1)), torch.arange(5))
    assert torch.equal(gilbert_order((1, 6, 1)), torch.arange(6))
    assert _unit_step_fraction((1, 30, 52)) == 1.0


# Measured unit-step fractions (Manhattan distance 1): 21x30x52 0.9973, 13x30x45 0.9900, 9x17x33 0.9806,
# 8x16x16 1.0, 5x7x9 0.9809, 21x45x80 0.9927. The rest are diagonal steps (see the permutation test).
@pytest.mark.parametrize("grid", [(21, 30, 52), (13, 30, 45), (9, 17, 33), (8, 16, 16), (5, 7, 9), (21, 45, 80)])
def test_locality(grid: tuple[int, int, int]) -> None:
    assert _unit_step_fraction(grid) >= 0.95


def test_power_of_two_cube_has_only_unit_steps() -> None:
    assert _unit_step_fraction((8, 8, 8)) == 1.0


def test_blocks_are_compact() -> None:
    # Measured on 21x30x52, 128-token blocks: mean bounding-box volume 216 (curve) vs 395 (raster),
    # ratio 1.83; mean radius of gyration 2.9 vs 15.2, ratio 5.25. A raster block is a 1x3x52 slab
    # whose box is already small in volume (the ratio is carried by the blocks that cross a frame);
    # the curve's gain is in shape, which the radius of gyration measures.
    grid = (21, 30, 52)
    curve_volume, curve_gyration = _block_stats(gilbert_order(grid), grid, 128)
    raster_volume, raster_gyration = _block_stats(torch.arange(21 * 30 * 52), grid, 128)
    assert raster_volume / curve_volume >= 1.6
    assert raster_gyration / curve_gyration >= 4.0
    assert curve_volume <= 2.0 * 128


@pytest.mark.parametrize("text_len", [0, 7])
def test_reorder_restore_roundtrip(text_len: int) -> None:
    grid = (3, 5, 6)
    n = 3 * 5 * 6
    x = torch.randn(2, 3, n + text_len, 4)
    y = reorder_tokens(x, grid, text_len=text_len)
    perm, _ = video_permutation(grid)
    assert y.shape == x.shape
    assert torch.equal(y[:, :, :n], x[:, :, perm])
    assert not torch.equal(y[:, :, :n], x[:, :, :n])
    assert torch.equal(y[:, :, n:], x[:, :, n:])  # text tokens unchanged, in place
    assert torch.equal(restore_tokens(y, grid, text_len=text_len), x)
    # The order is the same for every batch entry and head.
    assert torch.equal(y[1, 2], x[1, 2].index_select(0, torch.cat([perm, torch.arange(n, n + text_len)])))


def test_reorder_is_differentiable() -> None:
    grid = (2, 3, 4)
    x = torch.randn(1, 2, 24 + 5, 3, requires_grad=True)
    restore_tokens(reorder_tokens(x, grid, 5) * 2.0, grid, 5).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


def test_length_mismatch_raises() -> None:
    x = torch.zeros(1, 1, 30, 2)
    with pytest.raises(ValueError, match=r"grid=\(2, 3, 4\).*L=30.*text_len=5"):
        reorder_tokens(x, (2, 3, 4), text_len=5)
    with pytest.raises(ValueError, match="L=30"):
        restore_tokens(x, (2, 3, 4))
    with pytest.raises(ValueError, match="text_len=-1"):
        reorder_tokens(x, (2, 3, 5), text_len=-1)
    with pytest.raises(ValueError, match="expected"):
        reorder_tokens(torch.zeros(30, 2), (2, 3, 5))


@pytest.mark.parametrize("grid", [(0, 3, 4), (2, -1, 4), (2, 3), (2, 3, 4, 5), (2.0, 3, 4), (True, 3, 4), "abc", None])
def test_bad_grid_raises(grid: object) -> None:
    with pytest.raises(ValueError, match="grid="):
        video_permutation(grid)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="grid="):
        gilbert_order(grid)  # type: ignore[arg-type]


def test_cache_returns_shared_tensors_fast() -> None:
    grid = (21, 45, 80)
    ordering._curve.cache_clear()
    ordering._permutation.cache_clear()
    start = time.perf_counter()
    first = video_permutation(grid)
    cold = time.perf_counter() - start
    assert cold < 2.0  # measured about 0.13 s on a 2-core CPU
    start = time.perf_counter()
    for _ in range(100):
        again = video_permutation([21, 45, 80])  # a list is the same grid
    warm = (time.perf_counter() - start) / 100
    assert again[0] is first[0] and again[1] is first[1]
    assert warm < 1e-3
    # gilbert_order hands out a copy: writing to it leaves the cache intact.
    copy = gilbert_order(grid)
    copy.zero_()
    assert torch.equal(video_permutation(grid)[0].sort().values, torch.arange(21 * 45 * 80))


def test_device_index_is_cached() -> None:
    grid = (2, 3, 4)
    x = torch.randn(1, 1, 24 + 2, 2)
    reorder_tokens(x, grid, 2)
    hits = ordering._gather_index.cache_info().hits
    restore_tokens(x, grid, 2)
    assert ordering._gather_index.cache_info().hits == hits + 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_roundtrip_on_gpu() -> None:
    grid = (5, 7, 9)
    x = torch.randn(2, 2, 315 + 3, 8, device="cuda")
    y = reorder_tokens(x, grid, 3)
    assert torch.equal(y.cpu(), reorder_tokens(x.cpu(), grid, 3))
    assert torch.equal(restore_tokens(y, grid, 3), x)
