"""Tiny random CogVideoX and Wan transformers and pipelines, built in code (offline, seconds on a CPU).

For tests, the LoRA helper and the offline demo. The weights are random (seeded), the tokenizer is a
small in-memory Unigram vocabulary, and nothing touches the Hugging Face hub. The default video of
``TINY_HEIGHT x TINY_WIDTH`` pixels and ``TINY_NUM_FRAMES`` frames gives a latent token grid of
``TINY_GRID`` = 5 x 16 x 16 = 1,280 video tokens after patching, enough for 20 query blocks of 64
and 40 key blocks of 32, so block sparsity is real. Call a pipeline with ``tiny_call_kwargs()``.

Sizes: CogVideoX has 2 heads of 16 (its 3D RoPE splits 16 into 4/6/6), Wan 2 heads of 12
(RoPE 4/4/4); both have 2 layers. The VAEs downsample space by 4 (not 8) to keep the image-to-video
encode fast. ``output_type="latent"`` skips the VAE decode.
"""

from __future__ import annotations

from typing import Any

import torch

TINY_HEIGHT = 128
TINY_WIDTH = 128
TINY_NUM_FRAMES = 17
TINY_GRID = (5, 16, 16)
"""Latent token grid ``(T, H, W)`` of a ``tiny_call_kwargs()`` video: 17 frames -> 5 latent frames
(VAE time factor 4), 128 px -> 32 latent pixels (tiny VAEs have a space factor of 4) -> 16 patches of 2."""
TINY_TEXT_LEN = 16
"""Text tokens per prompt (``max_sequence_length``)."""

_VAE_SPACE = 4
_WORDS = ("dance", "cat", "dog", "red", "blue", "sky", "sea", "city", "night", "walk", "run", "tree", "car", "rain")


def tiny_tokenizer():
    """A T5 Unigram tokenizer over a few words, from an in-memory vocabulary (transformers 5)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(f"\u2581{w}", -1.0) for w in _WORDS]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_text_encoder(*, umt5: bool = False, vocab_size: int | None = None, seed: int = 0):
    """A 2-layer T5 (CogVideoX) or UMT5 (Wan) encoder with ``d_model`` 32."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    vocab_size = vocab_size or len(tiny_tokenizer())
    kwargs = dict(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
    )
    torch.manual_seed(seed)
    if umt5:
        return UMT5EncoderModel(UMT5Config(**kwargs)).eval()
    return T5EncoderModel(T5Config(**kwargs)).eval()


# ------------------------------------------------------------------ CogVideoX


def tiny_cogvideox_transformer(
    *, rotary: bool = True, patch_size_t: int | None = None, num_layers: int = 2, seed: int = 0
):
    """A random ``CogVideoXTransformer3DModel``: rotary like 5b/1.5 (``rotary=True``) or sincos like 2b.

    ``patch_size_t=2`` gives a CogVideoX1.5-style temporal patch.
    """
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=32,
        num_layers=num_layers,
        sample_width=TINY_WIDTH // _VAE_SPACE,
        sample_height=TINY_HEIGHT // _VAE_SPACE,
        sample_frames=TINY_NUM_FRAMES,
        patch_size=2,
        patch_size_t=patch_size_t,
        max_text_seq_length=TINY_TEXT_LEN,
        use_rotary_positional_embeddings=rotary,
    )
    return model.eval()


def tiny_cogvideox_vae(seed: int = 0):
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(seed)
    return AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3,
    ).eval()


def tiny_cogvideox_pipeline(*, rotary: bool = True, seed: int = 0):
    """A ``CogVideoXPipeline`` of tiny random parts (DDIM scheduler, as CogVideoX-2b/5b ship)."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

    tokenizer = tiny_tokenizer()
    pipe = CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=tiny_text_encoder(vocab_size=len(tokenizer), seed=seed),
        vae=tiny_cogvideox_vae(seed),
        transformer=tiny_cogvideox_transformer(rotary=rotary, seed=seed),
        scheduler=CogVideoXDDIMScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------ Wan


def tiny_wan_config(*, in_channels: int = 16, num_layers: int = 2, num_heads: int = 2) -> dict:
    """The ``WanTransformer3DModel`` arguments of the tiny Wan: patch 1x2x2, ``num_heads`` heads of 12 dims."""
    return dict(
        patch_size=(1, 2, 2),
        num_attention_heads=num_heads,
        attention_head_dim=12,
        in_channels=in_channels,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=32,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def tiny_wan_transformer(
    *, image_dim: int | None = None, in_channels: int = 16, num_layers: int = 2, num_heads: int = 2, seed: int = 0
):
    """A random ``WanTransformer3DModel`` of :func:`tiny_wan_config`; ``image_dim`` makes it a Wan2.1 I2V model.

    With ``image_dim`` set, the cross-attention layers get an image-context branch
    (``added_kv_proj_dim``) and the model expects ``encoder_hidden_states_image``.
    """
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        **tiny_wan_config(in_channels=in_channels, num_layers=num_layers, num_heads=num_heads),
        image_dim=image_dim,
        added_kv_proj_dim=None if image_dim is None else 24,
    )
    return model.eval()


def tiny_wan_vae(seed: int = 0):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[True, True],
        scale_factor_spatial=_VAE_SPACE,
    ).eval()


def _wan_common(seed: int) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    tokenizer = tiny_tokenizer()
    return dict(
        tokenizer=tokenizer,
        text_encoder=tiny_text_encoder(umt5=True, vocab_size=len(tokenizer), seed=seed),
        vae=tiny_wan_vae(seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def tiny_wan_pipeline(*, two_experts: bool = False, seed: int = 0):
    """A text-to-video ``WanPipeline``; ``two_experts=True`` gives a Wan2.2-A14B-style pair
    (``transformer`` for the high-noise half, ``transformer_2`` for the rest, ``boundary_ratio`` 0.5)."""
    from diffusers import WanPipeline

    parts = _wan_common(seed)
    if two_experts:
        parts.update(
            transformer=tiny_wan_transformer(seed=seed),
            transformer_2=tiny_wan_transformer(seed=seed + 1),
            boundary_ratio=0.5,
        )
    else:
        parts.update(transformer=tiny_wan_transformer(seed=seed))
    pipe = WanPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_wan_i2v_pipeline(*, seed: int = 0):
    """A Wan2.1-style ``WanImageToVideoPipeline``: CLIP image encoder (17 tokens), transformer with
    ``added_kv_proj_dim`` and 36 input channels (noise + first-frame condition + mask)."""
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    try:  # transformers 5 without torchvision: the PIL processor, without its fallback warning
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:  # pragma: no cover - older transformers
        from transformers import CLIPImageProcessor

    torch.manual_seed(seed)
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=8,
            projection_dim=8,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            intermediate_size=16,
            patch_size=8,
        )
    ).eval()
    image_processor = CLIPImageProcessor(crop_size=32, size=32)
    pipe = WanImageToVideoPipeline(
        **_wan_common(seed),
        image_encoder=image_encoder,
        image_processor=image_processor,
        transformer=tiny_wan_transformer(image_dim=8, in_channels=36, seed=seed),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_image(seed: int = 0):
    """A random ``TINY_WIDTH x TINY_HEIGHT`` RGB ``PIL.Image`` for image-to-video."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (TINY_HEIGHT, TINY_WIDTH, 3), dtype=np.uint8))


WAN_I2V_TEXT_LEN = 512
"""Text length for Wan image-to-video: diffusers' ``WanAttnProcessor`` takes the image context to be
everything before the last 512 context tokens, so shorter prompts would be split wrongly."""


def tiny_i2v_call_kwargs(*, num_inference_steps: int = 4, guidance_scale: float = 6.0, seed: int = 0, **extra) -> dict:
    """Keyword arguments for ``tiny_wan_i2v_pipeline()``: a random image and random prompt embeddings of
    ``WAN_I2V_TEXT_LEN`` tokens (the I2V pipeline's prompt cleaning needs ``ftfy``; embeddings skip it)."""
    g = torch.Generator().manual_seed(seed + 1)
    kwargs = tiny_call_kwargs(
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed, image=tiny_image(seed)
    )
    del kwargs["prompt"], kwargs["negative_prompt"], kwargs["max_sequence_length"]
    kwargs["prompt_embeds"] = torch.randn(1, WAN_I2V_TEXT_LEN, 32, generator=g)
    kwargs["negative_prompt_embeds"] = torch.randn(1, WAN_I2V_TEXT_LEN, 32, generator=g)
    kwargs.update(extra)
    return kwargs


def tiny_call_kwargs(*, num_inference_steps: int = 4, guidance_scale: float = 6.0, seed: int = 0, **extra) -> dict:
    """Keyword arguments for a tiny pipeline call giving the ``TINY_GRID`` latent grid (latent output)."""
    kwargs = dict(
        prompt="a cat walks in the rain",
        negative_prompt="blue sky",
        height=TINY_HEIGHT,
        width=TINY_WIDTH,
        num_frames=TINY_NUM_FRAMES,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        max_sequence_length=TINY_TEXT_LEN,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
    )
    kwargs.update(extra)
    return kwargs
