"""Question answering over a long video with Qwen2.5-VL and causal PSA in the language model's prefill.

    python examples/qwen2_5_vl_video_qa.py --video talk.mp4 --question "What is the talk about?"
    python examples/qwen2_5_vl_video_qa.py --video talk.mp4 --dense          # without PSA
    python examples/qwen2_5_vl_video_qa.py --tiny                            # a tiny random model, offline

PSA runs where it pays: in the language model's prefill over at least ``min_seq_len`` tokens (the
preset's 8192); decode steps, short prompts, padded batches and the vision encoder run SDPA. In your
own code:

    register_psa_attention()
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_id, attn_implementation="psa")
    configure(model, preset="qwen2.5-vl")
"""

from __future__ import annotations

import argparse
import time

import torch

from psa_diffusers.transformers import configure, register_psa_attention


def load_frames(path: str, max_frames: int):
    """Up to ``max_frames`` frames of the video at ``path``, evenly spaced: a ``[T, H, W, 3]`` uint8 array."""
    import imageio.v3 as iio
    import numpy as np

    frames = iio.imread(path, plugin="pyav") if path.endswith(".mp4") else iio.imread(path)
    step = max(1, -(-len(frames) // max_frames))
    frames = frames[::step][: max_frames - max_frames % 2]  # an even count: 2 frames per temporal patch
    return np.ascontiguousarray(frames)


def real_inputs(args, model_id: str):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_id)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": args.question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    frames = load_frames(args.video, args.max_frames)
    inputs = processor(text=[text], videos=[frames], return_tensors="pt")
    return processor, inputs


def main() -> None:
    parser = argparse.ArgumentParser(description="Qwen2.5-VL video QA with causal PSA")
    parser.add_argument("--model", default="Qwen/Qwen2.5-VL-7B-Instruct")
    parser.add_argument("--video", help="a video file (mp4, gif, ...)")
    parser.add_argument("--question", default="Describe what happens in this video.")
    parser.add_argument("--max-frames", type=int, default=768)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--preset", default="qwen2.5-vl")
    parser.add_argument("--dense", action="store_true", help="run stock SDPA attention")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model and video, built offline")
    args = parser.parse_args()
    if not args.tiny and not args.video:
        parser.error("--video is required (or --tiny)")

    register_psa_attention()
    attn = "sdpa" if args.dense else "psa"
    if args.tiny:
        from psa_diffusers.transformers import CausalPSASettings
        from psa_diffusers.transformers.tiny import tiny_qwen2_5_vl, tiny_video_inputs

        model, processor, inputs = tiny_qwen2_5_vl(attn), None, tiny_video_inputs((4, 16, 16))
        settings = CausalPSASettings(min_seq_len=256, recent_tokens=128, dense_tail_tokens=16, backend="reference")
    else:
        from transformers import Qwen2_5_VLForConditionalGeneration

        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            args.model, torch_dtype=torch.bfloat16, attn_implementation=attn, device_map="cuda"
        ).eval()
        processor, inputs = real_inputs(args, args.model)
        inputs = inputs.to(model.device)
        settings = None
    if not args.dense:
        settings = configure(model, settings, preset=None if settings else args.preset)
    prompt_len = inputs["input_ids"].shape[1]
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    new = out[:, prompt_len:]
    answer = processor.batch_decode(new, skip_special_tokens=True)[0] if processor else new[0].tolist()
    print(f"{prompt_len} prompt tokens, {attn} attention, {seconds:.1f} s")
    print(f"answer: {answer}")


if __name__ == "__main__":
    main()
