"""Rectified-flow pieces of SD3 training: timestep sampling, noising, loss weights and loss.

Formulas follow the SD3 paper (Esser et al. 2024, "Scaling Rectified Flow Transformers for
High-Resolution Image Synthesis", sections 2-3) as sd-scripts' ``sd3_train_utils`` and
diffusers' ``training_utils`` compute them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

WEIGHTING_SCHEMES = ("uniform", "none", "logit_normal", "mode", "sigma_sqrt", "cosmap")
LOSS_TYPES = ("l2",)


def _check_scheme(weighting_scheme: str) -> None:
    """Raise a ValueError naming the accepted schemes for an unknown one."""
    if weighting_scheme not in WEIGHTING_SCHEMES:
        raise ValueError(
            f"unknown weighting_scheme {weighting_scheme!r}; use one of: {', '.join(WEIGHTING_SCHEMES)}")


def sample_u(weighting_scheme: str, batch_size: int, logit_mean: float = 0.0, logit_std: float = 1.0,
             mode_scale: float = 1.29, generator: Optional[torch.Generator] = None,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """Draw u in [0, 1] per sample with the density of ``weighting_scheme`` (SD3 paper §3.1).

    ``logit_normal``: u = sigmoid(n), n ~ N(logit_mean, logit_std).
    ``mode``: u = 1 - v - mode_scale * (cos²(π v / 2) - 1 + v), v ~ U(0, 1).
    Others (uniform, none, sigma_sqrt, cosmap): u ~ U(0, 1).
    """
    _check_scheme(weighting_scheme)
    if weighting_scheme == "logit_normal":
        n = torch.randn(batch_size, generator=generator, device="cpu") * logit_std + logit_mean
        u = torch.sigmoid(n)
    elif weighting_scheme == "mode":
        v = torch.rand(batch_size, generator=generator, device="cpu")
        u = 1 - v - mode_scale * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)
    else:
        u = torch.rand(batch_size, generator=generator, device="cpu")
    return u.to(device)


def shift_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Timestep shift s·u / (1 + (s − 1)·u) (SD3 paper eq. 23); shift 1.0 leaves u unchanged."""
    return shift * u / (1 + (shift - 1) * u)


def sample_sigmas(weighting_scheme: str, batch_size: int, training_shift: float = 1.0, logit_mean: float = 0.0,
                  logit_std: float = 1.0, mode_scale: float = 1.29, generator: Optional[torch.Generator] = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """σ per sample as sd-scripts draws it: u by scheme, shifted, quantised to t = floor(1000·u), σ = t / 1000.

    Timestep 0 (σ = 0, a clean input) is lifted to 1/1000 so every sample carries noise.
    """
    u = sample_u(weighting_scheme, batch_size, logit_mean, logit_std, mode_scale, generator, device)
    u = shift_sigmas(u, training_shift)
    t = torch.floor(u * 1000).clamp(1, 1000)
    return t / 1000.0


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 − σ)·x0 + σ·ε, with σ broadcast over the non-batch dims."""
    s = sigmas.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def loss_weighting(weighting_scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weight: ``sigma_sqrt`` σ⁻², ``cosmap`` 2 / (π(1 − 2σ + 2σ²)), else 1."""
    _check_scheme(weighting_scheme)
    if weighting_scheme == "sigma_sqrt":
        return (sigmas ** -2.0).float()
    if weighting_scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
    return torch.ones_like(sigmas)


def flow_loss(model_velocity: torch.Tensor, x_sigma: torch.Tensor, x0: torch.Tensor, sigmas: torch.Tensor,
              weighting_scheme: str = "uniform", sample_weight: Optional[torch.Tensor] = None,
              mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x0-space loss (sd-scripts / diffusers ``precondition_outputs``): the model's velocity v̂ gives
    x̂0 = x_σ − σ·v̂, compared with x0; weighted per sample, mean over non-batch dims, then batch mean.

    Shapes: model_velocity, x_sigma, x0 [B, C, H, W]; sigmas [B]; sample_weight [B] (e.g. the
    prior-loss weight of regularisation images); mask [B, 1, H, W] in 0..1 (masked loss: the
    element-wise error is multiplied by it, as sd-scripts' apply_masked_loss does).
    Returns a scalar (float32).
    """
    s = sigmas.view(-1, *([1] * (x0.dim() - 1)))
    pred_x0 = x_sigma.float() - s.float() * model_velocity.float()
    weights = loss_weighting(weighting_scheme, sigmas).float().view_as(s)
    err = weights * (pred_x0 - x0.float()) ** 2
    if mask is not None:
        err = err * mask.float()
    per_sample = err.flatten(1).mean(dim=1)
    if sample_weight is not None:
        per_sample = per_sample * sample_weight.float()
    return per_sample.mean()
