"""CogVideoX-5B in 4 steps: the PSA-distilled LoRA (GYP666/BLADE), trailing DPM scheduler, guidance 1.0.

    python examples/cogvideox_4step_lora.py --prompt "a red fox in the snow" --output fox.mp4
    python examples/cogvideox_4step_lora.py --lora ./pytorch_lora_weights.safetensors   # a local copy
    python examples/cogvideox_4step_lora.py --dense      # LoRA and scheduler, without PSA

In your own code:

    pipe = CogVideoXPipeline.from_pretrained("THUDM/CogVideoX-5b", torch_dtype=torch.bfloat16).to("cuda")
    lora = load_psa_lora(pipe)          # checks the file, loads it, swaps the scheduler, enables PSA
    video = pipe(prompt, **lora.call_kwargs).frames[0]     # num_inference_steps=4, guidance_scale=1.0
    lora.remove()                       # the pipeline as it was
"""

import argparse

from psa_diffusers.cli import add_generate_arguments, call_arguments, check_generate_arguments, resolve_preset
from psa_diffusers.diffusers.lora import DEFAULT_REPO, DEFAULT_WEIGHT_NAME, load_psa_lora
from psa_diffusers.generation import generate
from psa_diffusers.loading import load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description="CogVideoX-5B 4-step LoRA with PSA")
    add_generate_arguments(parser, model="THUDM/CogVideoX-5b", preset="cogvideox-5b-4step")
    parser.add_argument("--lora", default=DEFAULT_REPO, help="hub repo, local directory or .safetensors file")
    parser.add_argument("--lora-weight-name", default=DEFAULT_WEIGHT_NAME, help="the file inside --lora")
    args = parser.parse_args()
    check_generate_arguments(parser, args)

    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype, cpu_offload=args.cpu_offload)
    lora = load_psa_lora(pipe, args.lora, args.lora_weight_name, preset=resolve_preset(args.preset))
    handle = lora.handle
    if args.dense:
        handle.disable()  # keep the LoRA and the scheduler, drop PSA
        handle = None
    result = generate(
        pipe,
        args.prompt,
        handle=handle,
        seed=args.seed,
        output=args.output,
        **{**lora.call_kwargs, **call_arguments(args)},  # 4 steps, guidance 1.0 unless overridden
    )
    print(f"seconds per step: {result.seconds_per_step:.3f}")
    print(f"mean attention density: {result.mean_density:.3f}")
    print(f"wrote {result.output}")


if __name__ == "__main__":
    main()
