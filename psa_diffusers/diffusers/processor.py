"""PSAProcessor: a diffusers attention processor for CogVideoX and Wan that runs pyramid sparse
attention in self-attention and the stock computation everywhere else.

It computes what the stock processors compute -- ``CogVideoXAttnProcessor2_0`` and
``FusedCogVideoXAttnProcessor2_0`` (text-first joint sequence, LayerNorm QK norms, 3D RoPE on the
video tokens, ``(video, text)`` tuple return) and ``WanAttnProcessor`` (plain or fused projections,
RMSNorm QK norms across heads, interleaved RoPE, the image-to-video image-context branch) -- and
replaces only the core of self-attention, ``softmax(q k^T) v``, with :func:`psa_attention`.

Runs the stock dense computation instead, with one log line per cause:

* cross-attention (Wan ``attn2``) and Wan's image-context attention -- PSA is for the long
  video-video attention; these are short and stay exact;
* a call with an ``attention_mask`` (neither pipeline passes one; PSA has no mask input);
* Wan under context parallelism (``_parallel_config`` set): the sequence is split across devices
  and only ``dispatch_attention_fn`` gathers it;
* shapes PSA cannot serve (no video tokens, an unsupported dtype);
* a dense step of the preset's schedule (when installed by ``enable_psa``; not logged, in ``stats()``).

Installed by ``enable_psa``, a processor knows the denoising step and the token grid from the step
hook. Installed by hand (``transformer.set_attn_processor(PSAProcessor(...))``) it knows neither:
it uses the steady-state budget (the preset's sparse-step ``config``) at every step, and the token
order falls back to raster order, because a Gilbert reordering needs the ``(T, H, W)`` grid.
Installed on every layer that way, Wan's cross-attention layers run the stock computation.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_wan import WanAttention

from ..attention import BACKENDS, psa_attention
from ..config import PSAConfig
from .state import DENSE_STEP, PSAState

logger = logging.getLogger(__name__)

WAN_TEXT_CONTEXT_LEN = 512
"""diffusers' ``WanAttnProcessor`` (0.42) takes Wan2.1 I2V cross-attention's image context to be
everything before the last 512 context tokens (the text encoder's padded length); kept as is, so the
image-context branch splits exactly as the stock one does."""

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# causes of a dense (stock) computation; the first three are expected, the others are warned about
CROSS_ATTENTION = "cross-attention"
IMAGE_CONTEXT = "image-context attention"
ATTENTION_MASK = "attention mask"
CONTEXT_PARALLEL = "context parallelism"
_EXPECTED = (CROSS_ATTENTION, IMAGE_CONTEXT)


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
        """Log ``cause`` once per processor (once per ``enable_psa`` when installed by it).

        Without ``message`` the cause is a dense fallback: "<cause> runs the stock dense computation".
        """
        logged = self._state.logged if self._state is not None else self._logged
        if cause in logged:
            return
        logged.add(cause)
        where = f" (first seen in {self._layer})" if self._layer else ""
        level = logging.INFO if cause in _EXPECTED else logging.WARNING
        message = message or f"{cause} runs the stock dense computation"
        logger.log(level, "PSAProcessor: %s%s", message, where)

    def _dense(self, cause: str | None) -> None:
        """A self-attention call that runs dense: log the cause (schedule steps are not logged), record it."""
        if cause is None:
            return
        if cause != DENSE_STEP:
            self._note(cause)
        if self._state is not None and self._layer is not None:
            self._state.record(self._layer, 1.0, cause)

    def _budget(self) -> tuple[PSAConfig | None, str | None, tuple[int, int, int] | None]:
        """``(config, dense_reason, grid)`` for a self-attention call."""
        if self._state is None:
            return self.config, None, None
        info = self._state.current
        config, reason = self._state.config_for(info)
        return config, reason, (info.grid if info is not None else None)

    def _grid_for(self, config: PSAConfig, grid: tuple[int, int, int] | None, video_len: int):
        if config.token_order != "gilbert":
            return None
        if grid is None:
            self._note("no token grid", "no token grid (installed without enable_psa): Gilbert order runs as raster")
            return None
        if math.prod(grid) != video_len:
            self._note("grid mismatch", f"token grid {grid} does not hold {video_len} video tokens: raster order")
            return None
        return grid

    def _unsupported(self, q: torch.Tensor, video_len: int) -> str | None:
        if q.dtype not in _DTYPES:
            return f"unsupported dtype {q.dtype}"
        if video_len <= 0:
            return "no video tokens"
        return None

    def _sparse(self, q, k, v, config: PSAConfig, *, text_len: int, grid: tuple[int, int, int] | None) -> torch.Tensor:
        """PSA over q, k, v ``[B, H, L, D]`` (text last); records the density used."""
        grid = self._grid_for(config, grid, q.shape[2] - text_len)
        out, mask = psa_attention(q, k, v, config, text_len=text_len, grid=grid, backend=self.backend, return_mask=True)
        if self._state is not None and self._layer is not None:
            length = q.shape[2]
            self._state.record(self._layer, mask.density_tensor(length, length), None)
        return out

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
        config, reason, grid = self._budget()
        if attn.is_cross_attention:
            config, reason = None, CROSS_ATTENTION
        elif attention_mask is not None:
            config, reason = None, ATTENTION_MASK
        elif config is not None and (why := self._unsupported(hidden_states, video_len)) is not None:
            config, reason = None, why

        # The stock joint sequence is [text, video]; PSA wants text last, so the sparse path builds
        # [video, text] directly (every op before attention is per token; attention does not care).
        sparse = config is not None
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
            out = self._sparse(query, key, value, config, text_len=text_len, grid=grid)
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

        config, reason, grid = self._budget() if is_self else (None, CROSS_ATTENTION, None)
        if is_self and config is not None:
            if attention_mask is not None:
                config, reason = None, ATTENTION_MASK
            elif self._parallel_config is not None:
                config, reason = None, CONTEXT_PARALLEL
            elif (why := self._unsupported(query, query.shape[1])) is not None:
                config, reason = None, why

        if config is not None:
            q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, H, L, D] views
            out = self._sparse(q, k, v, config, text_len=0, grid=grid).transpose(1, 2)
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
