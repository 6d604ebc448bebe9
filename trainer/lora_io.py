"""Reading LoRA files to start from (``network_weights``): kohya names, or diffusers names converted."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import safetensors
import safetensors.torch
import torch


def _lora_keys(file: Path) -> List[str]:
    """The tensor names of a LoRA file, from its header only; ValueError naming a missing,
    unreadable or non-LoRA file."""
    if not file.is_file():
        raise ValueError(f"network_weights: file not found: {file}. Give the name of a .safetensors LoRA in "
                         f"ComfyUI's models/loras folder, or an absolute path")
    try:
        with safetensors.safe_open(str(file), "pt") as f:
            keys = list(f.keys())
    except Exception as e:  # safetensors raises several error types for a bad file
        raise ValueError(f"network_weights: cannot read {file} as safetensors ({e}); it is damaged or not a "
                         f"LoRA file: choose another file or leave network_weights empty") from e
    if not any(k.startswith("lora_unet_") or ".lora_A." in k for k in keys):
        raise ValueError(f"network_weights: {file} holds no SD3 LoRA weights (no lora_unet_* or lora_A keys)")
    return keys


def check_lora_file(path: str) -> None:
    """Cheap checks of a ``network_weights`` file, for queue time (the header only)."""
    _lora_keys(Path(path).expanduser())


def read_lora_tensors(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a LoRA file in kohya layout (``lora_unet_…``); a diffusers/PEFT-named SD3
    file (``transformer.transformer_blocks.N…lora_A``) is converted on the way in."""
    file = Path(path).expanduser()
    _lora_keys(file)
    try:
        tensors = safetensors.torch.load_file(str(file))
    except Exception as e:
        raise ValueError(f"network_weights: cannot read {file} as safetensors ({e})") from e
    if any(k.startswith("lora_unet_") for k in tensors):
        return tensors
    if any(".lora_A." in k for k in tensors):
        from .diffusers_format import diffusers_to_kohya

        return diffusers_to_kohya(tensors)
    raise ValueError(f"network_weights: {file} holds no SD3 LoRA weights (no lora_unet_* or lora_A keys)")
