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
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")


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


def huber_threshold(schedule: str, sigmas: torch.Tensor, huber_c: float, huber_scale: float = 1.0) -> torch.Tensor:
    """Per-sample Huber threshold c(t), sd-scripts' ``huber_schedule``.

    ``constant``: huber_c · huber_scale. ``exponential``: exp(−α·t) · huber_scale with
    α = −ln(huber_c) / 1000 and t = 1000·σ. ``snr``: (1 − huber_c) / (1 + σ_d)² + huber_c, where
    σ_d = σ / (1 − σ) is the noise-to-signal ratio of the flow's x_σ (sd-scripts reads σ_d from
    a DDPM schedule, which a flow model does not have); this equals (1 − c)(1 − σ)² + c.
    """
    if schedule == "constant":
        return torch.full_like(sigmas, huber_c * huber_scale, dtype=torch.float32)
    if schedule == "exponential":
        alpha = -math.log(huber_c) / 1000
        return torch.exp(-alpha * sigmas.float() * 1000) * huber_scale
    if schedule == "snr":
        return (1 - huber_c) * (1 - sigmas.float()) ** 2 + huber_c
    raise ValueError(f"unknown huber_schedule {schedule!r}; use one of: {', '.join(HUBER_SCHEDULES)}")


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                     huber_c: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Unreduced loss as sd-scripts' ``conditional_loss``: l2 (d²), l1 (|d|),
    huber 2c(√(d² + c²) − c), smooth_l1 2(√(d² + c²) − c); c [B] per sample."""
    d = pred - target
    if loss_type == "l2":
        return d ** 2
    if loss_type == "l1":
        return d.abs()
    if loss_type in ("huber", "smooth_l1"):
        c = huber_c.view(-1, *([1] * (d.dim() - 1)))
        root = torch.sqrt(d ** 2 + c ** 2) - c
        return 2 * c * root if loss_type == "huber" else 2 * root
    raise ValueError(f"unknown loss_type {loss_type!r}; use one of: {', '.join(LOSS_TYPES)}")


def flow_loss(model_velocity: torch.Tensor, x_sigma: torch.Tensor, x0: torch.Tensor, sigmas: torch.Tensor,
              weighting_scheme: str = "uniform", sample_weight: Optional[torch.Tensor] = None,
              mask: Optional[torch.Tensor] = None, loss_type: str = "l2",
              huber_c: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x0-space loss (sd-scripts / diffusers ``precondition_outputs``): the model's velocity v̂ gives
    x̂0 = x_σ − σ·v̂, compared with x0 by ``loss_type``; weighted per sample by the scheme's
    weight, mean over non-batch dims, then batch mean.

    Shapes: model_velocity, x_sigma, x0 [B, C, H, W]; sigmas [B]; sample_weight [B] (e.g. the
    prior-loss weight of regularisation images); mask [B, 1, H, W] in 0..1 (masked loss: the
    element-wise error is multiplied by it, as sd-scripts' apply_masked_loss does); huber_c [B]
    (see :func:`huber_threshold`). Returns a scalar (float32).
    """
    s = sigmas.view(-1, *([1] * (x0.dim() - 1)))
    pred_x0 = x_sigma.float() - s.float() * model_velocity.float()
    weights = loss_weighting(weighting_scheme, sigmas).float().view_as(s)
    err = weights * elementwise_loss(pred_x0, x0.float(), loss_type, huber_c)
    if mask is not None:
        err = err * mask.float()
    per_sample = err.flatten(1).mean(dim=1)
    if sample_weight is not None:
        per_sample = per_sample * sample_weight.float()
    return per_sample.mean()
