"""Settings node: the LoRA and optimisation options, named as sd-scripts' flags."""
from __future__ import annotations

from ..trainer.config import MIXED_PRECISION, TrainConfig
from ..trainer.flow import WEIGHTING_SCHEMES
from .common import CATEGORY, SETTINGS

_D = TrainConfig()  # defaults come from the trainer, defined once


class SD3LoraSettings:
    """Collect the training options into one validated config."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "network_dim": ("INT", {"default": _D.network_dim, "min": 1, "max": 1024,
                                    "tooltip": "LoRA rank (sd-scripts --network_dim). 4-64 typical."}),
            "network_alpha": ("FLOAT", {"default": _D.network_alpha, "min": 0.01, "max": 1024, "step": 0.01,
                                        "tooltip": "Scales the LoRA update by alpha / dim (--network_alpha)."}),
            "learning_rate": ("FLOAT", {"default": _D.learning_rate, "min": 1e-7, "max": 1.0, "step": 1e-6,
                                        "round": False, "tooltip": "AdamW learning rate (--learning_rate)."}),
            "train_batch_size": ("INT", {"default": _D.train_batch_size, "min": 1, "max": 64,
                                         "tooltip": "Images per step (--train_batch_size)."}),
            "weighting_scheme": (list(WEIGHTING_SCHEMES), {"default": _D.weighting_scheme,
                                 "tooltip": "Timestep density and loss weighting (--weighting_scheme)."}),
            "logit_mean": ("FLOAT", {"default": _D.logit_mean, "min": -10, "max": 10, "step": 0.01,
                                     "tooltip": "Mean for logit_normal (--logit_mean)."}),
            "logit_std": ("FLOAT", {"default": _D.logit_std, "min": 0.01, "max": 10, "step": 0.01,
                                    "tooltip": "Std for logit_normal (--logit_std)."}),
            "mode_scale": ("FLOAT", {"default": _D.mode_scale, "min": -10, "max": 10, "step": 0.01,
                                     "tooltip": "Scale for the mode scheme (--mode_scale)."}),
            "training_shift": ("FLOAT", {"default": _D.training_shift, "min": 0.01, "max": 100, "step": 0.01,
                                         "tooltip": "Timestep shift; >1 trains more on noisy steps (--training_shift)."}),
            "max_grad_norm": ("FLOAT", {"default": _D.max_grad_norm, "min": 0, "max": 100, "step": 0.01,
                                        "tooltip": "Gradient clipping norm; 0 disables (--max_grad_norm)."}),
            "mixed_precision": (list(MIXED_PRECISION), {"default": _D.mixed_precision,
                                "tooltip": "'bf16' runs the forward pass under bf16 autocast (--mixed_precision)."}),
            "seed": ("INT", {"default": _D.seed, "min": 0, "max": 2**63 - 1,
                             "tooltip": "Seeds the LoRA init, data order, noise and timesteps (--seed)."}),
        }}

    RETURN_TYPES = (SETTINGS,)
    RETURN_NAMES = ("settings",)
    FUNCTION = "build"
    CATEGORY = CATEGORY
    DESCRIPTION = "LoRA and training options with sd-scripts' names."

    def build(self, **kwargs):
        return (TrainConfig(**kwargs).validate(),)
