"""Make a host-loaded model safe to train a LoRA on, without changing what it computes."""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def freeze_base_model(module: nn.Module) -> None:
    """Freeze every parameter and swap inference-mode tensors for ordinary copies.

    A host may load weights under ``torch.inference_mode()``; autograd cannot save such
    tensors for backward (SD3.5's ``ln_q``/``ln_k`` RMSNorm weights fail first). Only the
    inference tensors are cloned, one at a time, so peak memory grows by one tensor.
    Must be called outside inference mode.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("freeze_base_model must run outside torch.inference_mode()")
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if p.is_inference():
                mod._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=False)
            else:
                p.requires_grad_(False)
        for name, b in list(mod._buffers.items()):
            if b is not None and b.is_inference():
                mod._buffers[name] = b.clone()


def model_signature(module: nn.Module, max_tensors: int = 4) -> str:
    """Cheap identity of a model: parameter count, and the sums of a few of its tensors.

    Two loads of the same checkpoint give the same signature; another checkpoint of the
    same shape almost surely does not.
    """
    params = list(module.state_dict().items())
    total = sum(t.numel() for _, t in params)
    picks = params[:max_tensors // 2] + params[-(max_tensors // 2):]
    sums = ",".join(f"{t.detach().float().sum().item():.6e}" for _, t in picks)
    return f"{total}:{sums}"


class _CloneInput(nn.Module):
    """Runs ``inner`` on a copy of its input, so the copy autograd saves is not changed later."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x, *args, **kwargs):
        return self.inner(x.clone(), *args, **kwargs)


@contextlib.contextmanager
def backward_safe_norms(module: nn.Module):
    """Make a host text encoder differentiable while active.

    Host encoders update the residual stream in place (``x += attn(norm(x))``), which is fine
    for inference but breaks backward: the norm saved ``x`` for its gradient. Feeding each norm
    a copy keeps the saved tensor intact. Restores the original modules on exit.
    """
    swapped = []
    for name, child in list(module.named_modules()):
        if "norm" in type(child).__name__.lower() and name:
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attr, _CloneInput(child))
            swapped.append((parent, attr, child))
    try:
        yield
    finally:
        for parent, attr, child in reversed(swapped):
            setattr(parent, attr, child)


FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def check_fp8_base(mmdit: nn.Module, fp8_base: bool) -> None:
    """``fp8_base``: the frozen joint-block weights must be stored in float8 (the host then upcasts
    each layer per call). Raises a ValueError that says how to load the model that way."""
    if not fp8_base:
        return
    dtypes = {m.weight.dtype for n, m in mmdit.named_modules()
              if n.startswith("joint_blocks.") and isinstance(m, nn.Linear)}
    if not dtypes or not dtypes <= set(FP8_DTYPES):
        raise ValueError(f"fp8_base is on, but this model's joint-block weights are stored as "
                         f"{', '.join(sorted(str(d) for d in dtypes))}. Load the model with 'Load Diffusion "
                         f"Model' and weight_dtype fp8_e4m3fn (the host keeps float8 weights and upcasts each "
                         f"layer per call), or turn fp8_base off")
