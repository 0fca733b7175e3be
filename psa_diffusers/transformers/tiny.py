"""A tiny random Qwen2.5-VL built from its config (no download), and video-QA inputs for it.

For tests and ``examples/qwen2_5_vl_video_qa.py --tiny``: 2 decoder layers of 4 query heads over
2 KV heads (GQA), head dim 16, and a one-block vision encoder with patches of 14 pixels.
"""

from __future__ import annotations

import torch

VIDEO_TOKEN_ID = 251
VISION_START_ID = 252
VISION_END_ID = 253
MERGE = 2
"""Spatial merge of the vision encoder: each video token stands for ``MERGE x MERGE`` patches."""
PATCH_DIM = 3 * 2 * 14 * 14
"""Channels x temporal patch x patch x patch: one row of ``pixel_values_videos``."""


def tiny_qwen2_5_vl(attn_implementation: str = "sdpa", seed: int = 0):
    """A random ``Qwen2_5_VLForConditionalGeneration`` in eval mode, float32, on the CPU."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=8192, bos_token_id=0, eos_token_id=1, pad_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
            spatial_merge_size=MERGE, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[0],
        ),
        image_token_id=250, video_token_id=VIDEO_TOKEN_ID, vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def tiny_video_inputs(
    grid: tuple[int, int, int] = (4, 8, 8), prompt_len: int = 20, question_len: int = 12, seed: int = 0
) -> dict[str, torch.Tensor]:
    """``input_ids [1, L]``, ``attention_mask`` (ones), ``pixel_values_videos`` and ``video_grid_thw`` of
    a random video of ``grid`` = (frames / 2, height / 14, width / 14) patches between a random prompt
    and question: ``L = prompt_len + 2 + T*H*W / 4 + question_len``."""
    g = torch.Generator().manual_seed(seed)
    t, h, w = grid
    video_tokens = t * h * w // (MERGE * MERGE)
    ids = torch.cat([
        torch.randint(3, 240, (prompt_len,), generator=g), torch.tensor([VISION_START_ID]),
        torch.full((video_tokens,), VIDEO_TOKEN_ID), torch.tensor([VISION_END_ID]),
        torch.randint(3, 240, (question_len,), generator=g),
    ]).unsqueeze(0)  # fmt: skip
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values_videos": torch.randn(t * h * w, PATCH_DIM, generator=g),
        "video_grid_thw": torch.tensor([[t, h, w]]),
    }
