"""A tiny SD3-shaped MMDiT built from the host's own class, with seeded weights, for trainer tests."""
import torch

import comfy.ops
from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT


def tiny_mmdit(depth: int = 2, qk_norm: bool = False, attn2_layers=(), seed: int = 0,
               context_dim: int = 64, adm: int = 32) -> torch.nn.Module:
    """Host MMDiT, hidden 64·depth, every tensor initialised (the host's ops skip init)."""
    model = MMDiT(
        input_size=None, patch_size=2, in_channels=16, out_channels=16, depth=depth,
        adm_in_channels=adm, pos_embed_max_size=16, num_patches=256,
        context_embedder_config={"target": "torch.nn.Linear",
                                 "params": {"in_features": context_dim, "out_features": 64 * depth}},
        qk_norm="rms" if qk_norm else None, x_block_self_attn=bool(attn2_layers),
        x_block_self_attn_layers=list(attn2_layers), dtype=torch.float32, device="cpu",
        operations=comfy.ops.disable_weight_init)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("ln_" in name or "norm" in name) and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for name, b in model.named_buffers():  # pos_embed is a buffer, left as empty memory too
            b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    return model.requires_grad_(False)
