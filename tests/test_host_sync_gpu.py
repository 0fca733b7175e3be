"""No host synchronisation inside a transformer forward with PSA on, on the GPU (Triton path).

``torch.cuda.set_sync_debug_mode("error")`` makes every synchronising CUDA call (a device-to-host copy,
``.item()``, a stream synchronisation) raise. The forwards run under it at the sparse steps of a
preset schedule with Gilbert order, after the step hook has had its first (warm-up) forward.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the Triton path)"),
]


def test_a_psa_forward_makes_no_host_synchronisation():
    from diffusers import WanTransformer3DModel

    from psa_diffusers import PSAConfig, enable_psa

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        num_attention_heads=4, attention_head_dim=64, in_channels=16, out_channels=16, text_dim=32,
        ffn_dim=256, num_layers=2, rope_max_seq_len=64,
    ).to("cuda", torch.bfloat16)  # fmt: skip
    latents = torch.randn(1, 16, 8, 32, 32, device="cuda", dtype=torch.bfloat16)  # 8 x 16 x 16 = 2048 tokens
    args = dict(
        hidden_states=latents,
        timestep=torch.tensor([500], device="cuda"),
        encoder_hidden_states=torch.randn(1, 64, 32, device="cuda", dtype=torch.bfloat16),
        return_dict=False,
    )
    config = PSAConfig(block_q=64, block_kv=64, token_order="gilbert")
    with enable_psa(model, config=config) as handle, torch.inference_mode():
        for step in range(4):
            for call in ("cond", "uncond"):
                with model.cache_context(call, step_index=step, num_inference_steps=4):
                    if step < 2:
                        model(**args)
                        continue
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("error")
                    try:
                        model(**args)
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        stats = handle.stats()
    sparse = [s for step in stats.values() for s in step.values() if s.mask_density is not None]
    assert sparse, "no sparse call was recorded: the test did not exercise PSA"
