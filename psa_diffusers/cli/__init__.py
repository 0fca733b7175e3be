"""The ``psa-diffusers`` command (``commands``) and the options it shares with ``examples/*.py`` (``generate``).

The only package of psa_diffusers that prints; the rest logs.
"""

from __future__ import annotations

from .commands import main
from .generate import (
    DEFAULT_PROMPT,
    add_generate_arguments,
    call_arguments,
    check_generate_arguments,
    resolve_preset,
    run_from_arguments,
)

__all__ = [
    "DEFAULT_PROMPT",
    "add_generate_arguments",
    "call_arguments",
    "check_generate_arguments",
    "main",
    "resolve_preset",
    "run_from_arguments",
]
