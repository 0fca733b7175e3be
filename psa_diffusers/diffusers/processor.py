"""PSAProcessor: a diffusers attention processor for CogVideoX and Wan that runs pyramid sparse
attention in self-attention and the stock computation everywhere else.

It computes what the stock processors compute -- ``CogVideoXAttnProcessor2_0`` and
``FusedCogVideoXAttnProcessor2_0`` (text-first joint sequence, LayerNorm QK norms, 3D RoPE on the
video tokens, ``(video, text)`` tuple return) and ``WanAttnProcessor`` (plain or fused projections,
RMSNorm QK norms across heads, interleaved RoPE, the image-to-video image-context branch) -- and
replaces only the core of self-attention, ``softmax(q k^T) v``.

Runs the stock dense computation instead, with one log line per cause:

* cross-attention (Wan ``attn2``) and Wan's image-context attention -- PSA is for the long
  video-video attention; these are short and stay exact;
* a call with an ``attention_mask`` (neither pipeline passes one; PSA has no mask input);
* Wan under ring context parallelism (``ring_degree > 1``, or ``ulysses_anything``): a PSA mask needs
  each head's whole key sequence at once (``context_parallel.py``). Under Ulysses context parallelism
  PSA runs: diffusers' all-to-all gives each rank the full sequence of its heads, and PSA runs there;
* shapes PSA cannot serve (no video tokens, an unsupported dtype).

Installed by ``enable_psa``, the core is the op ``psa.attention_or_dense`` with the processor's CPU
``control``, which the step hook sets on the host before each forward: SDPA on a dense step of the
preset's schedule, PSA on a sparse one, SDPA again where the mask has been too dense to pay (the dense
fallback, for the whole layer or some of its heads). The processor reads only the forward's
``ForwardPlan`` (whether the tokens are already in Gilbert order, fixed for the run) and leaves what it
did on itself (``last_density``, the per-head mask densities on the device, and ``last_reason``), where
the hook collects it; it logs nothing itself. So a compiled block reads no device value, stores two
attributes, and has one graph for the whole run (docs/design.md, section 5). With grad enabled (the op
is inference only) or a diffusers attention backend set on a Wan layer (kept for the dense steps), the
choice is made in Python from the plan, with :func:`psa_attention` on sparse steps.

Installed by hand (``transformer.set_attn_processor(PSAProcessor(...))``) it knows neither step nor
grid: it runs :func:`psa_attention` with the steady-state budget (the preset's sparse-step ``config``)
at every step, in raster token order. Installed on every layer that way, Wan's cross-attention layers
run the stock computation. Its log lines (one per cause) are skipped while ``torch.compile`` traces it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_wan import WanAttention

from ..attention import BACKENDS, attention_or_dense, psa_attention
from ..config import PSAConfig
from .context_parallel import dense_reason, gather_heads, local_heads, ulysses_attention
from .logs import get_logger
from .state import (
    ATTENTION_MASK,
    CROSS_ATTENTION,
    EXPECTED_CAUSES,
    IMAGE_CONTEXT,
    SCHEDULED,
    PSAState,
)

logger = get_logger(__name__)

WAN_TEXT_CONTEXT_LEN = 512
"""diffusers' ``WanAttnProcessor`` (0.42) takes Wan2.1 I2V cross-attention's image context to be
everything before the last 512 context tokens (the text encoder's padded length); kept as is, so the
image-context branch splits exactly as the stock one does."""

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

__all__ = ["ATTENTION_MASK", "CROSS_ATTENTION", "IMAGE_CONTEXT", "PSAProcessor", "resolve_schedule"]


def resolve_schedule(config_or_preset: Any) -> Any:
    """A ``PSAConfig`` or a preset from what a user passes: None (``PSAConfig()``), a PSAConfig,
    a preset name, or a preset object (anything with ``config`` and ``config_for_step``)."""
    if config_or_preset is None:
        return PSAConfig()
    if isinstance(config_or_preset, PSAConfig):
        return config_or_preset
    if isinstance(config_or_preset, str):
        from ..presets import get_preset

        return get_preset(config_or_preset)
    if isinstance(getattr(config_or_preset, "config", None), PSAConfig) and hasattr(
        config_or_preset, "config_for_step"
    ):
        return config_or_preset
    raise TypeError(
        f"config_or_preset must be None, a PSAConfig, a preset or a preset name, got {type(config_or_preset).__name__}"
    )


def _wan_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding: interleaved pairs ``(x[2i], x[2i+1])`` of ``x`` ``[B, L, H, D]``."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class PSAProcessor:
    """Attention processor running pyramid sparse attention in CogVideoX and Wan self-attention.

    config_or_preset: a ``PSAConfig``, a preset (or its name), or None for ``PSAConfig()``. Used by
        hand, the processor runs the preset's sparse-step ``config`` at every step, in raster token
        order (see the module docstring); ``enable_psa`` gives it the step and the grid.
    backend: ``psa_attention``'s backend: "auto" (Triton on CUDA, else the PyTorch reference),
        "reference" or "triton".

    One instance may be shared by all layers (``set_attn_processor(PSAProcessor())``); ``enable_psa``
    installs one per self-attention layer. ``_attention_backend`` and ``_parallel_config`` are read by
    the dense Wan paths exactly as by ``WanAttnProcessor``.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, config_or_preset: Any = None, *, backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: allowed values are {BACKENDS}")
        self.schedule = resolve_schedule(config_or_preset)
        self.backend = backend
        self._state: PSAState | None = None
        self._layer: str | None = None
        self._logged: set[str] = set()
        self.last_density: torch.Tensor | None = None
        """Under ``enable_psa``: the FLOP density of each head's mask in the last call (``[H]`` float64
        on the inputs' device), None when no mask was built; the step hook collects and clears it."""
        self.last_reason: str | None = None
        """Under ``enable_psa``: why the last call ran dense, None after a sparse one, ``SCHEDULED``
        when the step hook's control decided."""
        self.control: torch.Tensor | None = None
        """Under ``enable_psa``: the CPU tensor ``[1 + heads]`` the step hook sets per forward (the action,
        ``library.SPARSE``, ``DENSE`` or ``DENSE_MEASURED``, then a dense flag per head), read by the
        op ``psa.attention_or_dense``."""

    @property
    def config(self) -> PSAConfig:
        """The sparse-step budget."""
        return self.schedule if isinstance(self.schedule, PSAConfig) else self.schedule.config

    def __repr__(self) -> str:
        name = getattr(self.schedule, "name", None)
        where = f", layer={self._layer!r}" if self._layer else ""
        return f"PSAProcessor({name!r}{where})" if name else f"PSAProcessor({self.config!r}{where})"

    # Every parameter is declared: diffusers' Attention.forward drops keyword arguments that the
    # processor's signature does not name (CogVideoX passes image_rotary_emb by keyword); Wan passes
    # (hidden_states, encoder_hidden_states, attention_mask, rotary_emb) positionally.
    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        if isinstance(attn, WanAttention):
            return self._wan(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if isinstance(attn, Attention):
            return self._cogvideox(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        raise TypeError(
            f"PSAProcessor serves CogVideoX (Attention) and Wan (WanAttention) layers, got {type(attn).__name__}"
        )

    # ------------------------------------------------------------------ decisions
    def _note(self, cause: str, message: str | None = None) -> None:
        """Log ``cause`` once per processor, when installed by hand (under ``enable_psa`` the step hook
        logs the causes it collects). Without ``message`` the cause is a dense fallback."""
        if torch.compiler.is_compiling() or self._state is not None or cause in self._logged:
            return
        self._logged.add(cause)
        level = logging.INFO if cause in EXPECTED_CAUSES else logging.WARNING
        logger.log(level, "PSAProcessor: %s", message or f"{cause} runs the stock dense computation")

    def _route(self, static: str | None, *, backend: Any = None) -> tuple[str, PSAConfig | None, str | None, bool]:
        """How a self-attention call runs: ``(kind, config, dense_reason, reordered)``.

        kind: "scheduled" -- the op ``psa.attention_or_dense`` with this processor's ``control``, which
              the step hook sets on the host per forward (dense step, sparse, dense fallback): one
              compiled graph serves the whole run; "sparse" -- ``psa_attention`` with ``config``;
              "dense" -- the stock computation, for ``dense_reason``.
        static: a cause that makes this call dense whatever the step (cross-attention, a mask, ...).
        backend: the diffusers attention backend the stock dense computation would use (Wan): dense
              steps keep it, so they do not go through the op.
        """
        state = self._state
        if static is not None:
            return "dense", None, static, False
        if state is None:
            return "sparse", self.config, None, False
        plan = state.plan
        if plan is None:  # called outside a transformer forward
            return "sparse", state.steady_config, None, False
        reordered = plan.grid is not None
        if self.control is not None and backend is None and not torch.is_grad_enabled():  # the op: inference only
            return "scheduled", state.steady_config, None, reordered
        if plan.config is None:
            return "dense", None, plan.reason, reordered
        return "sparse", plan.config, None, reordered

    def _dense(self, cause: str | None) -> None:
        """A self-attention call that runs dense: note the cause, leave it for the step hook."""
        if cause is None:
            return
        self._note(cause)
        if self._state is not None:
            self.last_density, self.last_reason = None, cause

    def _unsupported(self, q: torch.Tensor, video_len: int) -> str | None:
        if q.dtype not in _DTYPES:
            return f"unsupported dtype {q.dtype}"
        if video_len <= 0:
            return "no video tokens"
        return None

    def _attend(
        self, kind: str, q, k, v, config: PSAConfig, *, text_len: int, reordered: bool, heads: slice | None = None,
        grid: tuple[int, int, int] | None = None, record: bool = True,
    ) -> torch.Tensor:  # fmt: skip
        """PSA over q, k, v ``[B, H, L, D]`` (text last, video already in curve order when ``reordered``),
        scheduled or sparse; leaves the density for the step hook (unless ``record`` is False: a
        backward's recomputation, which must not count twice).

        Under Ulysses context parallelism (``_attend_ulysses``): ``heads``, the slice of the layer's heads
        that q, k, v hold (their flags of ``control``; their densities are gathered from every rank), and
        ``grid``, the grid along whose Gilbert curve the tokens are ordered here, around attention.
        """
        if grid is not None:
            q, k, v = (torch.ops.psa.permute_tokens(t, list(grid), text_len, False) for t in (q, k, v))
        if kind == "scheduled":
            control = self.control
            if heads is not None:
                control = torch.cat((control[:1], control[1 + heads.start : 1 + heads.stop]))
            out, density = attention_or_dense(q, k, v, config, control, text_len=text_len, backend=self.backend)
            if record:
                self.last_density, self.last_reason = self._all_heads(density, heads), SCHEDULED
        else:
            if config.token_order == "gilbert" and not reordered and grid is None:
                message = "no token grid (installed without enable_psa): Gilbert order runs as raster"
                self._note("no token grid", message)
            out, mask = psa_attention(q, k, v, config, text_len=text_len, backend=self.backend, return_mask=True)
            if self._state is not None and record:
                length = q.shape[2]
                self.last_density, self.last_reason = self._all_heads(mask.head_densities(length, length), heads), None
        if grid is not None:
            out = torch.ops.psa.permute_tokens(out, list(grid), text_len, True)
        return out

    def _all_heads(self, density: torch.Tensor, heads: slice | None) -> torch.Tensor:
        """Per-head densities of every head of the layer: under Ulysses, gathered from the ranks."""
        return density if heads is None else gather_heads(density, self._parallel_config)

    def _attend_ulysses(self, kind: str, query, key, value, config: PSAConfig) -> torch.Tensor:
        """PSA under Ulysses context parallelism, of this rank's tokens ``[B, L / N, H, D]``: diffusers'
        all-to-all gives each rank every token of ``H / N`` heads, PSA runs on them as on one device (in
        Gilbert order when the budget asks for it and the grid is known), and the all-to-all returns the
        output. Each head gets the mask it gets on one device; the per-head dense flags and densities keep
        the layer's head numbering, so statistics and the dense fallback are those of one device."""
        heads = local_heads(self._parallel_config, query.shape[2])
        current = self._state.current if self._state is not None else None
        grid = current.grid if current is not None and config.token_order == "gilbert" else None

        def attend(q, k, v, record=True):
            return self._attend(
                kind, q, k, v, config, text_len=0, reordered=False, heads=heads, grid=grid, record=record
            )  # fmt: skip

        return ulysses_attention(query, key, value, self._parallel_config, attend)

    # ------------------------------------------------------------------ CogVideoX
    def _cogvideox(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text_len = 0 if encoder_hidden_states is None else encoder_hidden_states.size(1)
        video_len = hidden_states.size(1)
        static = None
        if attn.is_cross_attention:
            static = CROSS_ATTENTION
        elif attention_mask is not None:
            static = ATTENTION_MASK
        else:
            static = self._unsupported(hidden_states, video_len)
        kind, config, reason, reordered = self._route(static)

        # The stock joint sequence is [text, video]; PSA wants text last, so the sparse path builds
        # [video, text] directly (every op before attention is per token; attention does not care).
        sparse = kind != "dense"
        parts = [hidden_states, encoder_hidden_states] if sparse else [encoder_hidden_states, hidden_states]
        joint = torch.cat([p for p in parts if p is not None], dim=1)
        batch_size, sequence_length, _ = joint.shape
        video = slice(0, video_len) if sparse else slice(text_len, None)

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv"):
            query, key, value = attn.to_qkv(joint).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(joint), attn.to_k(joint), attn.to_v(joint)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query[:, :, video] = apply_rotary_emb(query[:, :, video], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, video] = apply_rotary_emb(key[:, :, video], image_rotary_emb)

        if sparse:
            out = self._attend(kind, query, key, value, config, text_len=text_len, reordered=reordered)
        else:
            self._dense(reason)
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if sparse:
            video_out, text_out = out.split([video_len, text_len], dim=1)
        else:
            text_out, video_out = out.split([text_len, sequence_length - text_len], dim=1)
        return video_out, text_out

    # ------------------------------------------------------------------ Wan
    def _wan(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        # Wan's blocks call attn1(hs, None, None, rotary) and attn2(hs, context, None, None):
        # self-attention is exactly "no encoder_hidden_states".
        is_self = encoder_hidden_states is None
        image_context = None
        if attn.add_k_proj is not None and encoder_hidden_states is not None:
            image_len = encoder_hidden_states.shape[1] - WAN_TEXT_CONTEXT_LEN
            image_context = encoder_hidden_states[:, :image_len]
            encoder_hidden_states = encoder_hidden_states[:, image_len:]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states

        if attn.fused_projections and not attn.is_cross_attention:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        elif attn.fused_projections:
            query = attn.to_q(hidden_states)
            key, value = attn.to_kv(context).chunk(2, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))  # [B, L, H, D]
        if rotary_emb is not None:
            query = _wan_rotary(query, *rotary_emb)
            key = _wan_rotary(key, *rotary_emb)

        image_out = None
        if image_context is not None:
            self._note(IMAGE_CONTEXT)
            if attn.fused_projections:
                key_img, value_img = attn.to_added_kv(image_context).chunk(2, dim=-1)
            else:
                key_img, value_img = attn.add_k_proj(image_context), attn.add_v_proj(image_context)
            key_img = attn.norm_added_k(key_img).unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))
            image_out = dispatch_attention_fn(
                query,
                key_img,
                value_img,
                attn_mask=None,
                dropout_p=0.0,
                is_causal=False,
                backend=self._attention_backend,
                parallel_config=None,
            )
            image_out = image_out.flatten(2, 3).type_as(query)

        static = None if is_self else CROSS_ATTENTION
        if static is None and attention_mask is not None:
            static = ATTENTION_MASK
        if static is None and self._parallel_config is not None:
            static = dense_reason(self._parallel_config)  # ring attention; Ulysses runs PSA
        if static is None:
            static = self._unsupported(query, query.shape[1])
        kind, config, reason, reordered = self._route(static, backend=self._attention_backend)

        if kind != "dense" and self._parallel_config is not None:
            out = self._attend_ulysses(kind, query, key, value, config)
        elif kind != "dense":
            q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, H, L, D] views
            out = self._attend(kind, q, k, v, config, text_len=0, reordered=reordered).transpose(1, 2)
        else:
            if is_self:
                self._dense(reason)
            else:
                self._note(CROSS_ATTENTION)
            out = dispatch_attention_fn(
                query,
                key,
                value,
                attn_mask=attention_mask,
                dropout_p=0.0,
                is_causal=False,
                backend=self._attention_backend,
                parallel_config=self._parallel_config if is_self else None,
            )
        out = out.flatten(2, 3).type_as(query)
        if image_out is not None:
            out = out + image_out
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        return out
