"""The training step and loop: read this file to know what one step of SD3 LoRA training does."""
from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Tuple

import torch

from . import flow
from .batches import EncodedData
from .state import TrainState, next_batch


TextEncoder = Callable[[List[str]], Tuple[torch.Tensor, torch.Tensor]]


def training_step(mmdit: torch.nn.Module, data: EncodedData, state: TrainState,
                  compute_dtype: torch.dtype = torch.float32, encode_text: Optional[TextEncoder] = None) -> float:
    """One optimiser step of rectified-flow LoRA training; returns the step's loss.

    ``mmdit`` must already carry the LoRA (``state.network.attach``) and be frozen otherwise.
    ``encode_text(captions) -> (context, pooled)`` encodes batches whose text is not cached.
    """
    cfg = state.config
    batch = next_batch(state, data, cfg.train_batch_size)
    if batch.context is None:
        batch.context, batch.pooled = encode_text(batch.captions)
    x0 = batch.latents
    device = x0.device
    # Noise and σ come from the session's own generator (on the CPU, so runs are reproducible
    # on any device and a continued session draws exactly what an uninterrupted one would).
    noise = torch.randn(x0.shape, generator=state.generator, dtype=torch.float32).to(device, x0.dtype)
    sigmas = flow.sample_sigmas(cfg.weighting_scheme, x0.shape[0], cfg.training_shift, cfg.logit_mean,
                                cfg.logit_std, cfg.mode_scale, generator=state.generator, device=device)
    x_sigma = flow.add_noise(x0, noise, sigmas)

    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.mixed_precision == "bf16"
                else contextlib.nullcontext())
    with autocast:
        velocity = mmdit(x_sigma.to(compute_dtype), (sigmas * 1000).to(compute_dtype),
                         context=batch.context.to(compute_dtype), y=batch.pooled.to(compute_dtype))
    loss = flow.flow_loss(velocity, x_sigma, x0, sigmas, cfg.weighting_scheme, batch.loss_weight, batch.mask)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss became {loss.item()} at step {state.step + 1}; "
                                 f"lower learning_rate or use mixed_precision 'no'")
    loss.backward()

    params = [p for g in state.optimizer.param_groups for p in g["params"]]
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)  # frees the gradients' memory between steps
    state.step += 1
    value = loss.item()  # the one host sync of the step, needed for the history anyway
    state.losses.append(value)
    return value


def train(mmdit: torch.nn.Module, data: EncodedData, state: TrainState, num_steps: int,
          compute_dtype: torch.dtype = torch.float32,
          on_step: Optional[Callable[[int, float], None]] = None,
          should_stop: Optional[Callable[[], bool]] = None, encode_text: Optional[TextEncoder] = None) -> int:
    """Run up to ``num_steps`` steps; stop early (between steps) when ``should_stop()`` is true.

    The LoRA is attached for the run and detached afterwards, whatever happens, so the
    caller's model is left as it was. Returns the number of steps done.
    """
    state.network.attach(mmdit)
    done = 0
    try:
        for _ in range(num_steps):
            if should_stop is not None and should_stop():
                break
            loss = training_step(mmdit, data, state, compute_dtype, encode_text)
            done += 1
            if on_step is not None:
                on_step(state.step, loss)
    finally:
        state.network.detach()
    return done
