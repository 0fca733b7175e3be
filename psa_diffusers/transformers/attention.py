"""The "psa" attention of transformers: causal PSA in a decoder's long prefill, SDPA everywhere else.

:func:`register_psa_attention` adds the function to transformers' ``AttentionInterface`` (and SDPA's
mask builder under the same name to ``AttentionMaskInterface``, so masks are made exactly as for
"sdpa"). A model then takes ``attn_implementation="psa"`` in ``from_pretrained`` or
``model.set_attn_implementation("psa")``. Each call reads its :class:`CausalPSASettings` from the
attention layer's config (``config.psa``, written by :func:`configure`; defaults otherwise).

PSA runs when the layer is causal, the call is a prefill of at least ``min_seq_len`` tokens with no
cached prefix (``Lq == Lkv``), no attention mask (no padding), no dropout, no sliding window and no
extra bias; every other call runs transformers' own ``sdpa_attention_forward``, with one DEBUG log line
saying why. Vision encoders (``is_causal=False``) therefore stay stock.
"""

from __future__ import annotations

import functools
import json
import logging

import torch
from torch import nn

from ..attention import psa_attention
from .settings import CausalPSASettings, get_settings

ATTENTION_NAME = "psa"
"""The name under which the attention function is registered."""
CONFIG_ATTRIBUTE = "psa"
"""The attribute of a layer's (text) config that holds its settings, as :meth:`CausalPSASettings.to_dict`."""

logger = logging.getLogger(__name__)


def register_psa_attention() -> None:
    """Register "psa" in transformers' ``AttentionInterface`` and ``AttentionMaskInterface``; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, psa_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


@functools.lru_cache(maxsize=64)
def _settings_from_json(text: str) -> CausalPSASettings:
    return CausalPSASettings.from_dict(json.loads(text))


def settings_of(module: nn.Module) -> CausalPSASettings:
    """The settings of an attention layer: ``module.config.psa`` (a dict), or the defaults."""
    data = getattr(getattr(module, "config", None), CONFIG_ATTRIBUTE, None)
    if data is None:
        return CausalPSASettings()
    return _settings_from_json(json.dumps(data, sort_keys=True))


def configure(
    model: nn.Module, settings: CausalPSASettings | None = None, *, preset: str | None = None
) -> CausalPSASettings:
    """Set the causal PSA settings of every causal attention layer of ``model``; returns them.

    Give ``settings``, or a ``preset`` name ("qwen2.5-vl", ...), or neither for the defaults. The
    settings are written as a plain dict to the layers' configs (``config.psa``), so they travel with
    ``save_pretrained``. This does not switch the attention: use ``attn_implementation="psa"``.
    """
    if settings is not None and preset is not None:
        raise ValueError("configure takes settings or a preset, not both")
    if preset is not None:
        settings = get_settings(preset)
    settings = CausalPSASettings() if settings is None else settings
    if not isinstance(settings, CausalPSASettings):
        raise ValueError(f"settings must be a CausalPSASettings, got {type(settings).__name__}")
    configs = {id(m.config): m.config for m in model.modules() if _is_decoder_attention(m)}
    if not configs:
        raise ValueError(f"{type(model).__name__} has no causal attention layer (a module with is_causal=True)")
    for config in configs.values():
        setattr(config, CONFIG_ATTRIBUTE, settings.to_dict())
    return settings


def _is_decoder_attention(module: nn.Module) -> bool:
    return getattr(module, "is_causal", False) is True and hasattr(module, "config") and hasattr(module, "layer_idx")


def dense_reason(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask,
    dropout: float,
    is_causal: bool | None,
    settings: CausalPSASettings,
    kwargs: dict,
) -> str | None:
    """Why this call runs SDPA instead of PSA, or None when PSA applies."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    lq, lkv = query.shape[2], key.shape[2]
    if not causal:
        return "not causal (an encoder)"
    if lq != lkv:
        return f"{lq} new tokens against {lkv} keys (decode or a cached prefix)"
    if lq < settings.min_seq_len:
        return f"{lq} tokens, fewer than min_seq_len={settings.min_seq_len}"
    if attention_mask is not None:
        return "an attention mask (padding or a custom mask)"
    if dropout:
        return f"dropout={dropout}"
    for name in ("sliding_window", "softcap", "position_bias", "s_aux"):
        if kwargs.get(name) is not None:
            return f"{name} is set"
    if kwargs.get("output_attentions"):
        return "output_attentions=True"
    return None


def psa_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query ``[B, H, Lq, D]``, key and value ``[B, Hkv, Lkv, D]``;
    returns ``([B, Lq, H, D], None)`` as ``sdpa_attention_forward`` does."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    settings = settings_of(module)
    reason = dense_reason(module, query, key, attention_mask, dropout, is_causal, settings, kwargs)
    if reason is not None:
        logger.debug("psa: layer %s runs SDPA: %s", getattr(module, "layer_idx", "?"), reason)
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
            **kwargs,
        )  # fmt: skip
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # GQA: each query head with its KV head
    out = psa_attention(
        query, key, value, settings.config, scale=scaling, causal=True,
        text_len=min(settings.dense_tail_tokens, query.shape[2]), sink_tokens=settings.sink_tokens,
        recent_tokens=settings.recent_tokens, backend=settings.backend,
    )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None
