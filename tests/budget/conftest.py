"""Inputs shared by the budget-mode tests: structured video tokens and their block statistics."""

import pytest

from psa_diffusers.budget.statistics import estimate_pyramid_statistics_reference
from tests.helpers import video_qkv

BQ, BKV = 64, 32
"""Query and KV block sizes of the shared inputs."""


@pytest.fixture(scope="module")
def qkv():
    """8x16x16 video tokens (L 2048), 2 heads, dim 64: 32x64 blocks of 64x32."""
    return video_qkv()


@pytest.fixture(scope="module")
def stats(qkv):
    q, k, _ = qkv
    return estimate_pyramid_statistics_reference(q, k, block_q=BQ, block_kv=BKV)
