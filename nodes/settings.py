"""Settings nodes: the basic options, and optional advanced groups, named as sd-scripts' flags."""
from __future__ import annotations

from ..trainer.config import LR_SCHEDULERS, MIXED_PRECISION, OPTIMIZERS, TrainConfig
from ..trainer.flow import HUBER_SCHEDULES, LOSS_TYPES, WEIGHTING_SCHEMES
from ..trainer.lora_io import check_lora_file
from ..trainer.lora_targets import TYPE_DIM_NAMES, parse_block_selection, parse_emb_dims
from ..trainer.optim import check_optimizer_args
from . import checks
from .common import ADVANCED, CATEGORY, NETWORK_ARGS, OPTIMIZER, SETTINGS
from .names import lora_path

_D = TrainConfig()  # defaults come from the trainer, defined once


def _int(default, lo, hi, tip):
    return ("INT", {"default": default, "min": lo, "max": hi, "tooltip": tip})


def _float(default, lo, hi, step, tip):
    return ("FLOAT", {"default": default, "min": lo, "max": hi, "step": step, "round": False, "tooltip": tip})


class SD3LoraSettings:
    """Collect the training options into one validated config; advanced groups plug in optionally."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "network_dim": _int(_D.network_dim, 1, 1024, "LoRA rank (--network_dim). 4-64 typical."),
            "network_alpha": _float(_D.network_alpha, 0.01, 1024, 0.01, "Scales the update by alpha / dim (--network_alpha)."),
            "learning_rate": _float(_D.learning_rate, 1e-7, 1.0, 1e-6, "Learning rate (--learning_rate)."),
            "train_batch_size": _int(_D.train_batch_size, 1, 64, "Images per step (--train_batch_size)."),
            "weighting_scheme": (list(WEIGHTING_SCHEMES), {"default": _D.weighting_scheme,
                                 "tooltip": "Timestep density and loss weighting (--weighting_scheme)."}),
            "logit_mean": _float(_D.logit_mean, -10, 10, 0.01, "Mean for logit_normal (--logit_mean)."),
            "logit_std": _float(_D.logit_std, 0.01, 10, 0.01, "Std for logit_normal (--logit_std)."),
            "mode_scale": _float(_D.mode_scale, -10, 10, 0.01, "Scale for the mode scheme (--mode_scale)."),
            "training_shift": _float(_D.training_shift, 0.01, 100, 0.01,
                                     "Timestep shift; >1 trains more on noisy steps (--training_shift)."),
            "max_grad_norm": _float(_D.max_grad_norm, 0, 100, 0.01, "Gradient clipping norm; 0 disables (--max_grad_norm)."),
            "mixed_precision": (list(MIXED_PRECISION), {"default": _D.mixed_precision, "tooltip":
                                "bf16/fp16 autocast of the forward; fp16 uses a grad scaler (--mixed_precision)."}),
            # No "control after generate" (the editor adds one, set to randomize, to any INT named
            # seed): a seed that changed on every queue would restart the session each time.
            "seed": ("INT", {"default": _D.seed, "min": 0, "max": 2**63 - 1, "control_after_generate": False,
                             "tooltip": "Seeds LoRA init, data order, noise, timesteps, dropouts (--seed). "
                                        "Fixed: queue again continues the session."}),
        }, "optional": {
            "network_args": (NETWORK_ARGS, {"tooltip": "From 'SD3 LoRA Network Args': per-layer ranks, blocks, dropouts."}),
            "optimizer": (OPTIMIZER, {"tooltip": "From 'SD3 LoRA Optimizer': optimizer, schedule, accumulation."}),
            "advanced": (ADVANCED, {"tooltip": "From 'SD3 LoRA Advanced': loss type, precision, memory."}),
        }}

    RETURN_TYPES = (SETTINGS,)
    RETURN_NAMES = ("settings",)
    FUNCTION = "build"
    CATEGORY = CATEGORY
    DESCRIPTION = "LoRA and training options with sd-scripts' names."

    @classmethod
    def VALIDATE_INPUTS(cls, network_alpha, learning_rate, logit_mean, logit_std, mode_scale, training_shift,
                        max_grad_norm):
        # The host lets NaN through every FLOAT widget; refuse it (and out-of-range values) at queue time.
        return checks.report(cls, locals())

    def build(self, network_args=None, optimizer=None, advanced=None, **kwargs):
        for group in (network_args, optimizer, advanced):
            kwargs.update(group or {})
        return (TrainConfig(**kwargs).validate(),)


class SD3LoraNetworkArgs:
    """sd-scripts' lora_sd3 ``--network_args``: which layers get a LoRA, at which rank, with which dropouts."""

    @classmethod
    def INPUT_TYPES(cls):
        dims = {n: _int(-1, -1, 1024, f"Rank for {n[:-4].replace('_', ' ')} layers; -1 = network_dim, 0 = not "
                                       f"trained ({n}).") for n in TYPE_DIM_NAMES}
        return {"required": dict(dims, **{
            "emb_dims": ("STRING", {"default": "", "tooltip": "Ranks for context_embedder, t_embedder, x_embedder, "
                                    "y_embedder, final_mod, final_linear, e.g. [4,0,0,4,0,0]; empty = none (emb_dims)."}),
            "train_block_indices": ("STRING", {"default": "all", "tooltip": "Joint blocks to train: all, none, "
                                               "or e.g. 0,1,4-5 (train_block_indices)."}),
            "split_qkv": ("BOOLEAN", {"default": False, "tooltip": "Separate LoRA for q, k, v (split_qkv)."}),
            "network_dropout": _float(0.0, 0, 0.99, 0.01, "Dropout on LoRA rank activations (--network_dropout)."),
            "rank_dropout": _float(0.0, 0, 0.99, 0.01, "Drop whole rank channels (rank_dropout)."),
            "module_dropout": _float(0.0, 0, 0.99, 0.01, "Skip whole modules per step (module_dropout)."),
            "loraplus_lr_ratio": _float(0.0, 0, 1000, 0.1, "LoRA+: lr of up matrices x ratio; 0 = off (loraplus_lr_ratio)."),
            "network_weights": ("STRING", {"default": "", "tooltip": "Start from this LoRA file (kohya or diffusers "
                                           "names) (--network_weights)."}),
            "verbose": ("BOOLEAN", {"default": False, "tooltip": "List every trained module in the summary (verbose)."}),
            "network_train_unet_only": ("BOOLEAN", {"default": True, "tooltip": "Off: also train LoRAs on CLIP-L "
                                        "(lora_te1_) and CLIP-G (lora_te2_); needs the dataset's text cache off "
                                        "(--network_train_unet_only)."}),
            "train_t5xxl": ("BOOLEAN", {"default": False, "tooltip": "With text-encoder training, also T5-XXL "
                            "(lora_te3_; large) (train_t5xxl)."}),
            "text_encoder_lr": ("STRING", {"default": "", "tooltip": "Text-encoder learning rate: one value or "
                                "CLIP-L,CLIP-G,T5; empty = learning_rate (--text_encoder_lr)."}),
        })}

    RETURN_TYPES = (NETWORK_ARGS,)
    RETURN_NAMES = ("network_args",)
    FUNCTION = "build"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, emb_dims, train_block_indices, network_dropout, rank_dropout, module_dropout,
                        loraplus_lr_ratio, network_weights, text_encoder_lr):
        return checks.report(cls, locals(), checks.given(emb_dims, parse_emb_dims),
                             checks.given(train_block_indices, lambda v: parse_block_selection(v, 1000)),
                             checks.given(text_encoder_lr, lambda v: TrainConfig(text_encoder_lr=v).text_encoder_lrs()),
                             checks.given(network_weights, lambda v: v.strip() and check_lora_file(lora_path(v))))

    def build(self, loraplus_lr_ratio, **kwargs):
        for name in TYPE_DIM_NAMES:
            kwargs[name] = None if kwargs[name] < 0 else kwargs[name]
        kwargs["emb_dims"] = kwargs["emb_dims"].strip() or None
        kwargs["loraplus_lr_ratio"] = loraplus_lr_ratio or None
        kwargs["network_weights"] = lora_path(kwargs.get("network_weights", ""))  # relative: in models/loras
        return (kwargs,)


class SD3LoraOptimizer:
    """Optimiser, learning-rate schedule and gradient accumulation, as sd-scripts names them."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "optimizer_type": (list(OPTIMIZERS), {"default": _D.optimizer_type, "tooltip": "--optimizer_type"}),
            "optimizer_args": ("STRING", {"default": "", "tooltip": "Extra arguments, e.g. weight_decay=0.01 "
                               "betas=(0.9,0.99) (--optimizer_args)."}),
            "lr_scheduler": (list(LR_SCHEDULERS), {"default": _D.lr_scheduler, "tooltip": "--lr_scheduler"}),
            "lr_warmup_steps": _int(_D.lr_warmup_steps, 0, 1_000_000, "--lr_warmup_steps"),
            "lr_scheduler_num_cycles": _int(_D.lr_scheduler_num_cycles, 1, 1000, "cosine_with_restarts cycles."),
            "lr_scheduler_power": _float(_D.lr_scheduler_power, 0.0, 100, 0.1, "polynomial power."),
            "max_train_steps": _int(_D.max_train_steps, 1, 10_000_000, "Steps the schedule is laid out over "
                                    "(--max_train_steps)."),
            "gradient_accumulation_steps": _int(_D.gradient_accumulation_steps, 1, 1024,
                                                "Micro-batches per optimiser step (--gradient_accumulation_steps)."),
        }}

    RETURN_TYPES = (OPTIMIZER,)
    RETURN_NAMES = ("optimizer",)
    FUNCTION = "build"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, optimizer_type, optimizer_args, lr_scheduler_power):
        # Wrong keys or types in optimizer_args are refused here, not at the first step.
        return checks.report(cls, locals(), lambda: optimizer_type is None or optimizer_args is None
                             or check_optimizer_args(optimizer_type, optimizer_args))

    def build(self, **kwargs):
        return (kwargs,)


class SD3LoraAdvanced:
    """Loss function, precision, memory and text-encoder options."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "loss_type": (list(LOSS_TYPES), {"default": _D.loss_type, "tooltip": "--loss_type"}),
            "huber_schedule": (list(HUBER_SCHEDULES), {"default": _D.huber_schedule, "tooltip": "--huber_schedule"}),
            "huber_c": _float(_D.huber_c, 0.0001, 10, 0.001, "--huber_c"),
            "huber_scale": _float(_D.huber_scale, 0.0001, 100, 0.01, "--huber_scale"),
            "full_bf16": ("BOOLEAN", {"default": False, "tooltip": "LoRA weights and optimiser state in bf16; needs "
                          "mixed_precision bf16 (--full_bf16)."}),
            "fp8_base": ("BOOLEAN", {"default": False, "tooltip": "Train on float8-stored base weights: load the "
                         "model with 'Load Diffusion Model' weight_dtype fp8_e4m3fn (--fp8_base)."}),
            "blocks_to_swap": _int(0, 0, 100, "Joint blocks kept in CPU memory and brought to the GPU just before "
                                   "use, forward and backward (--blocks_to_swap); saves VRAM, costs copies."),
            "gradient_checkpointing": ("BOOLEAN", {"default": False, "tooltip": "Recompute each block in backward: "
                                       "much less memory, slower (--gradient_checkpointing)."}),
            "t5xxl_max_token_length": _int(_D.t5xxl_max_token_length, 1, 4096, "T5 tokens per caption "
                                           "(--t5xxl_max_token_length)."),
            "apply_lg_attn_mask": ("BOOLEAN", {"default": False, "tooltip": "Zero CLIP-L/G outputs at padding "
                                   "(--apply_lg_attn_mask)."}),
            "apply_t5_attn_mask": ("BOOLEAN", {"default": False, "tooltip": "Zero T5 outputs at padding "
                                   "(--apply_t5_attn_mask)."}),
            "clip_l_dropout_rate": _float(0.0, 0, 0.99, 0.01, "Drop CLIP-L's output per sample (--clip_l_dropout_rate)."),
            "clip_g_dropout_rate": _float(0.0, 0, 0.99, 0.01, "Drop CLIP-G's output per sample (--clip_g_dropout_rate)."),
            "t5_dropout_rate": _float(0.0, 0, 0.99, 0.01, "Drop T5's output per sample (--t5_dropout_rate)."),
            "pos_emb_random_crop_rate": _float(0.0, 0, 1, 0.01, "SD3.5: chance per step of a random crop of the "
                                               "position table (--pos_emb_random_crop_rate)."),
            "enable_scaled_pos_embed": ("BOOLEAN", {"default": False, "tooltip": "SD3.5: scaled position tables per "
                                        "training resolution (--enable_scaled_pos_embed)."}),
        }, "optional": {
            "torch_compile": ("BOOLEAN", {"default": False, "tooltip": "Compile each joint block with torch.compile: "
                              "the first step takes a minute or more, later steps are faster (--torch_compile)."}),
            "dynamo_backend": ("STRING", {"default": _D.dynamo_backend, "tooltip": "torch.compile backend "
                               "(--dynamo_backend)."}),
        }}

    RETURN_TYPES = (ADVANCED,)
    RETURN_NAMES = ("advanced",)
    FUNCTION = "build"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, huber_c, huber_scale, clip_l_dropout_rate, clip_g_dropout_rate, t5_dropout_rate,
                        pos_emb_random_crop_rate):
        return checks.report(cls, locals())

    def build(self, **kwargs):
        return (kwargs,)
