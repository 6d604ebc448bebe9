"""Timing, memory and FLOP measurement, shared by the benchmarks.

Memory is read from the kernel: ``VmHWM`` (peak resident set) is reset through
``/proc/self/clear_refs`` right before a step and read right after it, so the step's peak RSS
delta = VmHWM after the step − VmRSS before it. Everything torch allocates on the CPU counts
(activations, saved tensors, casts, gradients, optimiser state created in the step). glibc keeps
freed heap memory resident, which would hide a step's allocations behind the previous step's, so
the memory round first hands free memory back (``malloc_trim``); that round is not timed.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import re
import statistics
import time
from typing import Callable, Dict, List

import torch
from torch.utils.flop_counter import FlopCounterMode


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+)", f.read()).group(1)) / 1024


def rss_mb() -> float:
    """Current resident set size of this process, MB."""
    return _status_mb("VmRSS")


def rss_file_mb() -> float:
    """The file-backed part of the resident set, MB: pages of mapped files, mostly the shared
    libraries of torch (and, with a CUDA build, of CUDA) and triton.

    How many of a library's pages count depends on the page cache, not on this process: a fault
    maps the cached neighbours of the faulting page too, so the same imports hold more when the
    page cache holds the libraries whole (right after pip installed them) than when it holds only
    what processes read from them.
    """
    return _status_mb("RssFile")


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux ≥ 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mb() -> float:
    """Peak resident set size since the last :func:`reset_peak_rss`, MB."""
    return _status_mb("VmHWM")


def trim_heap() -> None:
    """Return glibc's free heap memory to the kernel, so RSS counts live memory only."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def memory_step(step: Callable[[], object]) -> float:
    """Peak RSS of one step above the live memory before it (MB); see the module docstring."""
    gc.collect()
    trim_heap()
    reset_peak_rss()
    before = rss_mb()
    step()
    return peak_rss_mb() - before


def timed_step(step: Callable[[], object]) -> Dict[str, float]:
    """Run one step; return its wall time (s) and its peak RSS above the RSS it started at (MB)."""
    reset_peak_rss()
    before = rss_mb()
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    return {"s": seconds, "peak_mb": peak_rss_mb() - before}


def _register_cpu_sdpa_flops() -> None:
    """torch's flop counter knows the CUDA attention kernels but not the CPU flash kernel that
    F.scaled_dot_product_attention uses here; count it with the same formulas, or every SDPA
    contestant would look as if attention cost nothing."""
    from torch.utils import flop_counter as fc

    fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    if fwd in fc.flop_registry:
        return

    @fc.register_flop_formula(fwd)
    def _fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    @fc.register_flop_formula(bwd)
    def _bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _register_onednn_linear_flops() -> None:
    """Nor does it know oneDNN's linear, the fp32 CPU forward of ``trainer/cpu_linear.py``:
    2 x rows x in x out, as for ``aten.mm``."""
    from torch.utils import flop_counter as fc

    op = torch.ops.mkldnn._linear_pointwise
    if op in fc.flop_registry:
        return

    @fc.register_flop_formula(op)
    def _linear(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        rows = 1
        for d in x_shape[:-1]:
            rows *= d
        return 2 * rows * x_shape[-1] * w_shape[0]


def count_flops(step: Callable[[], object]) -> int:
    """FLOPs of one step (matmuls, convolutions, attention) as torch.utils.flop_counter counts them."""
    _register_cpu_sdpa_flops()
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        _register_onednn_linear_flops()
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def interleaved(contestants: Dict[str, object], rounds: int, warmup: int = 1,
                log: Callable[[str], None] = print) -> Dict[str, List[Dict[str, float]]]:
    """Round-robin: every round steps each contestant once, so load from other processes
    on this shared machine falls on all of them alike. The first ``warmup`` rounds are dropped."""
    results: Dict[str, List[Dict[str, float]]] = {name: [] for name in contestants}
    for r in range(warmup + rounds):
        for name, c in contestants.items():
            with run_of(c):
                m = timed_step(c.step)
            if r >= warmup:
                results[name].append(m)
        log(f"round {r + 1}/{warmup + rounds}" + (" (warm-up)" if r < warmup else "") + ": "
            + ", ".join(f"{n}={results[n][-1]['s']:.2f}s" for n in contestants if r >= warmup))
    return results


TENSOR_CATEGORIES = ("parameters", "optimiser state", "inputs", "temporaries", "activations", "gradients",
                     "autograd detail", "unknown")


def tensor_peak_by_category(step: Callable[[], object]) -> Dict[str, float]:
    """MB of live CPU tensors at the peak of one step, by torch.profiler's memory categories.

    Unlike RSS this counts only what torch allocates and still holds (not the allocator's free
    but unreturned memory, nor the libraries' own)."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/timeline.json"
        prof.export_memory_timeline(path, device="cpu")
        with open(path) as f:
            _, sizes = json.load(f)
    peak = max(sizes, key=sum)[1:]  # column 0 is unused; then the categories in TENSOR_CATEGORIES order
    return {name: b / 2**20 for name, b in zip(TENSOR_CATEGORIES, peak)}


def run_of(contestant):
    """The contestant's untimed set-up around its steps (a trainer's once-per-run work, such as
    attaching the LoRA), or nothing."""
    return contestant.run() if hasattr(contestant, "run") else contextlib.nullcontext()


def median(values: List[float]) -> float:
    return statistics.median(values) if values else float("nan")
