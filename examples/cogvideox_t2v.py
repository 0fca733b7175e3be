"""Text-to-video with CogVideoX and pyramid sparse attention.

    python examples/cogvideox_t2v.py --prompt "a red fox in the snow" --output fox.mp4
    python examples/cogvideox_t2v.py --dense --output fox_dense.mp4      # the same run without PSA
    python examples/cogvideox_t2v.py --model THUDM/CogVideoX1.5-5B      # preset cogvideox1.5-5b

In your own code, PSA is one line between loading and calling the pipeline:

    pipe = CogVideoXPipeline.from_pretrained("THUDM/CogVideoX-5b", torch_dtype=torch.bfloat16).to("cuda")
    handle = enable_psa(pipe, preset="cogvideox-5b")      # dense for 15 of 50 steps, then PSA
    video = pipe(prompt, num_inference_steps=50).frames[0]
    print(handle.mean_density())
"""

import argparse

from psa_diffusers.cli import add_generate_arguments, call_arguments, check_generate_arguments, resolve_preset
from psa_diffusers.diffusers import enable_psa
from psa_diffusers.diffusers.families import preset_for_model
from psa_diffusers.generation import generate
from psa_diffusers.loading import load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description="CogVideoX text-to-video with PSA")
    add_generate_arguments(parser, model="THUDM/CogVideoX-5b", preset=None)
    args = parser.parse_args()
    check_generate_arguments(parser, args)

    preset = resolve_preset(args.preset or preset_for_model(args.model, "cogvideox"))
    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype, cpu_offload=args.cpu_offload)
    handle = None if args.dense else enable_psa(pipe, preset=preset)
    result = generate(
        pipe,
        args.prompt,
        handle=handle,
        seed=args.seed,
        output=args.output,
        **call_arguments(args, preset),  # the preset's 50 steps unless --steps
    )
    print(f"seconds per step: {result.seconds_per_step:.3f}")
    print(f"mean attention density: {result.mean_density:.3f}")
    print(f"wrote {result.output}")


if __name__ == "__main__":
    main()
