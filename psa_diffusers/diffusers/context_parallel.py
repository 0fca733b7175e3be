"""PSA under diffusers' Ulysses context parallelism.

Under ``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))`` every rank holds
``L / N`` tokens of all ``H`` heads between attention calls. diffusers' Ulysses attention exchanges them
(an all-to-all) so that, inside attention, each rank holds the full sequence of ``H / N`` heads -- rank
``r`` the heads ``[r H / N, (r + 1) H / N)`` -- runs the attention function it is given there, and
exchanges the output back. A PSA mask is per head and depends only on that head's full q and k, so
running PSA there gives each head the mask and the output it gets on one device.

:func:`ulysses_attention` hands diffusers' templated context-parallel attention a forward op that runs a
given attention function on ``[B, H / N, L, D]``, and a backward op that differentiates it by
recomputation. :func:`gather_heads` collects a per-head value of every rank's heads into ``[H]`` (the
mask densities that statistics and the dense fallback read). This is the only module that touches
diffusers' context-parallel internals (private in diffusers 0.42: the templated attention and the
config's Ulysses mesh).

Ring attention (``ring_degree > 1``) merges the partial softmaxes of key chunks by their log-sum-exp,
which PSA does not return, and a block mask needs every key of a head at once; ``ulysses_anything``
spreads heads unevenly. :func:`dense_reason` names those cases; the processor then runs the stock dense
computation, with one log line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

RING_ATTENTION = "ring attention (context parallelism with ring_degree > 1)"
"""Dense cause: PSA needs each head's full key sequence, and ring attention merges chunks by their LSE."""
ULYSSES_ANYTHING = "Ulysses attention with ulysses_anything (uneven heads per rank)"
"""Dense cause: heads spread unevenly over the ranks."""

Attend = Callable[..., torch.Tensor]
"""``attend(q, k, v, record=True)``: attention of q, k, v ``[B, H_local, L, D]`` (full sequence, this rank's
heads) to ``[B, H_local, L, D]``; ``record=False`` for a backward's recomputation (no statistics)."""

__all__ = ["RING_ATTENTION", "ULYSSES_ANYTHING", "dense_reason", "gather_heads", "local_heads", "ulysses_attention"]


def _context_config(parallel_config: Any) -> Any:
    """The ``ContextParallelConfig`` inside a diffusers ``ParallelConfig`` (or the config itself)."""
    return getattr(parallel_config, "context_parallel_config", parallel_config)


def dense_reason(parallel_config: Any) -> str | None:
    """Why self-attention under ``parallel_config`` must run the stock dense computation, None when PSA
    runs (Ulysses only, heads split evenly)."""
    cp = _context_config(parallel_config)
    if cp is None:
        return None
    if (getattr(cp, "ring_degree", 1) or 1) > 1:
        return RING_ATTENTION
    if getattr(cp, "ulysses_anything", False):
        return ULYSSES_ANYTHING
    return None


def _ulysses(parallel_config: Any) -> tuple[int, int, Any]:
    """``(degree, this rank's place in the Ulysses group, the group)``; ValueError before ``setup``."""
    cp = _context_config(parallel_config)
    mesh = getattr(cp, "_ulysses_mesh", None)
    if mesh is None:
        raise ValueError(f"{type(cp).__name__} has no Ulysses mesh: call transformer.enable_parallelism first")
    return int(cp.ulysses_degree), int(mesh.get_local_rank()), mesh.get_group()


def local_heads(parallel_config: Any, heads: int) -> slice:
    """The heads, of ``heads``, that this rank holds inside Ulysses attention."""
    degree, rank, _ = _ulysses(parallel_config)
    if heads % degree:
        raise ValueError(f"heads={heads} do not split evenly over ulysses_degree={degree}")
    per_rank = heads // degree
    return slice(rank * per_rank, (rank + 1) * per_rank)


def gather_heads(values: torch.Tensor, parallel_config: Any) -> torch.Tensor:
    """``[H]`` from every rank's ``[H / N]`` per-head ``values``, in head order (one all-gather over the
    Ulysses group; every rank gets the same tensor)."""
    degree, _, group = _ulysses(parallel_config)
    values = values.contiguous()
    out = values.new_empty((degree * values.shape[0],))
    torch.distributed.all_gather_into_tensor(out, values, group=group)
    return out


class _UlyssesOps:
    """The forward and backward ops diffusers' templated attention calls on each rank, around ``attend``.

    Their tensors are in diffusers' layout ``[B, L, H_local, D]``; ``attend`` gets ``[B, H_local, L, D]``.
    """

    def __init__(self, attend: Attend) -> None:
        self.attend = attend

    def forward(
        self,
        ctx,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
        return_lse: bool = False,
        _save_ctx: bool = True,
        _parallel_config: Any = None,
    ) -> torch.Tensor:
        if return_lse:
            raise ValueError("return_lse=True: PSA does not return the log-sum-exp (ring attention needs it)")
        given = {"attn_mask": attn_mask, "is_causal": is_causal, "dropout_p": dropout_p, "scale": scale,
                 "enable_gqa": enable_gqa}  # fmt: skip
        unused = {"attn_mask": None, "is_causal": False, "dropout_p": 0.0, "scale": None, "enable_gqa": False}
        for name, arg in given.items():
            if arg is not unused[name] and arg != unused[name]:
                raise ValueError(f"{name}={arg!r}: PSA under Ulysses serves plain self-attention only")
        if _save_ctx:
            ctx.save_for_backward(query, key, value)
        out = self.attend(*(t.transpose(1, 2) for t in (query, key, value)))
        return out.transpose(1, 2)

    def backward(self, ctx, grad_out: torch.Tensor, *args: Any, **kwargs: Any):
        """Gradients of q, k, v by recomputing the forward with autograd (the mask is a constant; the
        recomputation records no statistics)."""
        saved = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_() for t in saved]
            out = self.attend(*(t.transpose(1, 2) for t in inputs), record=False).transpose(1, 2)
            return torch.autograd.grad(out, inputs, grad_out)


def ulysses_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, parallel_config: Any, attend: Attend
) -> torch.Tensor:
    """Self-attention of this rank's tokens under Ulysses context parallelism.

    query, key, value: ``[B, L / N, H, D]``, this rank's share of the sequence (diffusers' layout).
    attend: the attention to run on ``[B, H / N, L, D]`` -- every token of this rank's heads
        (:func:`local_heads`); it must act on each head independently.
    Returns ``[B, L / N, H, D]``. Every rank of the Ulysses group must call it (all-to-all inside).
    """
    reason = dense_reason(parallel_config)
    if reason is not None:
        raise ValueError(f"ulysses_attention cannot serve {reason}")
    from diffusers.models.attention_dispatch import _templated_context_parallel_attention

    ops = _UlyssesOps(attend)
    return _templated_context_parallel_attention(
        query,
        key,
        value,
        None,
        0.0,
        False,
        None,
        False,
        False,
        forward_op=ops.forward,
        backward_op=ops.backward,
        _parallel_config=parallel_config,
    )
