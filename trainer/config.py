"""Training settings, named as sd-scripts' ``sd3_train_network.py`` options."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import List, Optional

from .flow import HUBER_SCHEDULES, LOSS_TYPES, WEIGHTING_SCHEMES
from .lora_targets import TYPE_DIM_NAMES, parse_block_selection, parse_emb_dims
from .optim import check_optimizer_args
from .schedules import SCHEDULES

MIXED_PRECISION = ("no", "fp16", "bf16")
OPTIMIZERS = ("AdamW", "AdamW8bit", "Adafactor", "Prodigy", "Lion", "SGDNesterov")
LR_SCHEDULERS = tuple(SCHEDULES)


@dataclass(frozen=True)
class TrainConfig:
    """Every value is read and validated once, in :meth:`validate`."""

    # LoRA network (sd-scripts --network_dim / --network_alpha / --network_args of lora_sd3)
    network_dim: int = 16            # LoRA rank; 4-64 typical for SD3
    network_alpha: float = 1.0       # update scale numerator: scale = network_alpha / network_dim
    context_attn_dim: Optional[int] = None  # per-type ranks: None = network_dim, 0 = not trained
    context_mlp_dim: Optional[int] = None
    context_mod_dim: Optional[int] = None
    x_attn_dim: Optional[int] = None
    x_mlp_dim: Optional[int] = None
    x_mod_dim: Optional[int] = None
    emb_dims: Optional[str] = None   # six ranks: context, t, x, y embedders, final mod, final linear
    train_block_indices: str = "all"  # "all", "none" or "0,1,4-5"
    split_qkv: bool = False          # separate LoRA for q, k and v of the fused qkv
    network_dropout: float = 0.0     # dropout on the LoRA's rank activations
    rank_dropout: float = 0.0        # drop whole rank channels
    module_dropout: float = 0.0      # skip a whole module for a step
    loraplus_lr_ratio: Optional[float] = None  # LoRA+: lr of the up matrices × ratio (e.g. 16)
    network_weights: str = ""        # start from an existing LoRA file (kohya or diffusers names)
    verbose: bool = False            # list every trained module with its rank in the node's summary
    # text-encoder LoRA
    network_train_unet_only: bool = True  # False: also train LoRAs on CLIP-L (lora_te1_) and CLIP-G (lora_te2_)
    train_t5xxl: bool = False        # with text-encoder training, also T5-XXL (lora_te3_); large
    text_encoder_lr: str = ""        # one lr for all, or "l,g,t5" (empty: learning_rate)
    # optimiser and schedule
    optimizer_type: str = "AdamW"
    optimizer_args: str = ""         # extra optimiser arguments, "key=value key2=value2"
    learning_rate: float = 1e-4      # sd-scripts' SD3 guide suggests 1e-4 for LoRA
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_scheduler_num_cycles: int = 1   # cosine_with_restarts
    lr_scheduler_power: float = 1.0    # polynomial
    max_train_steps: int = 1600      # the length the lr schedule is laid out for
    max_grad_norm: float = 1.0       # clip gradient norm; 0 disables
    gradient_accumulation_steps: int = 1
    train_batch_size: int = 1        # samples per micro-step
    # rectified flow and loss
    weighting_scheme: str = "uniform"  # timestep density / loss weight (see trainer/flow.py)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    training_shift: float = 1.0      # σ shift s·u/(1+(s-1)u); >1 favours noisier timesteps
    loss_type: str = "l2"            # l1, l2, huber, smooth_l1
    huber_schedule: str = "snr"      # constant, exponential, snr
    huber_c: float = 0.1
    huber_scale: float = 1.0
    # text encoders (SD3's CLIP-L, CLIP-G and T5-XXL)
    t5xxl_max_token_length: int = 256  # T5 tokens per caption (cut or padded)
    apply_lg_attn_mask: bool = False   # zero CLIP-L/G outputs at padded positions
    apply_t5_attn_mask: bool = False   # zero T5 outputs at padded positions
    clip_l_dropout_rate: float = 0.0   # per sample, drop CLIP-L's output with this probability
    clip_g_dropout_rate: float = 0.0
    t5_dropout_rate: float = 0.0
    # SD3.5 position embeddings
    pos_emb_random_crop_rate: float = 0.0  # chance per step of a randomly placed crop of the table
    enable_scaled_pos_embed: bool = False  # per-resolution scaled sin-cos tables (multi-resolution training)
    # precision and memory
    mixed_precision: str = "no"      # "bf16"/"fp16" autocast of the forward (fp16 with a grad scaler)
    full_bf16: bool = False          # LoRA weights and optimiser state in bf16
    fp8_base: bool = False           # frozen weights stored in float8 (the model loaded as fp8_e4m3fn)
    blocks_to_swap: int = 0          # joint blocks kept in CPU memory, each brought to the GPU just before use
    gradient_checkpointing: bool = False  # recompute each joint block in backward: less memory, ~30% slower
    torch_compile: bool = False      # compile each joint block with torch.compile (once per run, then faster steps)
    dynamo_backend: str = "inductor"  # torch.compile backend
    # reproducibility
    seed: int = 42                   # seeds LoRA init, data order, noise, timesteps and dropouts

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the setting and the fix for any bad value; return self."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            # NaN passes every comparison below (and the host's min/max), then silently turns
            # clipping off or poisons the timesteps: refuse it by name first.
            _check(not isinstance(v, float) or math.isfinite(v), f"{f.name} is {v}: set a finite number")
        _check(self.network_dim >= 1, f"network_dim must be at least 1 (got {self.network_dim}); "
                                      f"it is the LoRA rank, e.g. 16")
        _check(self.network_alpha > 0, f"network_alpha must be > 0 (got {self.network_alpha}); use e.g. 1 or network_dim")
        for name in TYPE_DIM_NAMES:
            v = getattr(self, name)
            _check(v is None or v >= 0, f"{name} must be >= 0 (0 = not trained) or empty (got {v})")
        parse_emb_dims(self.emb_dims)
        parse_block_selection(self.train_block_indices, 1000)
        _check(self.blocks_to_swap >= 0, f"blocks_to_swap must be >= 0 (got {self.blocks_to_swap})")
        if self.torch_compile:
            backends = _dynamo_backends()
            _check(self.dynamo_backend in backends, f"unknown dynamo_backend {self.dynamo_backend!r}; use one of: "
                                                    f"{', '.join(backends)} (inductor is torch.compile's default)")
        _check(1 <= self.t5xxl_max_token_length <= 4096,
               f"t5xxl_max_token_length must be in 1..4096 (got {self.t5xxl_max_token_length}); 256 is sd-scripts' default")
        for name in ("network_dropout", "rank_dropout", "module_dropout", "clip_l_dropout_rate",
                     "clip_g_dropout_rate", "t5_dropout_rate", "pos_emb_random_crop_rate"):
            v = getattr(self, name)
            _check(0 <= v < 1 or (name == "pos_emb_random_crop_rate" and v == 1), f"{name} must be in [0, 1) (got {v})")
        _check(self.loraplus_lr_ratio is None or self.loraplus_lr_ratio > 0,
               f"loraplus_lr_ratio must be > 0 (got {self.loraplus_lr_ratio}); 16 is typical")
        self.text_encoder_lrs()
        _check(self.optimizer_type in OPTIMIZERS, f"unknown optimizer_type {self.optimizer_type!r}; "
                                                  f"use one of: {', '.join(OPTIMIZERS)}")
        check_optimizer_args(self.optimizer_type, self.optimizer_args)
        _check(self.learning_rate > 0, f"learning_rate must be > 0 (got {self.learning_rate}); 1e-4 is a good start")
        _check(self.lr_scheduler in LR_SCHEDULERS, f"unknown lr_scheduler {self.lr_scheduler!r}; "
                                                   f"use one of: {', '.join(LR_SCHEDULERS)}")
        _check(self.lr_warmup_steps >= 0, f"lr_warmup_steps must be >= 0 (got {self.lr_warmup_steps})")
        _check(self.max_train_steps >= 1, f"max_train_steps must be >= 1 (got {self.max_train_steps})")
        _check(self.gradient_accumulation_steps >= 1,
               f"gradient_accumulation_steps must be >= 1 (got {self.gradient_accumulation_steps})")
        _check(self.train_batch_size >= 1, f"train_batch_size must be at least 1 (got {self.train_batch_size})")
        _check(self.weighting_scheme in WEIGHTING_SCHEMES, f"unknown weighting_scheme {self.weighting_scheme!r}; "
                                                           f"use one of: {', '.join(WEIGHTING_SCHEMES)}")
        _check(self.logit_std > 0, f"logit_std must be > 0 (got {self.logit_std}); 1.0 is sd-scripts' default")
        _check(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (got {self.max_grad_norm}); 0 turns clipping off")
        _check(self.huber_scale > 0, f"huber_scale must be > 0 (got {self.huber_scale})")
        _check(self.lr_scheduler_power >= 0, f"lr_scheduler_power must be >= 0 (got {self.lr_scheduler_power})")
        _check(self.training_shift > 0, f"training_shift must be > 0 (got {self.training_shift}); 1.0 means no shift")
        _check(self.loss_type in LOSS_TYPES, f"unknown loss_type {self.loss_type!r}; use one of: {', '.join(LOSS_TYPES)}")
        _check(self.huber_schedule in HUBER_SCHEDULES, f"unknown huber_schedule {self.huber_schedule!r}; "
                                                       f"use one of: {', '.join(HUBER_SCHEDULES)}")
        _check(0 < self.huber_c <= 1 or self.huber_schedule == "constant",
               f"huber_c must be in (0, 1] for the {self.huber_schedule} schedule (got {self.huber_c})")
        _check(self.mixed_precision in MIXED_PRECISION, f"mixed_precision must be one of {MIXED_PRECISION} "
                                                        f"(got {self.mixed_precision!r})")
        _check(not (self.full_bf16 and self.mixed_precision != "bf16"),
               "full_bf16 needs mixed_precision 'bf16'; set mixed_precision to bf16 or turn full_bf16 off")
        return self

    def text_encoder_lrs(self) -> List[float]:
        """Learning rates for CLIP-L, CLIP-G and T5 (sd-scripts' --text_encoder_lr, one or three values)."""
        text = self.text_encoder_lr.strip().strip("[]")
        if not text:
            return [self.learning_rate] * 3
        try:
            values = [float(v) for v in text.replace(" ", ",").split(",") if v]
        except ValueError:
            raise ValueError(f"text_encoder_lr {self.text_encoder_lr!r} is not a number or a list of three "
                             f"numbers (CLIP-L, CLIP-G, T5), e.g. 1e-5 or 1e-5,1e-5,5e-6") from None
        _check(len(values) in (1, 3) and all(v >= 0 for v in values),
               f"text_encoder_lr needs one or three learning rates >= 0 (got {self.text_encoder_lr!r})")
        return values * 3 if len(values) == 1 else values

    def text_options(self) -> dict:
        """The settings that change how captions are encoded (and so the cached text outputs)."""
        return {"t5xxl_max_token_length": self.t5xxl_max_token_length,
                "apply_lg_attn_mask": self.apply_lg_attn_mask, "apply_t5_attn_mask": self.apply_t5_attn_mask}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)



def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _dynamo_backends() -> List[str]:
    """The torch.compile backends this torch build has (imported only when torch_compile is on)."""
    import torch._dynamo

    return sorted(torch._dynamo.list_backends(exclude_tags=()))
