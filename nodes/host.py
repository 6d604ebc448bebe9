"""The one place that knows ComfyUI's MODEL / CLIP / VAE objects and turns them into trainer inputs."""
from __future__ import annotations

import logging
from typing import List, Tuple

import torch

import comfy.model_base
import comfy.model_management
import comfy.sd

from ..trainer.data import ImageCaption
from ..trainer.batches import EncodedData

log = logging.getLogger(__name__)


def require_sd3(model) -> torch.nn.Module:
    """The MMDiT of an SD3-family MODEL, or a ValueError that says what was passed instead."""
    inner = getattr(model, "model", None)
    mmdit = getattr(inner, "diffusion_model", None)
    if not isinstance(inner, comfy.model_base.SD3) or not hasattr(mmdit, "joint_blocks"):
        kind = type(inner).__name__ if inner is not None else type(model).__name__
        raise ValueError(
            f"this node trains SD3 / SD3.5 (MMDiT) models, but the MODEL input is a {kind} model. "
            f"Load an SD3 Medium, SD3.5 Medium or SD3.5 Large checkpoint with 'Load Checkpoint' "
            f"(or 'Load Diffusion Model' + 'TripleCLIPLoader' + 'Load VAE')")
    return mmdit


def check_resolution(mmdit: torch.nn.Module, resolution: int) -> None:
    """Refuse a resolution the model's position embedding cannot cover."""
    max_patches = getattr(mmdit, "pos_embed_max_size", None)
    patch = getattr(mmdit, "patch_size", 2)
    if max_patches is not None and resolution // 8 > max_patches * patch:
        raise ValueError(f"resolution {resolution} is larger than this model supports "
                         f"({max_patches * patch * 8} px); lower the dataset's resolution")


def compute_dtype(model) -> torch.dtype:
    """The dtype the host runs this model's matmuls in (its manual-cast dtype when it has one)."""
    return model.model.manual_cast_dtype or model.model.get_dtype()


def load_for_training(model) -> torch.nn.Module:
    """Load the model fully onto its device (other nodes may have offloaded it) and return the MMDiT."""
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    return model.model.diffusion_model


def _pad_tokens(conds: List[torch.Tensor]) -> List[torch.Tensor]:
    """Zero-pad text contexts to one length so they stack (only long captions differ)."""
    longest = max(c.shape[1] for c in conds)
    if any(c.shape[1] != longest for c in conds):
        log.warning("captions encode to different lengths; padding contexts to %d tokens", longest)
    return [torch.nn.functional.pad(c, (0, 0, 0, longest - c.shape[1])) for c in conds]


def encode_dataset(model, clip, vae, samples: List[ImageCaption]) -> EncodedData:
    """VAE latents (in the model's latent space) and CLIP/T5 outputs for every sample, computed once."""
    if clip is None:
        raise ValueError("the CLIP input is empty: this checkpoint has no text encoders. "
                         "Load them with 'TripleCLIPLoader' and connect its CLIP output")
    if vae is None:
        raise ValueError("the VAE input is empty: this checkpoint has no VAE. Load one with 'Load VAE'")
    latents, conds, pooled = [], [], []
    with torch.inference_mode(False), torch.no_grad():
        for s in samples:
            z = vae.encode(s.image[None].clone())
            latents.append(model.model.latent_format.process_in(z.float()).clone())
            cond, pool = clip.encode_from_tokens(clip.tokenize(s.caption), return_pooled=True)
            conds.append(cond.float().clone())
            pooled.append(pool.float().clone())
    device = model.load_device
    return EncodedData(latents=torch.cat(latents).to(device), context=torch.cat(_pad_tokens(conds)).to(device),
                       pooled=torch.cat(pooled).to(device))


def encode_captions(clip, captions: List[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Text-encoder outputs (context [B, L, D], pooled [B, P]) for captions encoded per step."""
    conds, pooled = [], []
    with torch.no_grad():  # the text encoders are frozen
        for caption in captions:
            cond, pool = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True)
            conds.append(cond.float().clone())
            pooled.append(pool.float().clone())
    return torch.cat(_pad_tokens(conds)), torch.cat(pooled)


def model_with_lora(model, kohya_tensors) -> Tuple[object, int]:
    """A clone of ``model`` with the LoRA attached as weight patches, through the host's own loader;
    the input model is left untouched. Returns (model, number of patched weights)."""
    patched, _ = comfy.sd.load_lora_for_models(model, None, kohya_tensors, 1.0, 0.0)
    return patched, len(patched.patches)
