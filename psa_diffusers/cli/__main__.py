"""``python -m psa_diffusers.cli``: the ``psa-diffusers`` command."""

import sys

from .commands import main

sys.exit(main())
