"""No host synchronisation inside a transformer forward with PSA on (docs/design.md, section 5).

On a CPU every tensor is on the host, so "no sync" is checked two ways that can fail here:

* The whole forward -- step hook, token-order hooks, processors, state -- runs on the **meta** device:
  reading any value of a meta tensor raises, so a forward that completes read none (the step comes
  from the cache context or from the timestep's place in its schedule, never from its value). The psa
  ops run their fake implementations there; what they are told to do is read from their CPU control.
* Inside the op ``psa.attention_or_dense``, on its GPU path (the Triton kernels under the interpreter),
  a dispatch mode fails on every op that would synchronise a device (``_local_scalar_dense`` behind
  ``item``/``float``/``bool``, data-dependent shapes such as ``nonzero``), and a function mode on PSA's
  own host reads (``tolist``/``numpy``/``cpu``) and on device tensors made from host data
  (``torch.tensor(..., device=)``, a synchronising copy on CUDA) -- except for the control tensor,
  which lives on the host by design.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import psa_diffusers
from psa_diffusers import PSAConfig
from psa_diffusers.diffusers import enable_psa
from psa_diffusers.library import DENSE, DENSE_MEASURED, SPARSE, attention_or_dense_impl, config_op_args
from tests.helpers import needs_interpreter
from tests.tiny_models import SPARSE as SPARSE_CONFIG
from tests.tiny_models import TINY_GRID, tiny_cogvideox_transformer, tiny_preset, tiny_wan_transformer

VIDEO = TINY_GRID[0] * TINY_GRID[1] * TINY_GRID[2]
PACKAGE = os.path.dirname(os.path.abspath(psa_diffusers.__file__))

SYNCING_OPS = {
    "aten._local_scalar_dense.default",
    "aten.nonzero.default",
    "aten.nonzero_numpy.default",
    "aten.masked_select.default",
    "aten._unique2.default",
    "aten.unique_dim.default",
    "aten.unique_consecutive.default",
    "aten.equal.default",
    "aten.is_nonzero.default",
    "aten.item.default",
    "aten.repeat_interleave.Tensor",
}
SYNCING_METHODS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.item}


class _NoSync(TorchDispatchMode):
    """Fails on a syncing op (see ``SYNCING_OPS``) unless every tensor it reads is the allowed one."""

    def __init__(self, allowed: torch.Tensor) -> None:
        super().__init__()
        self.allowed = allowed.untyped_storage().data_ptr()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in SYNCING_OPS:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if not all(t.untyped_storage().data_ptr() == self.allowed for t in tensors):
                raise AssertionError(f"host sync: {func}")
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


class _NoHostCopy(TorchFunctionMode):
    """Fails when PSA's own code (not Triton's interpreter) reads a tensor on the host
    (``tolist``, ``numpy``, ``cpu``, ``item``; the allowed tensor excepted) or makes a device tensor from
    host data (``torch.tensor`` / ``torch.as_tensor`` with a ``device``): a copy that synchronises on CUDA."""

    def __init__(self, *allowed: torch.Tensor, root: str = PACKAGE) -> None:
        super().__init__()
        self.allowed = {t.untyped_storage().data_ptr() for t in allowed}
        self.root = root

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        caller = sys._getframe(1).f_code.co_filename
        if caller.startswith(self.root):
            if func in SYNCING_METHODS and args[0].untyped_storage().data_ptr() not in self.allowed:
                raise AssertionError(f"host read: {func.__name__} in {caller}")
            if func in (torch.tensor, torch.as_tensor) and "device" in kwargs:
                raise AssertionError(f"host data copied to the device: {func.__name__} in {caller}")
        return func(*args, **kwargs)


class _Actions(TorchDispatchMode):
    """Records, per ``psa.attention_or_dense`` call, the action its control asked for, and counts the
    token permutations."""

    def __init__(self) -> None:
        super().__init__()
        self.actions: list[int] = []
        self.permutes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) == "psa.attention_or_dense.default":
            self.actions.append(int(args[3][0]))
        elif str(func) == "psa.permute_tokens.default":
            self.permutes += 1
        return func(*args, **(kwargs or {}))


def _controls(model) -> list[torch.Tensor]:
    return [p.control for p in model.attn_processors.values() if getattr(p, "control", None) is not None]


def _meta_run(family: str) -> tuple[object, _Actions]:
    """Four steps of a Gilbert preset (2 dense, 2 sparse) through a meta-device transformer, called as the
    pipelines call it: Wan with a cache context carrying the step index, CogVideoX with only a name and
    the timestep an element of the schedule tensor; both with classifier-free guidance."""
    preset = tiny_preset(family, config=SPARSE_CONFIG.replace(token_order="gilbert"))
    timesteps = torch.linspace(999, 0, 4, device="meta")
    actions = _Actions()
    with torch.no_grad():
        if family == "wan":
            model = tiny_wan_transformer().to("meta")
            handle = enable_psa(model, preset=preset)
            x, ehs = torch.empty(1, 16, 5, 32, 32, device="meta"), torch.empty(1, 16, 32, device="meta")
            with actions, _NoHostCopy(*_controls(model)):
                for i, t in enumerate(timesteps):
                    for call in ("cond", "uncond"):
                        with model.cache_context(call, step_index=i, num_inference_steps=4):
                            model(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=ehs)
        else:
            model = tiny_cogvideox_transformer().to("meta")
            handle = enable_psa(model, preset=preset)
            x, ehs = torch.empty(2, 5, 4, 32, 32, device="meta"), torch.empty(2, 16, 32, device="meta")
            rotary = (torch.empty(VIDEO, 16, device="meta"), torch.empty(VIDEO, 16, device="meta"))
            with actions, _NoHostCopy(*_controls(model)):
                for t in timesteps:
                    with model.cache_context("cond_uncond"):
                        model(hidden_states=x, encoder_hidden_states=ehs, timestep=t.expand(2), image_rotary_emb=rotary)
    return handle, actions


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_forward_reads_no_device_value(family):
    handle, actions = _meta_run(family)
    forwards = 8 if family == "wan" else 4
    per_forward = [actions.actions[i : i + 2] for i in range(0, len(actions.actions), 2)]
    assert per_forward == [[DENSE, DENSE]] * (forwards // 2) + [[SPARSE, SPARSE]] * (forwards // 2)
    assert actions.permutes == 4 * forwards  # Gilbert order once per forward, dense steps included
    assert handle.state.current is None and handle.state.plan is None  # every forward was closed


def test_a_value_read_on_meta_would_fail():
    """The meta check can fail: reading a value is an error there (what a hidden host sync would do)."""
    with pytest.raises((RuntimeError, NotImplementedError)):
        float(torch.ones(1, device="meta").max())


CONFIGS = {
    "quota": PSAConfig(block_q=64, block_kv=32, budgets=(0.25, 0.25, 0.0, 0.25)),
    "mass-caps": PSAConfig(
        block_q=64, block_kv=32, mode="mass", budgets=(0.4, 0.5, 0.6, 0.8), sim_thresholds=(0.5, 0.5, 0.5)
    ),
    "budget": PSAConfig(block_q=64, block_kv=32, mode="budget", target_density=0.3),
}
CONTROLS = {
    "sparse": [SPARSE, 0, 0],
    "one-head-dense": [SPARSE, 0, 1],
    "dense": [DENSE, 0, 0],
    "dense-measured": [DENSE_MEASURED, 0, 0],
}


@needs_interpreter
@pytest.mark.parametrize("action", sorted(CONTROLS))
@pytest.mark.parametrize("mode", sorted(CONFIGS))
def test_attention_or_dense_reads_only_its_control(mode, action):
    """The op on its GPU path (the Triton kernels, interpreted here): no sync, no host read but the
    control, no host data copied to the device."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 16, generator=g) for _ in range(3))
    control = torch.tensor(CONTROLS[action], dtype=torch.int32)
    args = (*config_op_args(CONFIGS[mode]), 16, 0.25, "triton")
    with _NoSync(control) as dispatch, _NoHostCopy(control):
        out, densities = attention_or_dense_impl(q, k, v, control, *args)
    assert dispatch.seen == []  # the control is read with tolist (host memory), nothing else at all
    assert out.shape == q.shape and densities.shape == (2,) and torch.isfinite(out).all()


@needs_interpreter
@pytest.mark.parametrize("mode", ["quota", "mass-caps"])
def test_causal_mask_build_reads_nothing_on_the_host(mode):
    """The causal mask build (``psa.build_causal_mask``'s body) on its GPU path -- importance, caps and levels
    kernels, interpreted: no sync, no host read, no host data copied to the device."""
    from psa_diffusers.mask_builder import build_causal_block_mask

    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, 2, 300, 16, generator=g) for _ in range(2))
    unused = torch.zeros(1)
    with _NoSync(unused) as dispatch, _NoHostCopy(unused):
        mask = build_causal_block_mask(q, k, CONFIGS[mode], sink_tokens=64, recent_tokens=64, text_len=20,
                                       backend="triton")  # fmt: skip
    assert dispatch.seen == []
    assert mask.shape == (1, 2, 5, 10) and (mask.kv_counts >= 0).all()


def test_the_sync_checks_can_fail():
    control = torch.zeros(1, dtype=torch.int32)
    x = torch.ones(3)
    with pytest.raises(AssertionError, match="host sync"), _NoSync(control):
        bool(x.sum() > 0)
    here = os.path.dirname(os.path.abspath(__file__))  # the checks look at calls from this folder
    with pytest.raises(AssertionError, match="host read"), _NoHostCopy(control, root=here):
        x.tolist()
    with pytest.raises(AssertionError, match="copied to the device"), _NoHostCopy(control, root=here):
        torch.tensor([1.0, 0.5], device=x.device)
