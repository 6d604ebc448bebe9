"""SD3 LoRA tensors in diffusers/PEFT naming (``transformer.transformer_blocks.N.attn.to_q.lora_A``).

diffusers cannot read kohya-named SD3 files, so this writes the same LoRA in its naming: the
fused qkv is split into to_q/to_k/to_v (add_q_proj/... for the context half), alpha/rank is
baked into lora_B (diffusers files carry no alpha), and the rows of the modulation layers that
diffusers stores as (scale, shift) instead of (shift, scale) are swapped.
"""
from __future__ import annotations

import re
from typing import Dict, List, Tuple

import torch

PREFIX = "transformer."
_QKV = {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
        "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v")}
_BLOCK = {"x_block.attn.proj": "attn.to_out.0", "context_block.attn.proj": "attn.to_add_out",
          "x_block.attn2.proj": "attn2.to_out.0", "x_block.mlp.fc1": "ff.net.0.proj",
          "x_block.mlp.fc2": "ff.net.2", "context_block.mlp.fc1": "ff_context.net.0.proj",
          "context_block.mlp.fc2": "ff_context.net.2", "x_block.adaLN_modulation.1": "norm1.linear",
          "context_block.adaLN_modulation.1": "norm1_context.linear"}
_BASIC = {"context_embedder": "context_embedder", "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
          "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
          "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
          "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2", "x_embedder.proj": "pos_embed.proj",
          "final_layer.adaLN_modulation.1": "norm_out.linear", "final_layer.linear": "proj_out"}


def _swap_halves(up: torch.Tensor) -> torch.Tensor:
    """(shift, scale) rows <-> (scale, shift) rows; its own inverse."""
    a, b = up.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def module_map(num_blocks: int) -> Dict[str, Tuple[List[str], bool]]:
    """Our module path -> (diffusers module paths, whether the output rows are swapped)."""
    out: Dict[str, Tuple[List[str], bool]] = {}
    for i in range(num_blocks):
        for ours, theirs in _QKV.items():
            out[f"joint_blocks.{i}.{ours}"] = ([f"transformer_blocks.{i}.{t}" for t in theirs], False)
        for ours, theirs in _BLOCK.items():
            # diffusers' last block keeps only (scale, shift) of a "pre-only" context half.
            swap = ours == "context_block.adaLN_modulation.1" and i == num_blocks - 1
            out[f"joint_blocks.{i}.{ours}"] = ([f"transformer_blocks.{i}.{theirs}"], swap)
    for ours, theirs in _BASIC.items():
        out[ours] = ([theirs], ours == "final_layer.adaLN_modulation.1")
    return out


def _modules(kohya: Dict[str, torch.Tensor]) -> List[str]:
    return sorted({k[:-len(".lora_down.weight")] for k in kohya if k.endswith(".lora_down.weight")})


def _num_blocks(names) -> int:
    found = [int(m.group(1)) for n in names if (m := re.search(r"(?:joint|transformer)_blocks[._](\d+)[._]", n))]
    return max(found) + 1 if found else 0


def kohya_to_diffusers(kohya: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A kohya-layout SD3 LoRA (``lora_unet_*``) in diffusers/PEFT naming, same effect exactly."""
    names = _modules(kohya)
    by_kohya = {"lora_unet_" + ours.replace(".", "_"): (ours, theirs) for ours, theirs in
                module_map(_num_blocks(names)).items()}
    out: Dict[str, torch.Tensor] = {}
    for name in names:
        if name not in by_kohya:
            raise ValueError(f"cannot export {name} to diffusers naming: no diffusers module for it")
        _, (targets, swap) = by_kohya[name]
        down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
        alpha = float(kohya.get(f"{name}.alpha", torch.tensor(float(down.shape[0]))))
        up = up.float() * (alpha / down.shape[0])  # bake the scale: diffusers files have no alpha
        if swap:
            up = _swap_halves(up)
        for target, part in zip(targets, up.chunk(len(targets), dim=0)):
            out[f"{PREFIX}{target}.lora_A.weight"] = down.float().clone()  # own storage: safetensors refuses shared tensors
            out[f"{PREFIX}{target}.lora_B.weight"] = part.contiguous()
    return out


def diffusers_to_kohya(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The inverse of :func:`kohya_to_diffusers` (alpha = rank, since lora_B carries the scale).

    q/k/v that share one lora_A (as this pack exports them) become one fused module of the same
    rank; independent q/k/v become a fused module of three times the rank (block-diagonal up),
    which a network trained with ``split_qkv`` loads exactly.
    """
    strip = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in tensors.items()}
    blocks = _num_blocks(strip)
    out: Dict[str, torch.Tensor] = {}
    for ours, (targets, swap) in module_map(blocks).items():
        keys = [f"{t}.lora_A.weight" for t in targets]
        if not all(k in strip for k in keys):
            continue
        downs = [strip[k].float() for k in keys]
        ups = [strip[f"{t}.lora_B.weight"].float() for t in targets]
        if all(torch.equal(d, downs[0]) for d in downs):
            down, up = downs[0], torch.cat(ups, dim=0)
        else:
            down, up = torch.cat(downs, dim=0), torch.block_diag(*ups)
        if swap:
            up = _swap_halves(up)
        name = "lora_unet_" + ours.replace(".", "_")
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    if not out:
        raise ValueError("no SD3 transformer LoRA weights found in the diffusers-named file")
    return out
