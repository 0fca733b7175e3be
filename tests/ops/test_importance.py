"""The importance estimates (the published sampled block mass; the "density" rule's block statistics) against exact
values, and the Triton kernels against the references.

The kernel runs on CPU under Triton's interpreter; every launcher output is poisoned with NaN
first (``triton_support.POISON_OUTPUTS``), so an element the kernel forgets to write fails.
"""

from __future__ import annotations

import pytest
import torch

from psa_diffusers.ops.importance import (
    estimate_block_importance_reference,
    estimate_block_importance_triton,
    estimate_block_statistics_reference,
    estimate_block_statistics_triton,
    exact_block_mass,
)
from psa_diffusers.ops.importance import kernel as importance_kernel
from psa_diffusers.ops.kernel_configs import KERNEL_CONFIGS
from tests.helpers import DT_IDS, needs_interpreter, random_qkv, video_qkv


@pytest.fixture(scope="module")
def small_qkv():
    """8x16x16 video tokens (L 2048), 2 heads, dim 64, raster order."""
    return video_qkv()


def test_importance_rows_sum_to_one_and_track_the_exact_block_mass(small_qkv):
    q, k, _ = small_qkv
    est = estimate_block_importance_reference(q, k, block_q=64, block_kv=32, stride=8)
    exact = exact_block_mass(q, k, block_q=64, block_kv=32)
    assert torch.allclose(est.sum(-1), torch.ones(est.shape[:-1]), atol=1e-5)
    assert torch.allclose(exact.sum(-1), torch.ones(exact.shape[:-1]), atol=1e-5)
    # the estimate's top block carries most of what the exact top block carries
    top_est = exact.gather(-1, est.argmax(-1, keepdim=True))
    top_exact = exact.max(-1, keepdim=True).values
    assert (top_est / top_exact).mean() > 0.8


@needs_interpreter
@pytest.mark.parametrize(
    "d,dtype,bq,bkv,stride,lq,lkv",
    [
        (16, torch.float32, 64, 32, 8, 300, 270),
        (72, torch.float32, 128, 64, 4, 260, 200),
        (64, torch.float16, 64, 32, 8, 200, 200),
        (32, torch.float32, 64, 32, 3, 130, 100),  # stride not dividing the block: padded sample slots
        (16, torch.float32, 64, 32, 1, 70, 90),  # stride 1 = the exact block mass
    ],
    ids=lambda x: DT_IDS.get(x, str(x)),
)
def test_importance_matches_reference(d, dtype, bq, bkv, stride, lq, lkv):
    q, k, _, _ = random_qkv(2, 2, lq, lkv, d, dtype, seed=stride + d)
    q = q * 2  # sharper softmax than unit-variance inputs
    got = estimate_block_importance_triton(q, k, block_q=bq, block_kv=bkv, stride=stride)
    ref = estimate_block_importance_reference(q, k, block_q=bq, block_kv=bkv, stride=stride)
    assert got.shape == ref.shape and got.dtype == torch.float32
    # probabilities in [0, 1], rows summing to 1: absolute tolerance (fp16 products are exact in fp32)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6 if dtype == torch.float32 else 1e-5)
    torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:-1]), rtol=0, atol=1e-5)


ONE_PASS_CASES = [  # d, dtype, block_q, block_kv, stride, batch, lq, lkv
    (64, torch.float32, 64, 32, 8, 2, 300, 271),
    (128, torch.float16, 128, 64, 4, 2, 261, 199),
    (40, torch.float32, 64, 64, 8, 3, 333, 389),  # head dim padded to 64
    (128, torch.float32, 64, 32, 4, 1, 517, 301),
]


@needs_interpreter
@pytest.mark.parametrize("d,dtype,bq,bkv,stride,b,lq,lkv", ONE_PASS_CASES, ids=lambda x: DT_IDS.get(x, str(x)))
def test_importance_one_pass_matches_reference_and_two_passes(d, dtype, bq, bkv, stride, b, lq, lkv, monkeypatch):
    """ONE_PASS: per-tile block sums against the running max, rescaled at the end, equal the two-pass result.

    Partial tail blocks, odd lengths, several query programs and key tiles (interpreter tiles 32 x 32), keys whose
    second half is 3x larger (the row max jumps in a later tile, so early tiles are rescaled by a tiny factor),
    q and k as transposed ``[B, L, H, D]`` views. The output and the scratch are NaN-poisoned first.

    The interpreter runs one program after another, so two programs sharing scratch entries would not race
    here; instead the scratch is checked to hold exactly one written entry per (head, sampled query, KV block):
    the write map is then one-to-one, and no program or thread can overwrite another's entries on a GPU.
    """
    scratch, allocate = [], importance_kernel._tile_scratch

    def keep_scratch(*args):
        scratch.extend(allocate(*args))
        return tuple(scratch)

    monkeypatch.setattr(importance_kernel, "_tile_scratch", keep_scratch)
    q, k, _, _ = random_qkv(b, 2, lq, lkv, d, dtype, seed=d + lq)
    q = (q * 2).transpose(1, 2).contiguous().transpose(1, 2)
    k = k.clone()
    k[:, :, lkv // 2 :] *= 3
    k = k.transpose(1, 2).contiguous().transpose(1, 2)
    kw = dict(block_q=bq, block_kv=bkv, stride=stride)
    got = estimate_block_importance_triton(q, k, **kw, config={"ONE_PASS": True})
    two = estimate_block_importance_triton(q, k, **kw, config={"ONE_PASS": False})
    ref = estimate_block_importance_reference(q, k, **kw)
    assert got.shape == ref.shape and got.dtype == torch.float32
    # against the reference: the logits' float32 rounding (another summation order of the dot), relative to p
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    # against the two passes: the same logits; only where exp2(m_tile - m_final) is applied differs (a few ulps)
    torch.testing.assert_close(got, two, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:-1]), rtol=0, atol=1e-5)
    u, mt = scratch  # [B*H, Nq * SPQ, Nk], [B*H, Nq * SPQ, n_tiles]
    slot = torch.arange(u.shape[1])
    spq = u.shape[1] // got.shape[2]
    real = ((slot % spq) * stride < bq) & ((slot // spq) * bq + (slot % spq) * stride < lq)
    assert torch.equal(~u.isnan(), real[None, :, None].expand_as(u))
    assert torch.equal(~mt.isnan(), real[None, :, None].expand_as(mt))


def test_every_importance_entry_has_one_pass():
    """``config={"ONE_PASS": ...}`` is accepted on every architecture (an override key must be in the entry)."""
    assert all(isinstance(e.get("ONE_PASS"), bool) for e in KERNEL_CONFIGS["importance"].values())


# --------------------------------------------------------------------------- block statistics (the "density" rule)
def _dense_probs(q, k):
    return torch.softmax((q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)


def test_block_statistics_at_stride_1_are_the_exact_block_mass_and_squared_mass():
    """Stride 1 samples every query and key: mass and squared mass are then exact (computed here from dense p)."""
    q, k, _, _ = random_qkv(1, 2, 70, 90, 16, torch.float32, seed=4)
    q = q * 2
    st = estimate_block_statistics_reference(q, k, block_q=32, block_kv=16, stride=1)
    p = _dense_probs(q, k)  # [B, H, 70, 90]
    qb, kb = torch.arange(70) // 32, torch.arange(90) // 16
    one_q = torch.nn.functional.one_hot(qb).double()  # [70, 3]
    one_k = torch.nn.functional.one_hot(kb).double()  # [90, 6]
    mass = one_q.T @ p @ one_k / one_q.sum(0)[:, None]
    sq = one_q.T @ p.square() @ one_k
    # float32 softmax against float64: relative 1e-5 on probabilities that sum to 1
    torch.testing.assert_close(st.mass.double(), mass, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(st.sq_mass.double(), sq, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(st.q_sq_norm.double(), (one_q.T @ q.double().square().sum(-1).unsqueeze(-1)).squeeze(-1)
                               / one_q.sum(0), rtol=1e-5, atol=0)  # fmt: skip
    assert not st.spike.any()  # no sinks given


def test_a_lone_sink_key_is_found_only_with_the_sinks():
    """A key every query attends to, at an offset the strided samples skip: the sinks put its block's mass right."""
    q, k, _ = video_qkv()
    q, k = q[:, :1].clone(), k[:, :1].clone()
    sink = 701  # block 21 of 32 keys, offset 29: not a multiple of the key stride 4
    q_mean = q.mean(2)[0, 0]
    k[0, 0, sink] = 16.0 * q_mean / q_mean.square().sum() * q.shape[-1] ** 0.5  # mean logit 16
    exact = exact_block_mass(q, k, block_q=64, block_kv=32)
    assert exact[..., sink // 32].mean() > 0.3  # the sink holds a large share of every row
    plain = estimate_block_statistics_reference(q, k, block_q=64, block_kv=32, stride=8)
    sinks = torch.tensor([[[sink, 5, 6]]])
    withs = estimate_block_statistics_reference(q, k, block_q=64, block_kv=32, stride=8, sinks=sinks)
    err_plain = (plain.mass[..., sink // 32] - exact[..., sink // 32]).abs().mean()
    err_with = (withs.mass[..., sink // 32] - exact[..., sink // 32]).abs().mean()
    assert err_with < 0.05 < err_plain
    assert withs.spike[..., sink // 32].float().mean() > 0.9  # its block is a spike block in (nearly) every row
    assert withs.spike.float().mean() < 0.05  # and few others are
    # a sink at a sampled offset (700: offset 28) counts once, as the sink: the same estimate of its block
    k2 = k.clone()
    k2[0, 0, 700], k2[0, 0, sink] = k[0, 0, sink], k[0, 0, 700]
    moved = estimate_block_statistics_reference(q, k2, block_q=64, block_kv=32, stride=8, sinks=sinks - 1)
    assert (moved.mass[..., sink // 32] - exact[..., sink // 32]).abs().mean() < 0.05
    assert moved.spike[..., sink // 32].float().mean() > 0.9


STATS_CASES = [  # d, dtype, block_q, block_kv, stride, lq, lkv, sinks
    (64, torch.float32, 64, 32, 8, 300, 270, 3),
    (128, torch.float32, 128, 64, 8, 260, 200, 0),
    (64, torch.float16, 64, 32, 8, 200, 230, 16),
    (128, torch.float16, 64, 64, 4, 130, 97, 5),
    (16, torch.float32, 64, 32, 3, 90, 75, 2),  # stride not dividing the block: padded sample slots
]


@needs_interpreter
@pytest.mark.parametrize("d,dtype,bq,bkv,stride,lq,lkv,n_sinks", STATS_CASES, ids=lambda x: DT_IDS.get(x, str(x)))
def test_block_statistics_kernel_matches_reference(d, dtype, bq, bkv, stride, lq, lkv, n_sinks):
    q, k, _, g = random_qkv(2, 2, lq, lkv, d, dtype, seed=d + lq)
    q = q * 2
    q_mean = q.float().mean(2)
    k[:, :, 7] = (16 * q_mean / q_mean.square().sum(-1, keepdim=True) * d**0.5).to(dtype)  # mean logit 16: a sink
    q[1, 0, 9, 3] = float("nan")  # non-finite entries count as 0 on both paths
    k[0, 1, 11, 2] = float("inf")
    sinks = torch.randint(0, lkv, (2, 2, n_sinks), generator=g) if n_sinks else None
    if sinks is not None:
        sinks[..., 0] = 7
    ref = estimate_block_statistics_reference(q, k, block_q=bq, block_kv=bkv, stride=stride, sinks=sinks)
    got = estimate_block_statistics_triton(q, k, block_q=bq, block_kv=bkv, stride=stride, sinks=sinks)
    # float32 softmax in another order (fp16 products are exact in float32): probabilities to 1e-5 absolute
    torch.testing.assert_close(got.mass, ref.mass, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.sq_mass, ref.sq_mass, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(got.q_sq_norm, ref.q_sq_norm, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.spike, ref.spike)
    torch.testing.assert_close(got.mass.sum(-1), torch.ones(got.mass.shape[:-1]), rtol=0, atol=1e-5)
    if n_sinks:
        assert ref.spike.any()  # the sink is seen


@needs_interpreter
@pytest.mark.parametrize("one_pass", [False, True], ids=["two-passes", "one-pass"])
@pytest.mark.parametrize("bq,bkv,length", [(64, 32, 600), (128, 64, 777)], ids=["64x32-L600", "128x64-L777"])
def test_importance_past_only(bq, bkv, length, one_pass):
    """``past_only`` (what the causal rule reads): the entries of KV blocks wholly before their query block are
    bit-identical to the full estimate's, all others 0, though the kernel skips each program's later key tiles
    (interpreter tiles: 4 query blocks of 64 per program, 8 KV blocks of 32 per tile, so several programs stop
    early); the reference does the same."""
    q, k, _, _ = random_qkv(2, 2, length, length, 16, torch.float32, seed=length)
    q = q * 2
    kw = dict(block_q=bq, block_kv=bkv, stride=8, config={"ONE_PASS": one_pass})
    full = estimate_block_importance_triton(q, k, **kw)
    got = estimate_block_importance_triton(q, k, past_only=True, **kw)
    nq, nk = got.shape[-2:]
    past = (torch.arange(nk) + 1).view(1, -1) * bkv <= torch.arange(nq).view(-1, 1) * bq
    assert torch.equal(got[..., past], full[..., past])
    assert (got[..., ~past] == 0).all() and (full[..., ~past] > 0).all()
    ref = estimate_block_importance_reference(q, k, block_q=bq, block_kv=bkv, stride=8, past_only=True)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)  # as test_importance_matches_reference
