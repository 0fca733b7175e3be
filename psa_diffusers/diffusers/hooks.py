"""The hooks of ``enable_psa``: diffusers ``ModelHook``s, registered through ``HookRegistry`` (no
monkeypatching).

* :class:`PSAStepHook`, on each transformer: before every forward it finds the denoising step on the
  host (:func:`forward_position`), the latent token grid, and opens the forward in the shared
  ``PSAState`` (which fixes the forward's plan); after it, it closes the forward. It is a *stateful*
  hook, so diffusers hands it the pipeline's cache context and tells it when a pipeline call is over
  (``reset_state``). Its ``pre_forward`` and ``post_forward`` run outside ``torch.compile``
  (``torch.compiler.disable``): under a compiled transformer they are the only graph breaks PSA adds,
  at the transformer's boundary, and the compiled blocks guard only on the plan.
* :class:`TokenOrderHook`, on the patch embedding, Wan's rotary embedding and the output projection,
  when the budget asks for Gilbert order: the video tokens (and their rotary tables, and Wan2.2's
  per-token timesteps) are put in Gilbert-curve order once before the first block and restored once
  before the output projection, so the blocks see curve-ordered tokens and no layer gathers
  (docs/design.md, section 3). Every op between those points acts per token, so nothing else changes.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from .state import Position, PSAState

HOOK_NAME = "psa_diffusers"
"""Name of the step hook in each transformer's ``HookRegistry``."""
ORDER_HOOK_NAME = "psa_diffusers_token_order"
"""Name of the token-order hooks on the transformer's submodules."""


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


def schedule_position(timestep: Any) -> tuple[int, int, torch.Tensor] | None:
    """``(index, length, schedule)`` when ``timestep`` is one element of a 1-D schedule tensor,
    broadcast to the batch (``t.expand(B)`` of ``for t in timesteps``: how the CogVideoX and Wan
    pipelines pass it); None otherwise.

    Reads only tensor metadata (the view's base, offset and strides), never the values: no host sync.
    ``schedule`` is the base tensor (the scheduler's ``timesteps``), so a run that slices its schedule
    (video-to-video ``strength``) counts steps from the start of the full schedule.
    """
    if not isinstance(timestep, torch.Tensor) or timestep.dim() > 1:
        return None
    base = timestep._base
    if base is None or base.dim() != 1 or base.shape[0] == 0 or any(s != 0 for s in timestep.stride()):
        return None
    offset = timestep.storage_offset() - base.storage_offset()
    stride = base.stride(0)
    if stride <= 0 or offset % stride:
        return None
    index = offset // stride
    if not 0 <= index < base.shape[0]:
        return None
    return index, base.shape[0], base


def _timestep_value(timestep: Any) -> float:
    """The largest value of the timestep (Wan2.2's per-token timesteps hold zeros for conditioning
    frames); a host read, so a device sync for a device tensor."""
    if isinstance(timestep, torch.Tensor):
        return float(timestep.detach().flatten().max())
    return float(timestep)


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


def forward_position(context: Any, timestep: Any) -> Position:
    """Where a forward stands, from the host: the cache context's step index (Wan pipelines), else the
    timestep's place in its schedule tensor (CogVideoX pipelines, ``schedule_position``), else -- and
    only then -- the timestep's value (a host read)."""
    call = getattr(context, "name", None)
    scheduled = schedule_position(timestep)
    schedule = scheduled[2] if scheduled is not None else None
    if context is not None and context.step_index is not None:
        length = context.num_inference_steps or (scheduled[1] if scheduled is not None else None)
        return Position(step=int(context.step_index), num_steps=length, call=call, schedule=schedule)
    if scheduled is not None:
        return Position(step=scheduled[0], num_steps=scheduled[1], call=call, schedule=schedule)
    value = _timestep_value(timestep) if timestep is not None else math.nan
    return Position(call=call, timestep=value)


class PSAStepHook(ModelHook):
    """Opens and closes every forward of one transformer in a ``PSAState``.

    state:  the shared state of the ``enable_psa`` call.
    name:   the transformer's attribute in the pipeline ("transformer", "transformer_2").
    family: "cogvideox" or "wan" (decides the latent layout and the per-token inputs).
    handle: the ``PSAHandle`` that owns the hook, so ``disable_psa`` can find it from the model.
    reorder: whether the token-order hooks are installed (Gilbert order once per forward).
    """

    _is_stateful = True  # diffusers sets the cache context on it and resets it at the end of a call

    def __init__(self, state: PSAState, name: str, family: str, handle: Any = None, *, reorder: bool = False):
        super().__init__()
        self.state = state
        self.name = name
        self.family = family
        self.handle = handle
        self.reorder = reorder
        self.cache = StateManager(_NoState)
        self._positions: dict[str, int] = {}

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        params = list(inspect.signature(type(module).forward).parameters)[1:]  # without self
        names = ("hidden_states", "timestep", "image_rotary_emb")
        self._positions = {name: params.index(name) for name in names if name in params}
        return module

    def _argument(self, name: str, args: tuple, kwargs: dict) -> Any:
        if name in kwargs:
            return kwargs[name]
        pos = self._positions.get(name)
        return args[pos] if pos is not None and pos < len(args) else None

    def _replace(self, name: str, value: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        pos = self._positions.get(name)
        if name not in kwargs and pos is not None and pos < len(args):
            return args[:pos] + (value,) + args[pos + 1 :], kwargs
        return args, {**kwargs, name: value}

    def _context(self) -> Any:
        try:
            return self.cache.context
        except ValueError:  # no cache context: the transformer is called outside a pipeline's loop
            return None

    @torch.compiler.disable
    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        if self.handle is not None:
            self.handle.reclaim(self.name)
        hidden_states = self._argument("hidden_states", args, kwargs)
        timestep = self._argument("timestep", args, kwargs)
        grid = None
        if isinstance(hidden_states, torch.Tensor):
            grid = token_grid(self.family, module.config, tuple(hidden_states.shape))
        # under context parallelism the blocks hold a share of the sequence: Gilbert order inside attention
        parallel = getattr(module, "_parallel_config", None) is not None
        position = forward_position(self._context(), timestep)
        info = self.state.begin_forward(
            self.name, position, grid, reorder=self.reorder and not parallel, in_attention=self.reorder and parallel
        )
        if info.token_order == "gilbert":
            args, kwargs = self._reorder_inputs(grid, timestep, args, kwargs)
        return args, kwargs

    def _reorder_inputs(self, grid, timestep, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The per-token inputs of the forward into curve order: CogVideoX's rotary tables
        ``(video_len, D)``, Wan2.2's per-token timesteps ``[B, video_len]``."""
        video_len = math.prod(grid)
        rotary = self._argument("image_rotary_emb", args, kwargs)
        if isinstance(rotary, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in rotary):
            if all(t.dim() == 2 and t.shape[0] == video_len for t in rotary):
                rotary = tuple(permute_video_tokens(t, grid, dim=0) for t in rotary)
                args, kwargs = self._replace("image_rotary_emb", rotary, args, kwargs)
        if isinstance(timestep, torch.Tensor) and timestep.dim() == 2 and timestep.shape[1] == video_len:
            args, kwargs = self._replace("timestep", permute_video_tokens(timestep, grid, dim=1), args, kwargs)
        return args, kwargs

    @torch.compiler.disable
    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        self.state.end_forward(self.name)
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        """Called by the pipeline at the end of a call (``maybe_free_model_hooks``): the run is over."""
        self.state.finish_run()
        return module


# ------------------------------------------------------------------------------------------ token order


def permute_video_tokens(x: torch.Tensor, grid, dim: int, *, start: int = 0, inverse: bool = False) -> torch.Tensor:
    """``x`` with the ``T*H*W`` video tokens at ``[start, start + T*H*W)`` of axis ``dim`` put in
    Gilbert-curve order over ``grid`` (or back, ``inverse``); other tokens stay where they are.

    Runs the op ``psa.permute_tokens`` (one gather; a single node under ``torch.compile``).
    """
    video_len = math.prod(grid)
    dim = dim % x.dim()
    if start or x.shape[dim] != video_len:
        head, video, tail = x.split([start, video_len, x.shape[dim] - start - video_len], dim=dim)
        return torch.cat([head, permute_video_tokens(video, grid, dim, inverse=inverse), tail], dim=dim)
    y = x.unsqueeze(-1) if dim == x.dim() - 1 else x
    moved = y.movedim(dim, -2)
    shape = moved.shape
    out = torch.ops.psa.permute_tokens(moved.reshape(-1, 1, shape[-2], shape[-1]), list(grid), 0, inverse)
    out = out.reshape(shape).movedim(-2, dim)
    return out.squeeze(-1) if y is not x else out


class TokenOrderHook(ModelHook):
    """Moves the video tokens into Gilbert order, or back, at one submodule of a transformer.

    where: "patch_embed" (CogVideoX: the joint ``[text, video]`` output, text kept first),
           "patch_embedding" (Wan: the ``[B, C, T, H, W]`` output, arranged so that the transformer's
           ``flatten(2)`` yields curve order), "rope" (Wan: the rotary tables ``(1, L, 1, D)``), or
           "proj_out" (both: its input, back to raster order).
    text_len: CogVideoX's text tokens before the video in the patch embedding's output (read per call).

    Acts only when the forward's plan carries a grid (``ForwardPlan.grid``): dense steps and raster
    budgets pay nothing.
    """

    def __init__(self, state: PSAState, where: str) -> None:
        super().__init__()
        self.state = state
        self.where = where

    def _grid(self):
        plan = self.state.plan
        return plan.grid if plan is not None else None

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        grid = self._grid()
        if grid is None or self.where != "proj_out":
            return args, kwargs
        hidden = args[0] if args else kwargs["input"]
        restored = permute_video_tokens(hidden, grid, dim=1, inverse=True)
        return ((restored,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "input": restored})

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        grid = self._grid()
        if grid is None or self.where == "proj_out":
            return output
        if self.where == "rope":
            return tuple(permute_video_tokens(t, grid, dim=1) for t in output)
        if self.where == "patch_embedding":
            _check_tokens(output.shape[2:].numel(), grid)
            flat = permute_video_tokens(output.flatten(2), grid, dim=2)
            return flat.view(output.shape)
        # CogVideoX: [B, text + video, C], text first
        video_len = math.prod(grid)
        if output.shape[1] < video_len:
            _check_tokens(output.shape[1], grid)
        return permute_video_tokens(output, grid, dim=1, start=output.shape[1] - video_len)


def _check_tokens(count: int, grid) -> None:
    if count != math.prod(grid):
        raise ValueError(f"token grid {tuple(grid)} does not hold the {count} video tokens of the patch embedding")


ORDER_POINTS = {
    "cogvideox": (("patch_embed", "patch_embed"), ("proj_out", "proj_out")),
    "wan": (("patch_embedding", "patch_embedding"), ("rope", "rope"), ("proj_out", "proj_out")),
}
"""Per family, ``(submodule, where)`` of the token-order hooks."""


def register_step_hook(model: torch.nn.Module, hook: PSAStepHook) -> None:
    """Register ``hook`` on ``model`` under ``HOOK_NAME``; ValueError if one is already there."""
    registry = HookRegistry.check_if_exists_or_initialize(model)
    if registry.get_hook(HOOK_NAME) is not None:
        raise ValueError(f"{type(model).__name__} already has a PSA step hook: PSA is already enabled on it")
    registry.register_hook(hook, HOOK_NAME)


def register_order_hooks(model: torch.nn.Module, state: PSAState, family: str) -> None:
    """Register the token-order hooks of ``family`` on ``model``'s submodules."""
    for attr, where in ORDER_POINTS[family]:
        HookRegistry.check_if_exists_or_initialize(getattr(model, attr)).register_hook(
            TokenOrderHook(state, where), ORDER_HOOK_NAME
        )
    HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()


def find_step_hook(model: torch.nn.Module) -> PSAStepHook | None:
    """The PSA step hook registered on ``model``, if any."""
    registry = getattr(model, "_diffusers_hook", None)
    hook = registry.get_hook(HOOK_NAME) if isinstance(registry, HookRegistry) else None
    return hook if isinstance(hook, PSAStepHook) else None


def remove_step_hook(model: torch.nn.Module) -> None:
    """Remove the step hook and the token-order hooks from ``model``."""
    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.remove_hook(HOOK_NAME, recurse=False)
    registry.remove_hook(ORDER_HOOK_NAME, recurse=True)
    registry.invalidate_child_registries_cache()
