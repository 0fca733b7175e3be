"""PSAProcessor installed by hand (set_attn_processor): stock equality at full budget, every branch
of the stock processors, dense fallbacks and their log lines."""

from __future__ import annotations

import inspect
import logging

import pytest
import torch
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from psa_diffusers.diffusers import PSAProcessor
from psa_diffusers.mask import PyramidBlockMask
from psa_diffusers.presets import get_preset
from tests.helpers import random_level_map
from tests.tiny_models import (  # noqa: F401  (one_thread is a fixture)
    FULL,
    SPARSE,
    build,
    one_thread,
    psa_logs_fixture,
    rel_err,
    tiny_cogvideox_transformer,
    tiny_wan_transformer,
)

LOGGER = "diffusers.psa_diffusers.diffusers.processor"
pytestmark = pytest.mark.usefixtures("one_thread")


def _install_everywhere(pipe, processor):
    for attr in ("transformer", "transformer_2"):
        model = getattr(pipe, attr, None)
        if model is not None:
            model.set_attn_processor(processor)


@pytest.mark.parametrize(
    "kind, fuse",
    [("cogvideox", False), ("cogvideox", True), ("wan-i2v", False), ("wan-i2v", True)],
    ids=["cogvideox", "cogvideox-fused", "wan-i2v", "wan-i2v-fused"],
)
def test_full_budget_on_every_layer_equals_stock(kind, fuse, psa_logs):
    """One shared processor on every layer, Wan's cross-attention and image context included."""
    pipe, call = build(kind)
    if fuse:
        pipe.transformer.fuse_qkv_projections()  # CogVideoX: swaps in FusedCogVideoXAttnProcessor2_0
        layers = [m for n, m in pipe.transformer.named_modules() if n.endswith(("attn1", "attn2"))]
        assert layers and all(m.fused_projections for m in layers)
    stock = call(num_inference_steps=1)
    _install_everywhere(pipe, PSAProcessor(FULL))
    with psa_logs.at_level(logging.INFO, logger=LOGGER):
        out = call(num_inference_steps=1)
    assert rel_err(out, stock) < 1e-5
    if kind == "wan-i2v":  # 2 calls (cond, uncond) x 2 layers of cross-attention: one line per cause
        lines = [r.getMessage() for r in psa_logs.records if r.name == LOGGER]
        assert sum("cross-attention" in m for m in lines) == 1
        assert sum("image-context" in m for m in lines) == 1


def test_signature_declares_every_stock_parameter():
    """CogVideoX's Attention.forward drops keyword arguments the processor does not declare."""
    ours = set(inspect.signature(PSAProcessor.__call__).parameters)
    for stock in (CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0, WanAttnProcessor):
        assert set(inspect.signature(stock.__call__).parameters) <= ours
    wan = list(inspect.signature(WanAttnProcessor.__call__).parameters)
    assert list(inspect.signature(PSAProcessor.__call__).parameters)[: len(wan)] == wan  # Wan passes positionally


def _cog_layer_inputs(seed=0, video=160, text=8):
    g = torch.Generator().manual_seed(seed)
    attn = tiny_cogvideox_transformer(num_layers=1).transformer_blocks[0].attn1
    hs = torch.randn(2, video, 32, generator=g)
    ehs = torch.randn(2, text, 32, generator=g)
    return attn, hs, ehs


def test_cogvideox_attention_mask_runs_stock_and_logs_once(psa_logs):
    attn, hs, ehs = _cog_layer_inputs()
    mask = torch.rand(2, 1, hs.shape[1] + ehs.shape[1]) > 0.2
    mask[..., 0] = True
    bias = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    with torch.no_grad():
        attn.set_processor(CogVideoXAttnProcessor2_0())
        ref = attn(hs, ehs, attention_mask=bias)
        attn.set_processor(PSAProcessor(SPARSE))
        with psa_logs.at_level(logging.INFO, logger=LOGGER):
            outs = [attn(hs, ehs, attention_mask=bias) for _ in range(3)]
    for out in outs:
        assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert sum("attention mask" in r.getMessage() for r in psa_logs.records) == 1


def test_wan_attention_mask_runs_stock():
    attn = tiny_wan_transformer(num_layers=1).blocks[0].attn1
    hs = torch.randn(1, 200, 24, generator=torch.Generator().manual_seed(0))
    bias = torch.zeros(1, 1, 200, 200)
    bias[..., 150:] = float("-inf")
    with torch.no_grad():
        attn.set_processor(WanAttnProcessor())
        ref = attn(hs, None, bias, None)
        attn.set_processor(PSAProcessor(SPARSE))
        out = attn(hs, None, bias, None)
    assert torch.equal(out, ref)


def test_cogvideox_layer_full_budget_and_sparse():
    """At layer level: full budget equals stock; a sparse budget differs, stays finite, keeps the tuple."""
    attn, hs, ehs = _cog_layer_inputs(video=640, text=8)
    with torch.no_grad():
        attn.set_processor(CogVideoXAttnProcessor2_0())
        ref_video, ref_text = attn(hs, ehs)
        attn.set_processor(PSAProcessor(FULL))
        video, text = attn(hs, ehs)
        assert rel_err(video, ref_video) < 1e-5 and rel_err(text, ref_text) < 1e-5
        attn.set_processor(PSAProcessor(SPARSE))
        video, text = attn(hs, ehs)
    assert video.shape == ref_video.shape and text.shape == ref_text.shape
    assert torch.isfinite(video).all() and rel_err(video, ref_video) > 1e-3


def test_plain_gilbert_without_grid_runs_raster(psa_logs):
    """Without enable_psa there is no grid: a Gilbert budget runs in raster order, said once."""
    attn = tiny_wan_transformer(num_layers=1).blocks[0].attn1
    hs = torch.randn(1, 640, 24, generator=torch.Generator().manual_seed(0))
    gilbert = PSAProcessor(SPARSE.replace(token_order="gilbert"))
    raster = PSAProcessor(SPARSE)
    with torch.no_grad(), psa_logs.at_level(logging.INFO, logger=LOGGER):
        attn.set_processor(gilbert)
        out = [attn(hs, None, None, None) for _ in range(2)]
        attn.set_processor(raster)
        ref = attn(hs, None, None, None)
    assert torch.equal(out[0], ref) and torch.equal(out[1], ref)
    assert sum("no token grid" in r.getMessage() for r in psa_logs.records) == 1


def test_processor_takes_preset_or_name():
    preset = get_preset("wan2.1-1.3b")
    assert PSAProcessor("wan2.1-1.3b").config == preset.config
    assert PSAProcessor(preset).config == preset.config
    assert PSAProcessor().config == type(FULL)()
    with pytest.raises(TypeError):
        PSAProcessor(3)
    with pytest.raises(ValueError, match="backend"):
        PSAProcessor(backend="cuda")


@pytest.mark.parametrize("lq, lkv", [(1296, 1296), (1280, 1280), (1000, 777), (64, 31)])
def test_mask_density_matches_the_mask(lq, lkv):
    """The stats' density (from per-level counts) equals PyramidBlockMask.density, partial blocks included."""
    g = torch.Generator().manual_seed(lq + lkv)
    nq, nk = -(-lq // 64), -(-lkv // 32)
    level_map = random_level_map(2, 3, nq, nk, generator=g)
    mask = PyramidBlockMask.from_level_map(level_map, block_q=64, block_kv=32)
    assert mask.density_tensor(lq, lkv).item() == pytest.approx(mask.density(lq, lkv), rel=1e-12)


def test_plain_preset_runs_its_sparse_budget_from_the_first_call():
    """By hand the processor cannot see the step: a preset's dense steps do not apply, its config does."""
    from tests.tiny_models import tiny_preset

    attn = tiny_wan_transformer(num_layers=1).blocks[0].attn1
    hs = torch.randn(1, 640, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        attn.set_processor(WanAttnProcessor())
        stock = attn(hs, None, None, None)
        attn.set_processor(PSAProcessor(tiny_preset("wan", dense_steps=4)))
        preset_out = attn(hs, None, None, None)
        attn.set_processor(PSAProcessor(SPARSE))
        sparse_out = attn(hs, None, None, None)
    assert torch.equal(preset_out, sparse_out) and rel_err(preset_out, stock) > 1e-3
