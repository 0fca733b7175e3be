"""Triton kernels: pyramid pooling, the sampled importance estimate, sparse pyramid attention.

``build_mask_triton`` (importance -> levels -> caps -> text -> compact mask in one
launch) and ``similarity_caps_triton`` / ``block_smoothness_triton`` are optional
fast paths for the steps of ``mask_builder.build_block_mask``.

Each kernel has three layers -- the ``@triton.jit`` kernel, a launcher that owns
grids, strides and padding, and the typed public function exported here -- and
a plain PyTorch reference of the same math elsewhere in the package
(``pooling.pool_pyramid``, ``importance.estimate_block_importance``,
``reference.psa_attention_reference``).

Importing this package never fails: without triton, or without a GPU, the
public functions raise ``ValueError`` and :func:`triton_unsupported_reason`
says why. On CPU the kernels run under Triton's interpreter when
``TRITON_INTERPRET=1`` was set before this package was first imported.
"""

from ._triton import HAS_TRITON, INTERPRETED, triton_unsupported_reason
from .allocation import allocate_levels_triton
from .attention import psa_attention_triton
from .importance import estimate_block_importance_triton
from .levels import build_mask_triton, compact_levels_triton
from .moments import pooled_logit_variance_triton
from .pooling import pool_pyramid_triton
from .pyramid_stats import estimate_pyramid_statistics_triton
from .smoothness import block_smoothness_triton, similarity_caps_triton

__all__ = [
    "HAS_TRITON",
    "allocate_levels_triton",
    "block_smoothness_triton",
    "build_mask_triton",
    "compact_levels_triton",
    "INTERPRETED",
    "estimate_block_importance_triton",
    "estimate_pyramid_statistics_triton",
    "pool_pyramid_triton",
    "pooled_logit_variance_triton",
    "psa_attention_triton",
    "similarity_caps_triton",
    "triton_unsupported_reason",
]
