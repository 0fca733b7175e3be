"""Fine-tune a LoRA on a Wan transformer with pyramid sparse attention in the loop (flow matching, accelerate).

    python examples/train_lora_psa.py --output_dir lora-psa                     # tiny random Wan, CPU, minutes
    python examples/train_lora_psa.py --output_dir lora-psa --mixed_precision bf16 --tiny_head_dim 36  # GPU, kernels
    accelerate launch examples/train_lora_psa.py --mixed_precision bf16 \\
        --pretrained Wan-AI/Wan2.1-T2V-1.3B-Diffusers --data latents.pt --output_dir lora-psa   # GPU, the kernels

Follows the conventions of diffusers' LoRA training scripts: peft ``LoraConfig`` added to the frozen
transformer (``add_adapter``), the LoRA parameters kept in float32 (``cast_training_params``) while the
base weights run in ``--mixed_precision``, flow-matching targets (``noise - latents``) at sigmas drawn by
``compute_density_for_timestep_sampling``, weighted by ``compute_loss_weighting_for_sd3``, gradient
checkpointing, and the LoRA saved by ``WanPipeline.save_lora_weights`` -- a file that
``psa_diffusers.load_psa_lora(pipe, path, preset="wan2.1-1.3b")`` loads.

PSA runs at every training step (``enable_psa(transformer, config=...)``): masks are built without
gradient, gradients flow through the sparse attention (Triton on CUDA with bf16/fp16, the PyTorch
reference elsewhere). Data: ``--data`` names a ``torch.save``d dict with ``latents`` ``[N, C, T, H, W]``
(VAE latents, already scaled) and ``prompt_embeds`` ``[N, L, text_dim]``; without it, a few smooth
synthetic latent videos with random prompt embeddings (enough to watch the loss fall). The fixed
evaluation batch (same latents, noise and sigmas each time) gives the loss curve, written to
``<output_dir>/losses.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import WanPipeline, WanTransformer3DModel
from diffusers.training_utils import (
    cast_training_params,
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from psa_diffusers import PSAConfig
from psa_diffusers.diffusers import enable_psa
from psa_diffusers.diffusers.tiny import TINY_GRID, TINY_TEXT_LEN, tiny_wan_transformer

logger = logging.getLogger("train_lora_psa")

WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="LoRA fine-tuning of a Wan transformer with PSA")
    p.add_argument("--pretrained", default=None, help="a Wan diffusers pipeline (repo or folder); default: tiny random")
    p.add_argument("--data", default=None, help="torch.save'd {'latents', 'prompt_embeds'}; default: synthetic")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lora_alpha", type=int, default=8)
    p.add_argument("--learning_rate", type=float, default=5e-3)
    p.add_argument("--max_train_steps", type=int, default=40)
    p.add_argument("--train_batch_size", type=int, default=2)
    p.add_argument("--eval_every", type=int, default=5)
    p.add_argument(
        "--weighting_scheme", default="none", choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"]
    )
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--block_q", type=int, default=64)
    p.add_argument("--block_kv", type=int, default=32)
    p.add_argument("--budgets", default="0.2,0.1,0.1,0.2", help="quota shares at levels 1, 2, 4, 8")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "triton"])
    p.add_argument("--latent_grid", default=",".join(map(str, TINY_GRID)),
                   help="synthetic data: latent token grid T,H,W (after the 1x2x2 patching)")  # fmt: skip
    p.add_argument("--samples", type=int, default=4, help="synthetic data: number of latent videos")
    p.add_argument("--tiny_head_dim", type=int, default=12, help="head dim of the tiny model (multiple of 6)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.max_train_steps < 1 or args.train_batch_size < 1 or args.eval_every < 1:
        p.error("--max_train_steps, --train_batch_size and --eval_every must be positive")
    return args


def synthetic_data(channels: int, text_dim: int, grid=TINY_GRID, n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` smooth latent videos ``[n, C, T, 2H, 2W]`` (drifting sinusoids) whose 1x2x2 patches make the token
    ``grid`` ``(T, H, W)``, and random prompt embeddings ``[n, TINY_TEXT_LEN, text_dim]``."""
    g = torch.Generator().manual_seed(seed)
    frames, height, width = grid[0], 2 * grid[1], 2 * grid[2]
    t, y, x = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    freq = torch.rand(n, channels, 3, generator=g) * 0.4 + 0.05
    phase = torch.rand(n, channels, 1, 1, 1, generator=g) * 2 * math.pi
    arg = freq[..., 0, None, None, None] * y + freq[..., 1, None, None, None] * x + freq[..., 2, None, None, None] * t
    return {"latents": torch.sin(arg + phase), "prompt_embeds": torch.randn(n, TINY_TEXT_LEN, text_dim, generator=g)}


def flow_matching_loss(transformer, latents, prompt_embeds, noise, sigmas, weighting_scheme: str) -> torch.Tensor:
    """Rectified-flow loss: ``x_t = (1 - sigma) x_0 + sigma noise``, target ``noise - x_0``, timestep ``1000 sigma``."""
    s = sigmas.view(-1, 1, 1, 1, 1)
    noisy = (1.0 - s) * latents + s * noise
    pred = transformer(
        hidden_states=noisy.to(transformer.dtype),
        timestep=sigmas * 1000.0,
        encoder_hidden_states=prompt_embeds.to(transformer.dtype),
        return_dict=False,
    )[0]
    weight = compute_loss_weighting_for_sd3(weighting_scheme, sigmas=s)
    return (weight * (pred.float() - (noise - latents).float()) ** 2).mean()


def train(args: argparse.Namespace) -> dict:
    """Run the training; returns ``{"train": [(step, loss)], "eval": [(step, loss)], "lora_file": path}``."""
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    set_seed(args.seed)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    if args.pretrained:
        transformer = WanTransformer3DModel.from_pretrained(args.pretrained, subfolder="transformer")
    elif args.tiny_head_dim != 12:  # the tiny Wan's heads are 12 wide; the Triton kernels need 16 or more
        tiny = tiny_wan_transformer(seed=args.seed)
        transformer = WanTransformer3DModel.from_config({**tiny.config, "attention_head_dim": args.tiny_head_dim})
    else:
        transformer = tiny_wan_transformer(seed=args.seed)
    transformer.requires_grad_(False)
    transformer.to(accelerator.device)
    if weight_dtype != torch.float32:
        transformer.to(dtype=weight_dtype)
    lora_config = LoraConfig(
        r=args.rank,
        lora_alpha=args.lora_alpha,
        init_lora_weights=True,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
    )
    transformer.add_adapter(lora_config)
    if args.mixed_precision != "no":
        cast_training_params(transformer, dtype=torch.float32)  # trainable LoRA weights stay in float32
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    budgets = tuple(float(b) for b in args.budgets.split(","))
    config = PSAConfig(block_q=args.block_q, block_kv=args.block_kv, budgets=budgets)
    handle = enable_psa(transformer, config=config, backend=args.backend)  # sparse at every step

    if args.data:
        data = torch.load(args.data, map_location="cpu")
    else:
        grid = tuple(int(x) for x in args.latent_grid.split(","))
        data = synthetic_data(
            transformer.config.in_channels, transformer.config.text_dim, grid, args.samples, args.seed
        )
    latents_all, embeds_all = data["latents"].float(), data["prompt_embeds"].float()
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0)
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    device = accelerator.device

    g = torch.Generator().manual_seed(args.seed + 1)  # the fixed evaluation batch: all samples, fixed noise and sigmas
    eval_batch = (latents_all, embeds_all, torch.randn(latents_all.shape, generator=g),
                  torch.linspace(0.2, 0.8, len(latents_all)))  # fmt: skip

    def evaluate() -> float:
        transformer.eval()
        with torch.no_grad(), accelerator.autocast():
            tensors = [t.to(device) for t in eval_batch]
            loss = flow_matching_loss(accelerator.unwrap_model(transformer), *tensors, "none").item()
        transformer.train()
        return loss

    history = {"train": [], "eval": [(0, evaluate())]}
    logger.info("step 0: eval loss %.5f", history["eval"][0][1])
    transformer.train()
    for step in range(1, args.max_train_steps + 1):
        idx = torch.randint(0, len(latents_all), (args.train_batch_size,), generator=g)
        latents, embeds = latents_all[idx].to(device), embeds_all[idx].to(device)
        noise = torch.randn(latents.shape, generator=g).to(device)
        u = compute_density_for_timestep_sampling(
            weighting_scheme=args.weighting_scheme, batch_size=args.train_batch_size, logit_mean=0.0, logit_std=1.0,
            mode_scale=1.29, generator=g,
        )  # fmt: skip
        sigmas = u.clamp(1e-3, 1.0).to(device)
        with accelerator.accumulate(transformer), accelerator.autocast():
            loss = flow_matching_loss(transformer, latents, embeds, noise, sigmas, args.weighting_scheme)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        history["train"].append((step, loss.item()))
        if step % args.eval_every == 0 or step == args.max_train_steps:
            history["eval"].append((step, evaluate()))
            logger.info("step %d: train loss %.5f, eval loss %.5f", step, loss.item(), history["eval"][-1][1])

    history["mean_density"] = handle.mean_density()
    handle.disable()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = accelerator.unwrap_model(transformer)
    layers = {k: v.detach().to("cpu", torch.float32) for k, v in get_peft_model_state_dict(model).items()}
    WanPipeline.save_lora_weights(out, transformer_lora_layers=layers, weight_name=WEIGHT_NAME)
    history["lora_file"] = str(out / WEIGHT_NAME)
    (out / "losses.json").write_text(json.dumps(history, indent=1))
    return history


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args()
    history = train(args)
    for step, loss in history["eval"]:
        print(f"step {step:4d}  eval loss {loss:.5f}")
    print(f"mean attention density: {history['mean_density']:.3f}")
    print(f"wrote {history['lora_file']}")


if __name__ == "__main__":
    main()
