"""Optimisers, by sd-scripts' ``optimizer_type`` names.

Each optimiser is a well-kept implementation: torch's AdamW/SGD, bitsandbytes' AdamW8bit,
transformers' Adafactor, prodigyopt's Prodigy, lion-pytorch's Lion; the schedules are in
``schedules.py``.
"""
from __future__ import annotations

import ast
from typing import Dict, Iterable, List, Tuple

import torch
from torch import nn


def parse_optimizer_args(text: str) -> Dict[str, object]:
    """sd-scripts' ``optimizer_args``: "key=value" pairs separated by spaces or commas, values as
    Python literals, e.g. ``"weight_decay=0.01 betas=(0.9,0.99)"``.

    Example:
        >>> parse_optimizer_args("weight_decay=0.1 relative_step=False")
        {'weight_decay': 0.1, 'relative_step': False}
    """
    args: Dict[str, object] = {}
    for item in _split_args(text or ""):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"optimizer_args: {item!r} is not key=value (e.g. weight_decay=0.01)")
        try:
            args[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            args[key.strip()] = value.strip()  # a bare word such as an enum name
    return args


def _split_args(text: str) -> List[str]:
    """Split on spaces/commas that are outside brackets, so betas=(0.9, 0.99) stays whole."""
    items, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch in " ,\n" and depth == 0:
            if current.strip():
                items.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        items.append(current.strip())
    return items


def param_groups(named: Iterable[Tuple[str, nn.Parameter]], lr: float, loraplus_lr_ratio=None) -> List[dict]:
    """One group at ``lr``; with LoRA+ the up (B) matrices form a second group at lr × ratio."""
    named = list(named)
    if not loraplus_lr_ratio:
        return [{"params": [p for _, p in named], "lr": lr}]
    ups = [p for n, p in named if ".ups." in n]
    downs = [p for n, p in named if ".ups." not in n]
    return [{"params": downs, "lr": lr}, {"params": ups, "lr": lr * loraplus_lr_ratio}]


def _fusable(groups: List[dict]) -> bool:
    """torch's fused AdamW takes floating-point parameters on the CPU or a CUDA device."""
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def build_optimizer(optimizer_type: str, groups: List[dict], lr: float, extra_args: str = "") -> torch.optim.Optimizer:
    """The optimiser ``optimizer_type`` over ``groups``; ``extra_args`` as sd-scripts' optimizer_args."""
    kwargs = parse_optimizer_args(extra_args)
    if optimizer_type == "AdamW":
        kwargs.setdefault("weight_decay", 0.01)
        if "foreach" not in kwargs:
            # One kernel for all LoRA tensors instead of ~10 small ops per tensor; on CPU and CUDA.
            kwargs.setdefault("fused", _fusable(groups))
        return torch.optim.AdamW(groups, lr=lr, **kwargs)
    if optimizer_type == "SGDNesterov":
        kwargs.setdefault("momentum", 0.9)
        return torch.optim.SGD(groups, lr=lr, nesterov=True, **kwargs)
    if optimizer_type == "AdamW8bit":
        bnb = _require("bitsandbytes", "AdamW8bit", "pip install bitsandbytes")
        return bnb.optim.AdamW8bit(groups, lr=lr, **kwargs)
    if optimizer_type == "Adafactor":
        from transformers.optimization import Adafactor

        # sd-scripts' defaults: an external lr, no relative step.
        kwargs.setdefault("scale_parameter", False)
        kwargs.setdefault("relative_step", False)
        kwargs.setdefault("warmup_init", False)
        return Adafactor(groups, lr=None if kwargs["relative_step"] else lr, **kwargs)
    if optimizer_type == "Prodigy":
        prodigy = _require("prodigyopt", "Prodigy", "pip install prodigyopt")
        return prodigy.Prodigy(groups, lr=lr, **kwargs)
    if optimizer_type == "Lion":
        lion = _require("lion_pytorch", "Lion", "pip install lion-pytorch")
        return lion.Lion(groups, lr=lr, **kwargs)
    raise ValueError(f"unknown optimizer_type {optimizer_type!r}; use AdamW, AdamW8bit, Adafactor, Prodigy, "
                     f"Lion or SGDNesterov")


def _require(module: str, what: str, fix: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ValueError(f"optimizer_type {what} needs the {module} package, which does not import here "
                         f"({e}). Install it ({fix}) or pick another optimizer_type") from e
