"""Mixed precision: the autocast of a run, frozen weights stored in its dtype for the run, and
whether this machine computes in that dtype natively."""
from __future__ import annotations

import contextlib
import functools
import time
from typing import List, Optional, Tuple

import torch
from torch import nn

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# A dtype whose matmul runs this many times slower than fp32 is not native to the machine.
SLOW_FACTOR = 2.0
PROBE_SIZE = 256
Saved = List[Tuple[nn.Module, str, nn.Parameter]]


def autocast(mixed_precision: str, device: torch.device):
    """bf16/fp16 autocast (sd-scripts' ``mixed_precision``), or nothing for "no"."""
    if mixed_precision in AUTOCAST_DTYPES:
        return torch.autocast(torch.device(device).type, dtype=AUTOCAST_DTYPES[mixed_precision])
    return contextlib.nullcontext()


def has_host_patches(module: nn.Module) -> bool:
    """The host applies weight or bias functions (patches) to this layer on every call."""
    return bool(getattr(module, "weight_function", None) or getattr(module, "bias_function", None))


def _castable(module: nn.Module, dtype: torch.dtype) -> bool:
    """An fp32 Linear/Conv2d, whose weight autocast would cast to 16-bit ``dtype`` on every call.

    Only fp32 weights: their copy costs half their size, which autocast's casts saved for
    backward cost anyway. A 16-bit copy of fp16 weights would double them, and float8 weights
    (``fp8_base``) are the host's to upcast. Layers with host weight functions (patches applied
    per call) keep their weights as stored.
    """
    if not isinstance(module, (nn.Linear, nn.Conv2d)) or module.weight is None:
        return False
    if has_host_patches(module):
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


def _matmul_seconds(dtype: torch.dtype, size: int) -> float:
    """Best of five timings of one ``size``³ matmul in ``dtype`` on the CPU, after a warm-up call."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b  # the first call may pick and build kernels
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return best


@functools.lru_cache(maxsize=None)
def matmul_slowdown(dtype: torch.dtype, device_type: str = "cpu", size: int = PROBE_SIZE) -> float:
    """How many times longer a ``size``³ matmul takes in ``dtype`` than in fp32 (measured once per process).

    CPUs differ by far: with AMX a bf16 matmul runs about 10x faster than fp32, while CPUs without
    AVX-512 bf16 (many AMD EPYCs) run it about 100x slower, and the flags torch reports do not say
    how fast its fallback is, so it is timed (about 20 ms where the dtype is slow). GPUs are
    taken as native (1.0).
    """
    if device_type != "cpu" or dtype == torch.float32:
        return 1.0
    # One thread for both: with other processes on the cores, a multi-threaded fp32 matmul can
    # stall (OpenMP spin-waits) and make a 50x slower dtype look only 2x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode(False), torch.no_grad():
            return _matmul_seconds(dtype, size) / _matmul_seconds(torch.float32, size)
    finally:
        torch.set_num_threads(threads)


def is_native(dtype: torch.dtype, device_type: str = "cpu") -> bool:
    """Whether ``dtype`` computes at least about as fast as fp32 on this machine's ``device_type``."""
    return matmul_slowdown(dtype, device_type) < SLOW_FACTOR


def precision_warning(mixed_precision: str, device: torch.device) -> Optional[str]:
    """A warning for a ``mixed_precision`` whose dtype this machine has no native matmul for, else None.

    The run is not refused: it trains correctly, only slower, and the message says by how much
    and what to set instead.
    """
    dtype = AUTOCAST_DTYPES.get(mixed_precision)
    device_type = torch.device(device).type
    if dtype is None or is_native(dtype, device_type):
        return None
    slowdown = matmul_slowdown(dtype, device_type)
    return (f"mixed_precision {mixed_precision}: this CPU has no native {mixed_precision} matmul (a "
            f"{PROBE_SIZE}x{PROBE_SIZE} one measured {slowdown:.0f}x slower than in fp32 here), so this run trains "
            f"far slower than in fp32; set mixed_precision to no on this machine")
