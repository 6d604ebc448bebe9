"""Mixed precision: the autocast of a run, and frozen weights stored in its dtype for the run."""
from __future__ import annotations

import contextlib
from typing import List, Optional, Tuple

import torch
from torch import nn

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
Saved = List[Tuple[nn.Module, str, nn.Parameter]]


def autocast(mixed_precision: str, device: torch.device):
    """bf16/fp16 autocast (sd-scripts' ``mixed_precision``), or nothing for "no"."""
    if mixed_precision in AUTOCAST_DTYPES:
        return torch.autocast(torch.device(device).type, dtype=AUTOCAST_DTYPES[mixed_precision])
    return contextlib.nullcontext()


def _castable(module: nn.Module, dtype: torch.dtype) -> bool:
    """An fp32 Linear/Conv2d, whose weight autocast would cast to 16-bit ``dtype`` on every call.

    Only fp32 weights: their copy costs half their size, which autocast's casts saved for
    backward cost anyway. A 16-bit copy of fp16 weights would double them, and float8 weights
    (``fp8_base``) are the host's to upcast. Layers with host weight functions (patches applied
    per call) keep their weights as stored.
    """
    if not isinstance(module, (nn.Linear, nn.Conv2d)) or module.weight is None:
        return False
    if getattr(module, "weight_function", None) or getattr(module, "bias_function", None):
        return False
    return module.weight.dtype == torch.float32 and dtype in (torch.bfloat16, torch.float16)


def cast_frozen_layers(module: nn.Module, dtype: Optional[torch.dtype]) -> Saved:
    """Give every frozen fp32 Linear/Conv2d of ``module`` a copy of its weight and bias in ``dtype``.

    Under autocast each such layer casts its weights to ``dtype`` on every call, and keeps the
    cast copy for backward; casting once gives bitwise the same outputs and gradients in a
    fraction of the time. Returns the originals for :func:`restore_layers`, which must follow
    before anything else (a sampler, a save) uses the model. ``dtype`` None does nothing.
    """
    saved: Saved = []
    if dtype is None:
        return saved
    for mod in module.modules():
        if not _castable(mod, dtype):
            continue
        for name in ("weight", "bias"):
            p = mod._parameters.get(name)
            if p is not None and not p.requires_grad:
                saved.append((mod, name, p))
                mod._parameters[name] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
    return saved


def restore_layers(saved: Saved) -> None:
    """Put back the original weights that :func:`cast_frozen_layers` replaced; empties ``saved``."""
    while saved:
        mod, name, p = saved.pop()
        mod._parameters[name] = p
