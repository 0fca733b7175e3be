"""Causal PSA for Hugging Face transformers decoders (Qwen2.5-VL video understanding).

    from psa_diffusers.transformers import configure, register_psa_attention

    register_psa_attention()  # adds "psa" to transformers' AttentionInterface
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_id, attn_implementation="psa")
    configure(model, preset="qwen2.5-vl")  # optional: the defaults apply otherwise

Registration is explicit: importing this package changes nothing in transformers.
"""

from __future__ import annotations

from .attention import (
    ATTENTION_NAME,
    CONFIG_ATTRIBUTE,
    configure,
    dense_reason,
    psa_attention_forward,
    register_psa_attention,
    settings_of,
)
from .settings import PRESETS, CausalPSASettings, get_settings

__all__ = [
    "ATTENTION_NAME",
    "CONFIG_ATTRIBUTE",
    "PRESETS",
    "CausalPSASettings",
    "configure",
    "dense_reason",
    "get_settings",
    "psa_attention_forward",
    "register_psa_attention",
    "settings_of",
]
