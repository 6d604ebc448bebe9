"""Learning-rate schedules, with the names and formulas of sd-scripts' ``--lr_scheduler`` (which
takes them from transformers' ``get_scheduler``).

Written here as plain functions of the step because importing ``transformers.optimization`` for
six formulas pulls in peft, accelerate, bitsandbytes and scipy: about 230 MB of resident memory in
a bare process, and 76 MB even in one that has imported the host's nodes (``bash scripts/bench.sh
--memory`` measures whole-process peak RSS). ``tests/test_options.py`` checks every schedule against
diffusers' ``get_scheduler``, which implements the same formulas independently.
"""
from __future__ import annotations

import functools
import math

import torch

POLYNOMIAL_LR_END = 1e-7  # transformers' default end learning rate for "polynomial"


def _warmup(step: int, warmup: int) -> float:
    """Linear ramp 0 → 1 over the first ``warmup`` steps."""
    return step / max(1, warmup)


def _progress(step: int, warmup: int, total: int) -> float:
    """Fraction of the post-warm-up steps done."""
    return (step - warmup) / max(1, total - warmup)


def constant(step: int, warmup: int, total: int) -> float:
    """Always the base rate (warm-up is ignored, as in transformers)."""
    return 1.0


def constant_with_warmup(step: int, warmup: int, total: int) -> float:
    """Warm-up, then the base rate."""
    return _warmup(step, warmup) if step < warmup else 1.0


def linear(step: int, warmup: int, total: int) -> float:
    """Warm-up, then a straight line down to 0 at ``total``."""
    if step < warmup:
        return _warmup(step, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def cosine(step: int, warmup: int, total: int, num_cycles: float = 0.5) -> float:
    """Warm-up, then half a cosine down to 0 at ``total``."""
    if step < warmup:
        return _warmup(step, warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * _progress(step, warmup, total))))


def cosine_with_restarts(step: int, warmup: int, total: int, num_cycles: int = 1) -> float:
    """Warm-up, then ``num_cycles`` cosine decays, each restarting from the base rate."""
    if step < warmup:
        return _warmup(step, warmup)
    progress = _progress(step, warmup, total)
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0))))


def polynomial(step: int, warmup: int, total: int, power: float = 1.0, lr_init: float = 1.0) -> float:
    """Warm-up, then (1 - progress)^power from ``lr_init`` down to 1e-7 (as a factor of ``lr_init``,
    the optimiser's default rate, so groups with other rates keep their ratio)."""
    if step < warmup:
        return _warmup(step, warmup)
    if step > total:
        return POLYNOMIAL_LR_END / lr_init
    remaining = 1 - _progress(step, warmup, total)  # (max(1, ...) where transformers divides by zero)
    return ((lr_init - POLYNOMIAL_LR_END) * remaining ** power + POLYNOMIAL_LR_END) / lr_init


SCHEDULES = {f.__name__: f for f in (constant, constant_with_warmup, linear, cosine, cosine_with_restarts,
                                      polynomial)}


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    num_cycles: int = 1, power: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Schedule ``name`` laid out over ``total_steps`` optimiser steps, as a torch ``LambdaLR``.

    Raises:
        ValueError: an unknown name, or "polynomial" with a base rate not above its 1e-7 end rate.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown lr_scheduler {name!r}; use one of: {', '.join(SCHEDULES)}")
    specific = {}
    if name == "cosine_with_restarts":
        specific["num_cycles"] = num_cycles
    elif name == "polynomial":
        lr_init = optimizer.defaults["lr"]
        if not lr_init > POLYNOMIAL_LR_END:
            raise ValueError(f"lr_scheduler polynomial decays to {POLYNOMIAL_LR_END}: learning_rate must be "
                             f"above that (got {lr_init})")
        specific.update(power=power, lr_init=lr_init)
    factor = functools.partial(SCHEDULES[name], warmup=warmup_steps, total=total_steps, **specific)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
