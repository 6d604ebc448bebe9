"""Training settings, named as sd-scripts' ``sd3_train_network.py`` options."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from .flow import WEIGHTING_SCHEMES

MIXED_PRECISION = ("no", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    """Every value is read and validated once, in :meth:`validate`."""

    # LoRA network
    network_dim: int = 16            # LoRA rank; 4-64 typical for SD3
    network_alpha: float = 1.0       # update scale numerator: scale = network_alpha / network_dim
    # optimiser
    learning_rate: float = 1e-4      # AdamW lr; sd-scripts' SD3 guide suggests 1e-4 for LoRA
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.01  # AdamW default decoupled weight decay
    max_grad_norm: float = 1.0       # clip gradient norm; 0 disables
    # batches
    train_batch_size: int = 1        # samples per step
    # rectified flow
    weighting_scheme: str = "uniform"  # timestep density / loss weight (see trainer/flow.py)
    logit_mean: float = 0.0          # logit_normal mean
    logit_std: float = 1.0           # logit_normal std
    mode_scale: float = 1.29         # mode scheme scale
    training_shift: float = 1.0      # σ shift s·u/(1+(s-1)u); >1 favours noisier timesteps
    # reproducibility and precision
    seed: int = 42                   # seeds LoRA init, data order, noise and timesteps
    mixed_precision: str = "no"      # "bf16" runs the forward under bf16 autocast

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the setting and the fix for any bad value; return self."""
        if self.network_dim < 1:
            raise ValueError(f"network_dim must be at least 1 (got {self.network_dim}); it is the LoRA rank, e.g. 16")
        if self.network_alpha <= 0:
            raise ValueError(f"network_alpha must be > 0 (got {self.network_alpha}); use e.g. 1 or network_dim")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0 (got {self.learning_rate}); 1e-4 is a good start")
        if self.train_batch_size < 1:
            raise ValueError(f"train_batch_size must be at least 1 (got {self.train_batch_size})")
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"unknown weighting_scheme {self.weighting_scheme!r}; use one of: {', '.join(WEIGHTING_SCHEMES)}")
        if self.training_shift <= 0:
            raise ValueError(f"training_shift must be > 0 (got {self.training_shift}); 1.0 means no shift")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION} (got {self.mixed_precision!r})")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Stable text of every setting, used to tell whether a session can continue."""
        return json.dumps(self.to_dict(), sort_keys=True)
