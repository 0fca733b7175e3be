"""The diffusers integration: ``PSAProcessor``, ``enable_psa`` / ``disable_psa`` / ``PSAHandle``.

``tiny`` builds small random CogVideoX and Wan pipelines offline (tests, demo). ``load_psa_lora``
(the LoRA helper) is looked up in ``.lora`` on first use.
"""

from __future__ import annotations

import importlib

from .enable import PSAHandle, disable_psa, enable_psa
from .processor import PSAProcessor
from .state import LayerStats

__all__ = ["PSAProcessor", "PSAHandle", "LayerStats", "enable_psa", "disable_psa", "load_psa_lora"]


def __getattr__(name: str):
    if name == "load_psa_lora":
        return importlib.import_module(".lora", __name__).load_psa_lora
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
