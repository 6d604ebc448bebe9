"""The training step and loop: read this file to know what one step of SD3 LoRA training does."""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

from . import distributed, flow, text
from .batches import Batch
from .precision import autocast
from .run import attached
from .state import TrainState, next_batch

TextEncoder = Callable[[List[str]], Tuple[torch.Tensor, torch.Tensor]]


def micro_step_loss(mmdit: torch.nn.Module, batch: Batch, state: TrainState, compute_dtype: torch.dtype) -> torch.Tensor:
    """Noise one batch at sampled σ, run the model, return the rectified-flow loss (not yet backpropagated)."""
    cfg = state.config
    x0 = batch.latents
    device = x0.device
    # Noise and σ come from the session's own generator (on the CPU, so runs are reproducible
    # on any device and a continued session draws exactly what an uninterrupted one would).
    # They are drawn for the whole batch and this process keeps its rows (batch.share): in a
    # multi-GPU run every process draws alike, so a sample's noise does not depend on the split.
    share = batch.share
    noise = share.take(torch.randn((share.total, *x0.shape[1:]), generator=state.generator,
                                   dtype=torch.float32)).to(device, x0.dtype)
    sigmas = share.take(flow.sample_sigmas(cfg.weighting_scheme, share.total, cfg.training_shift, cfg.logit_mean,
                                           cfg.logit_std, cfg.mode_scale, generator=state.generator, device=device))
    x_sigma = flow.add_noise(x0, noise, sigmas)
    with autocast(cfg.mixed_precision, device):
        velocity = mmdit(x_sigma.to(compute_dtype), (sigmas * 1000).to(compute_dtype),
                         context=batch.context.to(compute_dtype), y=batch.pooled.to(compute_dtype))
    huber_c = flow.huber_threshold(cfg.huber_schedule, sigmas, cfg.huber_c, cfg.huber_scale)
    return flow.flow_loss(velocity, x_sigma, x0, sigmas, cfg.weighting_scheme, batch.loss_weight, batch.mask,
                          cfg.loss_type, huber_c)


def training_step(mmdit: torch.nn.Module, data, state: TrainState, compute_dtype: torch.dtype = torch.float32,
                  encode_text: Optional[TextEncoder] = None) -> float:
    """One optimiser step (``gradient_accumulation_steps`` micro-batches); returns its mean loss.

    ``mmdit`` must already carry the LoRA (``state.network.attach``) and be frozen otherwise.
    ``encode_text(captions) -> (context, pooled)`` encodes batches whose text is not cached.
    """
    cfg = state.config
    accum = cfg.gradient_accumulation_steps
    total = 0.0
    for _ in range(accum):
        batch = next_batch(state, data, cfg.train_batch_size)
        if batch.context is None:
            batch.context, batch.pooled = encode_text(batch.captions)
        batch.context, batch.pooled = text.drop_encoders(
            batch.context, batch.pooled, (cfg.clip_l_dropout_rate, cfg.clip_g_dropout_rate, cfg.t5_dropout_rate),
            state.generator, batch.share)
        loss = micro_step_loss(mmdit, batch, state, compute_dtype)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {state.step + 1}; "
                                     f"lower learning_rate or use mixed_precision 'no'")
        # This process's part of the batch mean (weight 1 in one process), then of the micro-batches'.
        scaled = loss * batch.share.weight / accum
        (state.scaler.scale(scaled) if state.scaler else scaled).backward()
        total += loss.item() * batch.share.weight  # one host sync per micro-batch, needed for the history anyway

    params = [p for g in state.optimizer.param_groups for p in g["params"]]
    # Several processes: sum their gradients (and losses), so every process takes the same step.
    distributed.sync_gradients(params)
    total = distributed.sum_over_ranks(total)
    if state.scaler:
        state.scaler.unscale_(state.optimizer)  # clip the true gradients, not the scaled ones
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    if state.scaler:
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)  # frees the gradients' memory between steps
    distributed.sync_generator(state.generator)  # LoRA dropouts draw per process; realign them
    state.step += 1
    state.losses.append(total / accum)
    return total / accum


def train(mmdit: torch.nn.Module, data, state: TrainState, num_steps: int,
          compute_dtype: torch.dtype = torch.float32,
          on_step: Optional[Callable[[int, float], None]] = None,
          should_stop: Optional[Callable[[], bool]] = None, encode_text: Optional[TextEncoder] = None) -> int:
    """Run up to ``num_steps`` steps; stop early (between steps) when ``should_stop()`` is true.

    The run's set-up (:func:`attached`) is undone afterwards, whatever happens, so the
    caller's model is left as it was. Returns the number of steps done.
    """
    done = 0
    with attached(mmdit, state, data):
        for _ in range(num_steps):
            if should_stop is not None and should_stop():
                break
            loss = training_step(mmdit, data, state, compute_dtype, encode_text)
            done += 1
            if on_step is not None:
                on_step(state.step, loss)
    return done
