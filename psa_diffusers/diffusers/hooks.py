"""The step hook: a diffusers ``ModelHook`` on each transformer that tells the PSA processors which
denoising step is running and the latent token grid, read from the forward's arguments.

Registered through ``HookRegistry`` (no monkeypatching). Before each transformer forward it reads
``timestep`` and ``hidden_states``; the largest timestep value of the call is the step's timestep
(Wan2.2's per-token timesteps hold zeros for conditioning frames), and the latent shape divided by the
model's patch sizes is the grid. After the forward it lets the state close the call.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .state import PSAState

HOOK_NAME = "psa_diffusers"
"""Name of the step hook in each transformer's ``HookRegistry``."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def token_grid(family: str, model_config: Any, latent_shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """``(T, H, W)`` token grid of a latent after the transformer's patch embedding, None if unknown.

    CogVideoX latents are ``[B, F, C, H, W]``: ``config.patch_size`` in space and, for CogVideoX1.5,
    ``config.patch_size_t`` in time (the pipeline pads F to a multiple of it). Wan latents are
    ``[B, C, F, H, W]`` with ``config.patch_size = (p_t, p_h, p_w)``.
    """
    if len(latent_shape) != 5:
        return None
    if family == "cogvideox":
        _, frames, _, height, width = latent_shape
        p = int(model_config.patch_size)
        p_t = getattr(model_config, "patch_size_t", None)
        t = frames if not p_t else _ceil_div(frames, int(p_t))
        return (t, height // p, width // p)
    if family == "wan":
        _, _, frames, height, width = latent_shape
        p_t, p_h, p_w = (int(p) for p in model_config.patch_size)
        return (frames // p_t, height // p_h, width // p_w)
    raise ValueError(f"family={family!r}: expected 'cogvideox' or 'wan'")


def _timestep_value(timestep: Any) -> float:
    if isinstance(timestep, torch.Tensor):
        return float(timestep.detach().flatten().max())  # one host sync per transformer forward
    return float(timestep)


class PSAStepHook(ModelHook):
    """Reads the timestep and latent shape of every forward of one transformer into a ``PSAState``.

    state:  the shared state of the ``enable_psa`` call.
    name:   the transformer's attribute in the pipeline ("transformer", "transformer_2").
    family: "cogvideox" or "wan" (decides the latent layout).
    handle: the ``PSAHandle`` that owns the hook, so ``disable_psa`` can find it from the model.
    """

    def __init__(self, state: PSAState, name: str, family: str, handle: Any = None) -> None:
        super().__init__()
        self.state = state
        self.name = name
        self.family = family
        self.handle = handle
        self._positions: dict[str, int] = {}

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        params = list(inspect.signature(type(module).forward).parameters)[1:]  # without self
        self._positions = {name: params.index(name) for name in ("hidden_states", "timestep") if name in params}
        return module

    def _argument(self, name: str, args: tuple, kwargs: dict) -> Any:
        if name in kwargs:
            return kwargs[name]
        pos = self._positions.get(name)
        return args[pos] if pos is not None and pos < len(args) else None

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        hidden_states = self._argument("hidden_states", args, kwargs)
        timestep = self._argument("timestep", args, kwargs)
        grid = None
        if isinstance(hidden_states, torch.Tensor):
            grid = token_grid(self.family, module.config, tuple(hidden_states.shape))
        value = _timestep_value(timestep) if timestep is not None else float("nan")
        self.state.begin_forward(self.name, value, grid)
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        self.state.end_forward()
        return output


def register_step_hook(model: torch.nn.Module, hook: PSAStepHook) -> None:
    """Register ``hook`` on ``model`` under ``HOOK_NAME``; ValueError if one is already there."""
    registry = HookRegistry.check_if_exists_or_initialize(model)
    if registry.get_hook(HOOK_NAME) is not None:
        raise ValueError(f"{type(model).__name__} already has a PSA step hook: PSA is already enabled on it")
    registry.register_hook(hook, HOOK_NAME)


def find_step_hook(model: torch.nn.Module) -> PSAStepHook | None:
    """The PSA step hook registered on ``model``, if any."""
    hook = HookRegistry.check_if_exists_or_initialize(model).get_hook(HOOK_NAME)
    return hook if isinstance(hook, PSAStepHook) else None


def remove_step_hook(model: torch.nn.Module) -> None:
    HookRegistry.check_if_exists_or_initialize(model).remove_hook(HOOK_NAME, recurse=False)
