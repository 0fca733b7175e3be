"""psa-diffusers: Pyramid Sparse Attention for video diffusion in Hugging Face diffusers.

Core (no diffusers needed): ``PSAConfig``, ``PyramidBlockMask``, ``build_block_mask``,
``psa_attention``, ``psa_attention_reference``, the plan/run split (``plan_attention``,
``run_attention``) and the presets. Importing the package registers the ``torch.ops.psa`` ops. The diffusers
integration (``enable_psa``, ``disable_psa``, ``PSAProcessor``, ``load_psa_lora``)
is imported on first use, so the core works where diffusers is not installed.
"""

from __future__ import annotations

import importlib

from .attention import PSAPlan, plan_attention, psa_attention, run_attention
from .config import PSAConfig
from .mask import PyramidBlockMask
from .mask_builder import build_block_mask
from .ops.attention import psa_attention_reference

__version__ = "0.1.0"

_LAZY = {
    "enable_psa": "psa_diffusers.diffusers",
    "disable_psa": "psa_diffusers.diffusers",
    "PSAProcessor": "psa_diffusers.diffusers",
    "PSAHandle": "psa_diffusers.diffusers",
    "load_psa_lora": "psa_diffusers.diffusers",
    "get_preset": "psa_diffusers.presets",
    "list_presets": "psa_diffusers.presets",
    "load_preset": "psa_diffusers.presets",
    "Preset": "psa_diffusers.presets",
}

__all__ = [
    "PSAConfig",
    "PyramidBlockMask",
    "build_block_mask",
    "psa_attention",
    "psa_attention_reference",
    "PSAPlan",
    "plan_attention",
    "run_attention",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'psa_diffusers' has no attribute {name!r}")
