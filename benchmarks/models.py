"""SD3-shaped random-weight models built through the host's own MMDiT class, and the peers' equivalents.

Shapes follow the real checkpoints: hidden = 64·depth, heads = depth, context 4096 wide (CLIP
padded + T5), pooled 2048 (CLIP-L + CLIP-G). ``depth`` 24 with qk_norm and attn2 in blocks 0-12
is SD3.5 Medium; 38 with qk_norm is SD3.5 Large; no qk_norm is SD3 Medium.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch


@dataclass(frozen=True)
class Shape:
    """An MMDiT family member. pos_max: side of the position-embedding grid (in patches)."""

    depth: int = 12
    qk_norm: bool = False
    attn2_layers: Tuple[int, ...] = ()
    pos_max: int = 32

    @classmethod
    def sd35_medium(cls, pos_max: int = 32) -> "Shape":
        return cls(depth=24, qk_norm=True, attn2_layers=tuple(range(13)), pos_max=pos_max)

    @classmethod
    def sd35_large(cls, pos_max: int = 64) -> "Shape":
        return cls(depth=38, qk_norm=True, pos_max=pos_max)


def host_mmdit(shape: Shape, dtype=torch.float32, device="cpu", seed: int = 0, std: float = 0.02,
               manual_cast: bool = False):
    """The host's MMDiT with every tensor filled (the host's ops skip init; empty memory would be garbage).

    Weights are filled one tensor at a time, so building never needs a second copy of the model.
    ``manual_cast``: the host's per-call casting ops (what it uses for float8 weights).
    """
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    model = MMDiT(
        input_size=None, patch_size=2, in_channels=16, out_channels=16, depth=shape.depth,
        adm_in_channels=2048, pos_embed_max_size=shape.pos_max, num_patches=shape.pos_max ** 2,
        context_embedder_config={"target": "torch.nn.Linear",
                                 "params": {"in_features": 4096, "out_features": 64 * shape.depth}},
        qk_norm="rms" if shape.qk_norm else None, x_block_self_attn=bool(shape.attn2_layers),
        x_block_self_attn_layers=list(shape.attn2_layers), dtype=dtype, device=device,
        operations=comfy.ops.manual_cast if manual_cast else comfy.ops.disable_weight_init)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.dim() == 1 and ("ln_" in name or "norm" in name) and name.endswith("weight"):
                t.fill_(1.0)
            else:
                t.copy_(torch.randn(t.shape, generator=g, device=device, dtype=torch.float32).to(dtype) * std)
    return model.requires_grad_(False)


def host_model_patcher(state_dict, dtype=torch.float32):
    """A ComfyUI ModelPatcher (model_base.SD3) loaded from an MMDiT state dict the way
    'Load Diffusion Model' does it (``comfy.sd.load_diffusion_model_state_dict``)."""
    import comfy.sd

    mp = comfy.sd.load_diffusion_model_state_dict(dict(state_dict), model_options={"dtype": dtype})
    if mp is None:
        raise RuntimeError("the host did not detect the generated state dict as an SD3 model")
    return mp


def diffusers_sd3(shape: Shape, latent_size: int, seed: int = 0):
    """diffusers' SD3Transformer2DModel with the same dimensions (its own random init)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=latent_size, patch_size=2, in_channels=16, num_layers=shape.depth,
        attention_head_dim=64, num_attention_heads=shape.depth, joint_attention_dim=4096,
        caption_projection_dim=64 * shape.depth, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=shape.pos_max, qk_norm="rms_norm" if shape.qk_norm else None,
        dual_attention_layers=tuple(shape.attn2_layers))
    return model.requires_grad_(False)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def to_fp8_base(mmdit) -> None:
    """Store the joint blocks' Linear weights in float8_e4m3fn, as the host's 'Load Diffusion Model'
    with weight_dtype fp8_e4m3fn does (build the model with ``manual_cast=True`` so each layer
    upcasts per call)."""
    for name, m in mmdit.named_modules():
        if name.startswith("joint_blocks.") and isinstance(m, torch.nn.Linear):
            m.weight.data = m.weight.data.to(torch.float8_e4m3fn)
