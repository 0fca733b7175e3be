"""Tiny random pipelines for the diffusers-integration tests (builders live in psa_diffusers.diffusers.tiny).

Budgets used by the tests, on blocks of 64 queries x 32 keys over the 5x16x16 = 1,280-token grid
(20 x 40 video blocks):

* ``FULL``: quota (1, 0, 0, 0): every block at level 1, so PSA equals dense attention.
* ``SPARSE``: quota (0.25, 0.25, 0, 0.25): per query block 10 key blocks full, 10 at 2x, 10 at 8x,
  10 skipped: video density 0.25 + 0.25/2 + 0.25/8 = 0.40625.
"""

from __future__ import annotations

import logging

import pytest
import torch

from psa_diffusers.config import PSAConfig
from psa_diffusers.diffusers.tiny import (  # noqa: F401  (re-exported for the tests)
    TINY_GRID,
    TINY_TEXT_LEN,
    tiny_call_kwargs,
    tiny_cogvideox_pipeline,
    tiny_cogvideox_transformer,
    tiny_i2v_call_kwargs,
    tiny_wan_i2v_pipeline,
    tiny_wan_pipeline,
    tiny_wan_transformer,
)
from psa_diffusers.presets import Preset

FULL = PSAConfig(block_q=64, block_kv=32, mode="quota", budgets=(1.0, 0.0, 0.0, 0.0))
SPARSE = PSAConfig(block_q=64, block_kv=32, mode="quota", budgets=(0.25, 0.25, 0.0, 0.25))
SPARSE_VIDEO_DENSITY = 0.25 + 0.25 / 2 + 0.25 / 8
VIDEO_TOKENS = TINY_GRID[0] * TINY_GRID[1] * TINY_GRID[2]
KV_BLOCKS = VIDEO_TOKENS // SPARSE.block_kv


def tiny_preset(family: str, *, num_steps: int = 4, dense_steps: int = 2, config: PSAConfig = SPARSE) -> Preset:
    return Preset(name=f"tiny-{family}", family=family, num_steps=num_steps, dense_steps=dense_steps, config=config)


def expected_density(family: str) -> float:
    """FLOP-weighted density of ``SPARSE`` on the tiny grid; CogVideoX's text is seen by every query at
    level 1 and its text queries attend densely (docs/design.md, section 2)."""
    if family == "wan":
        return SPARSE_VIDEO_DENSITY
    n, t = VIDEO_TOKENS, TINY_TEXT_LEN
    video_rows = n * (SPARSE_VIDEO_DENSITY * n + t)
    return (video_rows + t * (n + t)) / (n + t) ** 2


PIPELINES = {
    "cogvideox": (tiny_cogvideox_pipeline, tiny_call_kwargs),
    "cogvideox-sincos": (lambda: tiny_cogvideox_pipeline(rotary=False), tiny_call_kwargs),
    "wan": (tiny_wan_pipeline, tiny_call_kwargs),
    "wan-i2v": (tiny_wan_i2v_pipeline, tiny_i2v_call_kwargs),
    "wan2.2": (lambda: tiny_wan_pipeline(two_experts=True), tiny_call_kwargs),
}
FAMILY = {"cogvideox": "cogvideox", "cogvideox-sincos": "cogvideox", "wan": "wan", "wan-i2v": "wan", "wan2.2": "wan"}


def build(kind: str):
    """``(pipeline, call)`` where ``call(**overrides)`` runs it and returns the latents."""
    make, kwargs = PIPELINES[kind]
    pipe = make()

    def call(**overrides) -> torch.Tensor:
        with torch.no_grad():
            return pipe(**kwargs(**overrides)).frames

    return pipe, call


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread: these tiny ops gain nothing from threads, and on a shared
    2-core machine a second thread mostly waits (measured 3-5x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(name="psa_logs")
def psa_logs_fixture(caplog):
    """caplog with PSA's INFO lines in it. PSA logs under diffusers' logger tree (its verbosity applies;
    it does not propagate to the root logger by default): INFO verbosity and propagation for the test."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_info()
    diffusers_logging.enable_propagation()
    caplog.set_level(logging.INFO)
    yield caplog
    diffusers_logging.disable_propagation()
    diffusers_logging.set_verbosity(level)
