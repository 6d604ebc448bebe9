"""A frozen fp32 Linear and its LoRA on an x86 CPU as one autograd node, with the frozen matmuls
(forward and input gradient) in the library that is faster on this CPU's make.

Why: PyTorch computes an fp32 ``F.linear`` and its input gradient ``g @ W`` on the CPU with MKL's
sgemm; oneDNN's inner product (``torch.ops.mkldnn._linear_pointwise``, what inductor uses for CPU
linears) ran the forward's [256-666 tokens x 768-3072] products 13-30 % faster inside a training
step on a 2-core AMD EPYC (Zen 2, AVX2); for the input gradient it reads the weight through a
transposed strided view (no copy of the weight) and ran 10-40 % faster than MKL's ``g @ W`` alone
on an AMD EPYC (Zen 4, AVX-512). Those two matmuls are the largest share of an fp32 step.
On an Intel Xeon (AVX-512, AMX) it is the other way round: MKL's sgemm is Intel's own and ran the
same products at 280-366 GFLOP/s, oneDNN's forward level with it and its strided input gradient
15-50 % slower, so there the node keeps MKL's ``addmm`` and ``g @ W`` (:func:`frozen_matmuls_in_onednn`).
One node for base + LoRA also sums the two input gradients inside ``addmm_`` instead of a
separate full-size add. See the README's fp32 lever table.

Used only where it computes the same function: a plain Linear (no host weight patches or per-call
casts) whose weight, input and LoRA are fp32 on the CPU, outside autocast and torch.compile,
without dropouts; everywhere else :class:`trainer.lora.LoRAWrapper` runs the unfused formula.
"""
from __future__ import annotations

import contextlib
import functools
import platform
from typing import Optional

import torch
from torch import nn

from .precision import has_host_patches


def on_x86() -> bool:
    """An x86 CPU: where the fused node was measured (Intel and AMD); elsewhere the unfused formula."""
    return platform.machine().lower() in ("x86_64", "amd64")


@functools.lru_cache(maxsize=None)
def onednn_linear_available() -> bool:
    """This torch build has oneDNN's linear for x86 CPUs (not on ARM builds, whose oneDNN differs)."""
    if not on_x86() or not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return False
    return True


def cpu_vendor() -> str:
    """The CPU's vendor string (``GenuineIntel``, ``AuthenticAMD``, ...); "" where it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    # Windows and macOS: platform.processor() names the vendor, e.g. "Intel64 Family 6 ... GenuineIntel"
    proc = platform.processor()
    return next((v for v in ("GenuineIntel", "AuthenticAMD") if v in proc), "")


@functools.lru_cache(maxsize=None)
def _onednn_on_this_cpu() -> bool:
    return onednn_linear_available() and cpu_vendor() != "GenuineIntel"


_forced_onednn: Optional[bool] = None  # set only by forced_library (the benchmark's A/B)


def frozen_matmuls_in_onednn() -> bool:
    """oneDNN for the frozen products everywhere but on Intel CPUs, where MKL (PyTorch's default
    for fp32 CPU matmuls) is the faster library; see the module docstring for the figures."""
    return _onednn_on_this_cpu() if _forced_onednn is None else _forced_onednn


@contextlib.contextmanager
def forced_library(onednn: bool):
    """Run the frozen products in oneDNN (True) or MKL (False) inside the block, whatever the CPU."""
    global _forced_onednn
    if onednn and not onednn_linear_available():
        raise RuntimeError("this torch build has no oneDNN linear")
    before, _forced_onednn = _forced_onednn, onednn
    try:
        yield
    finally:
        _forced_onednn = before


def _plain_frozen_fp32_cpu_linear(base: nn.Module) -> bool:
    """A frozen nn.Linear with fp32 weights on the CPU that the host computes as plain ``F.linear``
    (the fused node gives no gradient to the weight or bias)."""
    if not isinstance(base, nn.Linear) or base.weight.device.type != "cpu" or base.weight.dtype != torch.float32:
        return False
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return False
    return not (getattr(base, "comfy_cast_weights", False) or has_host_patches(base))


def applies(base: nn.Module, lora: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`linear_with_lora` computes ``base(x) + lora.delta(x)`` for this call.

    ``lora`` is a :class:`trainer.lora.LoRAModule`; its ``fused_cpu`` flag turns the path off
    (the benchmark's ablation).
    """
    if not lora.fused_cpu or lora.conv or lora.splits != 1:
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return False
    if lora.training and (lora.dropout or lora.rank_dropout or lora.module_dropout):
        return False
    if lora.downs[0].dtype != torch.float32 or torch.compiler.is_compiling():
        return False
    return _plain_frozen_fp32_cpu_linear(base) and on_x86()


def _frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """``x @ weight.t() + bias`` in oneDNN's inner product (``weight`` may be a strided view: it
    reads ``W.t()`` without a copy) or in MKL, by :func:`frozen_matmuls_in_onednn`."""
    if frozen_matmuls_in_onednn():
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())


class _LinearWithLoRA(torch.autograd.Function):
    """y = x Wᵀ + b + s · (x Aᵀ) Bᵀ, with gradients for x, A (down) and B (up) only."""

    @staticmethod
    def forward(ctx, x, weight, bias, down, up, scale: float):
        x2 = x.reshape(-1, x.shape[-1])
        lx = x2 @ down.t()
        y = _frozen_linear(x2, weight, bias)
        y.addmm_(lx, up.t(), alpha=scale)
        ctx.save_for_backward(x2, weight, down, up, lx)
        ctx.scale, ctx.in_shape = scale, x.shape
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x2, weight, down, up, lx = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        d_lx = (g @ up).mul_(ctx.scale)  # the gradient of the rank activation, scale included
        grad_up = (g.t() @ lx).mul_(ctx.scale)
        grad_down = d_lx.t() @ x2
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _frozen_linear(g, weight.t()).addmm_(d_lx, down).view(ctx.in_shape)  # g @ W + LoRA's share
        return grad_x, None, None, grad_down, grad_up, None


def linear_with_lora(base: nn.Linear, lora: nn.Module, x: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
    """``base(x) + lora.delta(x) · multiplier`` as one autograd node; call only where :func:`applies`."""
    return _LinearWithLoRA.apply(x, base.weight, base.bias, lora.downs[0], lora.ups[0], lora.scale * multiplier)
