"""LoRA files: sd-scripts (kohya) layout, ``ss_*`` and ``modelspec.*`` metadata, safetensors."""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Dict, Optional

import safetensors.torch
import torch
from torch import nn

from .atomic_files import staged
from .config import TrainConfig

# sd-scripts' ss_base_model_version -> SAI model-spec architecture of a LoRA for it.
ARCHITECTURES = {
    "medium": "stable-diffusion-3-medium/lora",
    "5-medium": "stable-diffusion-3-5-medium/lora",
    "5-large": "stable-diffusion-3-5-large/lora",
}
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}


def detect_variant(mmdit: nn.Module) -> str:
    """sd-scripts' label for an MMDiT: qk_norm + attn2 -> 5-medium, qk_norm -> 5-large, else medium."""
    # Parameter names, not module names: a model without qk_norm may still hold an Identity ln_q.
    names = [n for n, _ in mmdit.named_parameters()]
    qk_norm = any(n.endswith("attn.ln_q.weight") for n in names)
    attn2 = any(n.endswith("attn2.qkv.weight") for n in names)
    if qk_norm and attn2:
        return "5-medium"
    return "5-large" if qk_norm else "medium"


def weights_hash(tensors: Dict[str, torch.Tensor]) -> str:
    """sha256 of the tensor data as safetensors stores it (metadata excluded), as ``sshs_model_hash``."""
    blob = safetensors.torch.save(tensors)
    header_len = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + header_len:]).hexdigest()


def build_metadata(config: TrainConfig, info: dict, step: int, output_name: str) -> Dict[str, str]:
    """sd-scripts' ``ss_*`` keys for an SD3 LoRA and the ``modelspec.*`` keys, all as strings.

    ``info`` holds session facts: variant, resolution, num_images, dataset_dirs, tag_frequency,
    started_at (epoch seconds), session_id, model_name; and from the dataset (optional):
    num_reg_images, num_batches_per_epoch, datasets, bucket_info, enable_bucket, min/max_bucket_reso,
    bucket_no_upscale, prior_loss_weight, cache_latents (see TrainingData.metadata_info).
    """
    variant = info["variant"]
    res = info["resolution"]
    network_args = network_args_of(config)
    meta = {
        "ss_session_id": str(info.get("session_id", "")),
        "ss_training_started_at": str(info.get("started_at", time.time())),
        "ss_training_finished_at": str(time.time()),
        "ss_output_name": output_name,
        "ss_learning_rate": str(config.learning_rate),
        "ss_unet_lr": str(config.learning_rate),
        "ss_text_encoder_lr": "0",
        "ss_network_train_unet_only": "True",
        "ss_num_train_images": str(info["num_images"]),
        "ss_num_reg_images": str(info.get("num_reg_images", 0)),
        # Not an sd-scripts key: files of the dataset folders that were left out (unreadable, cut short...).
        "ss_num_skipped_images": str(info.get("num_skipped_images", 0)),
        "ss_num_batches_per_epoch": str(info.get("num_batches_per_epoch",
                                                 -(-info["num_images"] // config.train_batch_size))),
        "ss_num_epochs": str(-(-step * config.train_batch_size // max(1, info["num_images"]))),
        "ss_epoch": str(-(-step * config.train_batch_size // max(1, info["num_images"]))),
        "ss_steps": str(step),
        "ss_max_train_steps": str(step),
        "ss_batch_size_per_device": str(config.train_batch_size),
        "ss_total_batch_size": str(config.train_batch_size * config.gradient_accumulation_steps),
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation_steps),
        "ss_gradient_checkpointing": str(config.gradient_checkpointing),
        "ss_blocks_to_swap": str(config.blocks_to_swap),
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": str(config.lr_warmup_steps),
        "ss_optimizer": config.optimizer_type + (f"({config.optimizer_args})" if config.optimizer_args else ""),
        "ss_max_grad_norm": str(config.max_grad_norm),
        "ss_network_module": "networks.lora_sd3",
        "ss_network_dim": str(config.network_dim),
        "ss_network_alpha": str(config.network_alpha),
        "ss_network_dropout": str(config.network_dropout or None),
        "ss_network_args": json.dumps(network_args),
        "ss_mixed_precision": config.mixed_precision,
        "ss_full_fp16": "False",
        "ss_full_bf16": str(config.full_bf16),
        "ss_fp8_base": str(config.fp8_base),
        "ss_seed": str(config.seed),
        "ss_v2": "False",
        "ss_base_model_version": variant,
        "ss_sd_model_name": str(info.get("model_name", "")),
        "ss_resolution": f"({res}, {res})",
        "ss_enable_bucket": str(info.get("enable_bucket", False)),
        "ss_min_bucket_reso": str(info.get("min_bucket_reso")),
        "ss_max_bucket_reso": str(info.get("max_bucket_reso")),
        "ss_bucket_no_upscale": str(info.get("bucket_no_upscale", False)),
        "ss_bucket_info": json.dumps(info.get("bucket_info")),
        "ss_datasets": json.dumps(info.get("datasets", [])),
        "ss_prior_loss_weight": str(info.get("prior_loss_weight", 1.0)),
        "ss_cache_latents": str(info.get("cache_latents", True)),
        "ss_caption_dropout_rate": "0.0",
        "ss_dataset_dirs": json.dumps(info.get("dataset_dirs", {})),
        "ss_tag_frequency": json.dumps(info.get("tag_frequency", {})),
        "ss_loss_type": config.loss_type,
        "ss_huber_schedule": config.huber_schedule,
        "ss_huber_c": str(config.huber_c),
        "ss_huber_scale": str(config.huber_scale),
        "ss_weighting_scheme": config.weighting_scheme,
        "ss_logit_mean": str(config.logit_mean),
        "ss_logit_std": str(config.logit_std),
        "ss_mode_scale": str(config.mode_scale),
        "ss_training_shift": str(config.training_shift),
        "ss_pos_emb_random_crop_rate": str(config.pos_emb_random_crop_rate),
        "ss_enable_scaled_pos_embed": str(config.enable_scaled_pos_embed),
        "ss_apply_lg_attn_mask": str(config.apply_lg_attn_mask),
        "ss_apply_t5_attn_mask": str(config.apply_t5_attn_mask),
        "ss_t5xxl_max_token_length": str(config.t5xxl_max_token_length),
        "ss_clip_l_dropout_rate": str(config.clip_l_dropout_rate),
        "ss_clip_g_dropout_rate": str(config.clip_g_dropout_rate),
        "ss_t5_dropout_rate": str(config.t5_dropout_rate),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ARCHITECTURES[variant],
        # The SD3 reference code; the model predicts rectified-flow velocity (not epsilon / v).
        "modelspec.implementation": "https://github.com/Stability-AI/sd3.5",
        "modelspec.prediction_type": "flow",
        "modelspec.title": output_name,
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime()),
    }
    return meta


def network_args_of(config: TrainConfig) -> Dict[str, str]:
    """sd-scripts' ``ss_network_args``: the lora_sd3 network_args that differ from the defaults, as strings."""
    args = {}
    for name in ("context_attn_dim", "context_mlp_dim", "context_mod_dim", "x_attn_dim", "x_mlp_dim", "x_mod_dim",
                 "emb_dims", "loraplus_lr_ratio"):
        value = getattr(config, name)
        if value is not None:
            args[name] = str(value)
    if config.train_block_indices != "all":
        args["train_block_indices"] = config.train_block_indices
    if config.split_qkv:
        args["split_qkv"] = "True"
    for name in ("rank_dropout", "module_dropout"):
        if getattr(config, name):
            args[name] = str(getattr(config, name))
    if config.verbose:
        args["verbose"] = "True"
    return args


def save_lora(path: str | os.PathLike, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str],
              dtype: Optional[torch.dtype] = None) -> Path:
    """Write ``tensors`` (cast to ``dtype``) with ``metadata`` and the weights hashes, atomically
    (:mod:`atomic_files`): a failed or killed write never leaves a truncated file under ``path``.

    Raises:
        OSError: naming the file and the fix when it cannot be written (disk full, read-only).
    """
    path = Path(path)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    metadata = dict(metadata, sshs_model_hash=weights_hash(tensors))
    with staged([path]) as (temp,):
        safetensors.torch.save_file(tensors, str(temp), metadata=metadata)
    return path
