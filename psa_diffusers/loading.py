"""Load a CogVideoX or Wan text-to-video pipeline from a hub id or local directory: ``load_pipeline``.

    pipe = load_pipeline("THUDM/CogVideoX-5b")                     # bf16 on CUDA, fp32 on CPU
    pipe = load_pipeline("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", cpu_offload=True)

The family (from ``model_index.json``) is checked before any weights are read.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .diffusers.families import check_model_source, family_of_model


def load_pipeline(
    model: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    cpu_offload: bool = False,
):
    """A CogVideoX or Wan text-to-video pipeline from a hub id or local directory.

    device: default CUDA where available, else CPU; dtype: default bfloat16 on CUDA, float32 on CPU
    (Wan's VAE stays float32, as its model card advises). ``cpu_offload`` keeps each model on the
    CPU until it runs (``enable_model_cpu_offload``), for GPUs with less memory.
    Raises FileNotFoundError, OSError or ValueError (``family_of_model``) before loading any weights
    when ``model`` is missing, unreadable or neither CogVideoX nor Wan.
    """
    source = check_model_source(model)
    from diffusers import AutoencoderKLWan, DiffusionPipeline

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    family = family_of_model(source)
    extra: dict[str, Any] = {}
    if family == "wan":
        extra["vae"] = AutoencoderKLWan.from_pretrained(source, subfolder="vae", dtype=torch.float32)
    pipe = DiffusionPipeline.from_pretrained(source, dtype=dtype, **extra)
    if family == "cogvideox":
        pipe.vae.enable_tiling()  # decoding 49 frames at 720x480 otherwise needs tens of GiB
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe
