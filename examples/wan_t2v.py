"""Text-to-video with Wan2.1 / Wan2.2 and pyramid sparse attention.

    python examples/wan_t2v.py --prompt "a red fox in the snow" --output fox.mp4         # Wan2.1 1.3B
    python examples/wan_t2v.py --model Wan-AI/Wan2.1-T2V-14B-Diffusers --height 720 --width 1280
    python examples/wan_t2v.py --model Wan-AI/Wan2.2-T2V-A14B-Diffusers                # two experts
    python examples/wan_t2v.py --dense --output fox_dense.mp4                           # without PSA

The preset is the one listing --model (wan2.1-1.3b, wan2.1-14b, wan2.2-a14b, wan2.2-5b) unless
--preset names another. In your own code:

    pipe = WanPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", torch_dtype=torch.bfloat16).to("cuda")
    handle = enable_psa(pipe, preset="wan2.1-1.3b")       # dense for 15 of 50 steps, then PSA
    video = pipe(prompt, num_inference_steps=50).frames[0]
"""

import argparse

from psa_diffusers.cli import add_generate_arguments, call_arguments, check_generate_arguments, resolve_preset
from psa_diffusers.diffusers import enable_psa
from psa_diffusers.diffusers.families import preset_for_model
from psa_diffusers.generation import generate
from psa_diffusers.loading import load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description="Wan text-to-video with PSA")
    add_generate_arguments(parser, model="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", preset=None)
    args = parser.parse_args()
    check_generate_arguments(parser, args)

    preset = resolve_preset(args.preset or preset_for_model(args.model, "wan"))
    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype, cpu_offload=args.cpu_offload)
    handle = None if args.dense else enable_psa(pipe, preset=preset)
    result = generate(
        pipe,
        args.prompt,
        handle=handle,
        seed=args.seed,
        output=args.output,
        **call_arguments(args, preset),
    )
    print(f"preset {preset.name}: {result.seconds_per_step:.3f} seconds per step")
    print(f"mean attention density: {result.mean_density:.3f}")
    print(f"wrote {result.output}")


if __name__ == "__main__":
    main()
