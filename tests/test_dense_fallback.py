"""Never slower than dense: the op ``psa.attention_or_dense`` and the dense fallback of ``enable_psa``
(docs/design.md, section 5). A layer whose mask, two forwards earlier, was denser than the threshold
runs dense attention; the decision is taken on the host from densities copied there asynchronously."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from psa_diffusers import PSAConfig, PyramidBlockMask, psa_attention
from psa_diffusers.attention import attention_or_dense
from psa_diffusers.diffusers import enable_psa
from psa_diffusers.diffusers.state import DENSE_FALLBACK, DENSE_FALLBACK_DENSITY, REMEASURE_EVERY
from psa_diffusers.library import DENSE, DENSE_MEASURED, SPARSE, config_op_args
from tests.helpers import random_level_map
from tests.tiny_models import KV_BLOCKS, build, one_thread, rel_err  # noqa: F401  (one_thread is a fixture)
from tests.tiny_models import SPARSE as SPARSE_CONFIG

CONFIG = PSAConfig(block_q=64, block_kv=32, budgets=(0.2, 0.1, 0.1, 0.2))
DIFFUSE = PSAConfig(block_q=64, block_kv=32, budgets=(0.75, 0.0, 0.0, 0.0))
"""Three quarters of every row's blocks at full resolution: a mask too dense to be worth it (0.75 > 0.6)."""


def _qkv(length=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 3, length, 16, generator=g) for _ in range(3))


def _control(action: int) -> torch.Tensor:
    return torch.tensor([action], dtype=torch.int32)  # no per-head flags


def test_sparse_action_is_psa_attention_and_reports_each_head_density():
    q, k, v = _qkv()
    ref, mask = psa_attention(q, k, v, CONFIG, text_len=20, return_mask=True)
    out, densities = attention_or_dense(q, k, v, CONFIG, _control(SPARSE), text_len=20)
    assert torch.equal(out, ref)
    assert densities.shape == (3,) and densities.dtype == torch.float64
    assert torch.allclose(densities, mask.density_map(300, 300).mean(0), rtol=1e-12, atol=0)


@pytest.mark.parametrize("action", [DENSE, DENSE_MEASURED], ids=["dense", "dense-measured"])
def test_dense_actions_are_sdpa(action):
    q, k, v = _qkv()
    out, densities = attention_or_dense(q, k, v, CONFIG, _control(action), text_len=20)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    _, mask = psa_attention(q, k, v, CONFIG, text_len=20, return_mask=True)
    per_head = mask.density_map(300, 300).mean(0)
    assert (per_head < 1.0).all()
    expected = torch.ones(3, dtype=torch.float64) if action == DENSE else per_head  # measured: the mask's
    assert torch.allclose(densities, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dense_heads", [(0,), (1,), (0, 2)])
def test_dense_heads_run_sdpa_and_the_others_psa(dense_heads):
    """``control[1 + h]`` set: head h runs dense attention, the rest of the call stays sparse."""
    q, k, v = _qkv()
    sparse, _ = psa_attention(q, k, v, CONFIG, text_len=20, return_mask=True)
    dense = F.scaled_dot_product_attention(q, k, v)
    control = torch.zeros(4, dtype=torch.int32)
    control[[1 + h for h in dense_heads]] = 1
    out, densities = attention_or_dense(q, k, v, CONFIG, control, text_len=20)
    for h in range(3):
        expected = dense if h in dense_heads else sparse
        assert torch.allclose(out[:, h], expected[:, h], rtol=1e-6, atol=1e-6), h
    assert rel_err(out, sparse) > 1e-3 and rel_err(out, dense) > 1e-3
    _, mask = psa_attention(q, k, v, CONFIG, text_len=20, return_mask=True)
    assert torch.allclose(densities, mask.density_map(300, 300).mean(0), rtol=1e-12, atol=0)


@pytest.mark.parametrize("lq, lkv", [(1296, 1296), (1280, 1280), (1000, 777), (64, 31)])
def test_head_densities_match_the_level_map(lq, lkv):
    """Per head, from the per-level counts (partial last blocks included), as from the dense level map."""
    g = torch.Generator().manual_seed(lq + lkv)
    level_map = random_level_map(2, 3, -(-lq // 64), -(-lkv // 32), generator=g)
    mask = PyramidBlockMask.from_level_map(level_map, block_q=64, block_kv=32)
    assert torch.allclose(mask.head_densities(lq, lkv), mask.density_map(lq, lkv).mean(0), rtol=1e-12, atol=0)


@pytest.mark.parametrize("action", [SPARSE, DENSE, DENSE_MEASURED], ids=["sparse", "dense", "dense-measured"])
def test_op_passes_opcheck(action):
    """Schema, fake implementation against the real one, and AOT dispatch of psa.attention_or_dense."""
    q, k, v = _qkv(length=200)
    args = (q, k, v, _control(action), *config_op_args(CONFIG), 10, 0.25, "reference")
    torch.library.opcheck(torch.ops.psa.attention_or_dense.default, args)


@pytest.mark.parametrize("action", [SPARSE, DENSE, DENSE_MEASURED], ids=["sparse", "dense", "dense-measured"])
@pytest.mark.parametrize("token_major_inputs", [True, False], ids=["BLHD-inputs", "BHLD-inputs"])
@pytest.mark.parametrize("heads", [3, 1])
def test_output_is_token_major_like_its_fake(action, token_major_inputs, heads):
    """The output is ``[B, H, L, D]`` in ``[B, L, H, D]`` memory, whatever the inputs' layout, with exactly
    the fake's strides (size-1 dims too: a compiled graph checks them); the processors then flatten it
    without a copy."""
    q, k, v = (t[:, :heads] for t in _qkv(length=200))
    if token_major_inputs:
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    args = (q, k, v, _control(action), *config_op_args(CONFIG), 10, 0.25, "reference")
    out, _ = torch.ops.psa.attention_or_dense(*args)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake_out, _ = torch.ops.psa.attention_or_dense(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                          for a in args))  # fmt: skip
    assert out.transpose(1, 2).is_contiguous()
    assert out.stride() == fake_out.stride() == (200 * heads * 16, 16, heads * 16, 1)
    if action != SPARSE:  # the dense actions are SDPA itself (float32 on the CPU: same kernel, same values)
        assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, scale=0.25), rtol=1e-6, atol=1e-6)


def test_one_control_tensor_switches_between_calls():
    """The caller flips the control on the host; the same call then computes the other way."""
    q, k, v = _qkv()
    control = _control(SPARSE)
    sparse, _ = attention_or_dense(q, k, v, CONFIG, control)
    control[0] = DENSE  # the same tensor, flipped on the host
    dense, _ = attention_or_dense(q, k, v, CONFIG, control)
    assert rel_err(sparse, dense) > 1e-3 and torch.equal(dense, F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize(
    "control, match",
    [
        (torch.zeros(1), "integer"),
        (torch.zeros((), dtype=torch.int32), "1-D"),
        (torch.zeros(0, dtype=torch.int32), "0 entries"),
        (torch.zeros(3, dtype=torch.int32), "1 \\+ heads = 4"),
        ([0], "CPU tensor"),
    ],
)
def test_bad_control_is_refused(control, match):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=match):
        attention_or_dense(q, k, v, CONFIG, control)


def test_inputs_that_require_grad_are_refused():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="inference only"):
        attention_or_dense(q.requires_grad_(), k, v, CONFIG, _control(SPARSE))


# ------------------------------------------------------------------------------------------ in a pipeline


def _per_step(stats) -> list[tuple[str | None, float, float | None]]:
    """Per step: the (reason, density, mask density) every layer agrees on."""
    out = []
    for step in sorted(stats):
        values = {
            (s.reason, round(s.density, 6), None if s.mask_density is None else round(s.mask_density, 6))
            for s in stats[step].values()
        }
        assert len(values) == 1, values
        out.append(values.pop())
    return out


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("guidance", [1.0, 6.0], ids=["one-call-per-step", "cond-uncond"])
def test_a_too_dense_mask_runs_dense_from_two_forwards_later(guidance):
    """From the third forward on the layers run dense; their masks are built again (measured) only at the
    first fallback forward and every REMEASURE_EVERY-th after it, so the fallback costs dense attention."""
    pipe, call = build("wan")
    num_steps = 12
    with enable_psa(pipe, config=DIFFUSE) as handle:
        call(num_inference_steps=num_steps, guidance_scale=guidance)
    steps = _per_step(handle.stats())
    mask = steps[0][2]
    assert DENSE_FALLBACK_DENSITY < mask < 0.75 + 1 / KV_BLOCKS
    calls = 1 if guidance == 1.0 else 2
    sparse_steps = 2 // calls  # the first two forwards have nothing to go by
    assert steps[:sparse_steps] == [(None, mask, mask)] * sparse_steps
    measured_forwards = {2 + REMEASURE_EVERY * i for i in range(num_steps * calls)}
    expected = [
        (DENSE_FALLBACK, 1.0, mask if measured_forwards & {step * calls + c for c in range(calls)} else None)
        for step in range(sparse_steps, num_steps)
    ]
    assert steps[sparse_steps:] == expected
    assert any(m is None for _, _, m in expected) and sum(m is not None for _, _, m in expected) >= 2
    assert handle.state.fallback_waits == 0


@pytest.mark.usefixtures("one_thread")
def test_a_sparse_enough_mask_and_a_disabled_fallback_stay_sparse():
    pipe, call = build("wan")
    with enable_psa(pipe, config=SPARSE_CONFIG) as sparse:
        call(num_inference_steps=4, guidance_scale=1.0)
    with enable_psa(pipe, config=DIFFUSE, dense_fallback=None) as off:
        call(num_inference_steps=4, guidance_scale=1.0)
    with enable_psa(pipe, config=DIFFUSE, dense_fallback=0.9) as higher:
        call(num_inference_steps=4, guidance_scale=1.0)
    for handle in (sparse, off, higher):
        assert all(reason is None for reason, _, _ in _per_step(handle.stats()))


@pytest.mark.parametrize("value", [0, -0.5, 1.5, True, "0.6", float("nan")])
def test_bad_threshold_is_refused_naming_it(value):
    pipe, _ = build("wan")
    before = dict(pipe.transformer.attn_processors)
    with pytest.raises(ValueError, match="dense_fallback="):
        enable_psa(pipe, dense_fallback=value)
    assert all(pipe.transformer.attn_processors[k] is p for k, p in before.items())


class _HeadDensities(TorchDispatchMode):
    """The per-head densities every ``psa.attention_or_dense`` call returns, in call order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[float]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if str(func) == "psa.attention_or_dense.default":
            self.calls.append(out[1].tolist())
        return out


@pytest.mark.usefixtures("one_thread")
def test_only_the_heads_whose_masks_are_too_dense_run_dense():
    """With the mass rule the two heads of each tiny CogVideoX layer get masks of different densities; a
    threshold between them sends one head of each layer to dense attention and keeps the other sparse."""
    config = PSAConfig(block_q=64, block_kv=32, mode="mass", budgets=(0.5, 0.6, 0.7, 0.8))
    pipe, call = build("cogvideox")
    with enable_psa(pipe, config=config, dense_fallback=None), _HeadDensities() as seen:
        call(num_inference_steps=4, guidance_scale=1.0)
    layers = 2
    per_layer = [seen.calls[i::layers] for i in range(layers)]  # [layer][call][head]
    lows = [max(min(c) for c in calls) for calls in per_layer]  # the sparser head, at its densest
    highs = [min(max(c) for c in calls) for calls in per_layer]  # the denser head, at its sparsest
    assert max(lows) < min(highs), "the setup needs heads whose masks differ"
    threshold = (max(lows) + min(highs)) / 2

    with enable_psa(pipe, config=config, dense_fallback=threshold) as handle, _HeadDensities() as again:
        call(num_inference_steps=4, guidance_scale=1.0)
    stats = handle.stats()
    per_layer = [again.calls[i::layers] for i in range(layers)]  # what this run's masks measured
    for step in range(4):
        for index, (name, s) in enumerate(stats[step].items()):
            heads = per_layer[index][step]
            assert s.mask_density == pytest.approx(sum(heads) / 2), name
            if step < 2:  # nothing to go by yet
                assert (s.reason, s.dense_heads, s.density) == (None, 0, pytest.approx(s.mask_density))
            else:
                assert (s.reason, s.dense, s.dense_heads) == (DENSE_FALLBACK, False, 1)
                assert s.density == pytest.approx((1.0 + min(heads)) / 2)  # one head dense, one at its mask


class _Layer:
    """What the state reads and writes of a processor: its host ``control`` and the last call's result."""

    def __init__(self, heads: int) -> None:
        self.control = torch.zeros(1 + heads, dtype=torch.int32)
        self.last_density = self.last_reason = None


def test_a_thinned_mask_returns_to_sparse_two_forwards_after_its_remeasurement():
    """Every layer in whole-layer fallback, masks re-measured every REMEASURE_EVERY forwards: a mask that
    thinned is acted on two forwards after the forward that measured it, not later (the forwards that
    measure nothing still count)."""
    from psa_diffusers.diffusers.state import SCHEDULED, Position, PSAState

    state = PSAState(CONFIG)
    layers = [("a", _Layer(2)), ("b", _Layer(2))]
    state.register("t", layers)
    thin_from = 2 + REMEASURE_EVERY  # the second measurement sees a sparse mask
    actions = []
    for forward in range(thin_from + 4):
        state.begin_forward("t", Position(step=forward, num_steps=100), None, reorder=False)
        actions.append(int(layers[0][1].control[0]))
        for _, layer in layers:
            built = actions[-1] != DENSE
            value = 0.2 if forward >= thin_from else 0.9
            layer.last_density = torch.full((2,), value, dtype=torch.float64) if built else None
            layer.last_reason = SCHEDULED
        state.end_forward("t")
    assert actions[:2] == [SPARSE, SPARSE]  # nothing to go by
    assert actions[2] == DENSE_MEASURED and actions[thin_from] == DENSE_MEASURED
    assert actions[3:thin_from] == [DENSE] * (thin_from - 3)  # no mask built in between
    assert actions[thin_from + 1] == DENSE  # two forwards later: the thin mask is read ...
    assert actions[thin_from + 2 :] == [SPARSE, SPARSE]  # ... and acted on
