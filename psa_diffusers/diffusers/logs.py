"""Loggers of the diffusers integration, placed in diffusers' logger tree so that its verbosity applies.

``diffusers.utils.logging.set_verbosity_info()`` shows PSA's INFO lines and ``set_verbosity_error()``
hides its warnings, exactly as for diffusers' own modules: the loggers are named
``"diffusers.psa_diffusers.<module>"``, so their level and handler (stderr) are those of diffusers' root
logger. Like diffusers' own lines they reach the root logger only after
``diffusers.utils.logging.enable_propagation()``.
"""

from __future__ import annotations

import logging

from diffusers.utils import logging as diffusers_logging

PREFIX = "diffusers."
"""What a module's ``__name__`` is prefixed with to name its logger."""


def get_logger(module_name: str) -> logging.Logger:
    """The logger of module ``module_name`` (its ``__name__``), under diffusers' root logger."""
    return diffusers_logging.get_logger(PREFIX + module_name)
