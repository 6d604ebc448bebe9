"""Optimisers, by sd-scripts' ``optimizer_type`` names.

Each optimiser is a well-kept implementation: torch's AdamW/SGD, bitsandbytes' AdamW8bit,
transformers' Adafactor, prodigyopt's Prodigy, lion-pytorch's Lion; the schedules are in
``schedules.py``.
"""
from __future__ import annotations

import ast
import inspect
from typing import Dict, Iterable, List, Optional, Tuple

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


def _optimizer_class(optimizer_type: str):
    """The class behind an sd-scripts ``optimizer_type`` name (its package imported now)."""
    if optimizer_type == "AdamW":
        return torch.optim.AdamW
    if optimizer_type == "SGDNesterov":
        return torch.optim.SGD
    if optimizer_type == "AdamW8bit":
        return _require("bitsandbytes", "AdamW8bit", "pip install bitsandbytes").optim.AdamW8bit
    if optimizer_type == "Adafactor":
        from transformers.optimization import Adafactor

        return Adafactor
    if optimizer_type == "Prodigy":
        return _require("prodigyopt", "Prodigy", "pip install prodigyopt").Prodigy
    if optimizer_type == "Lion":
        return _require("lion_pytorch", "Lion", "pip install lion-pytorch").Lion
    raise ValueError(f"unknown optimizer_type {optimizer_type!r}; use AdamW, AdamW8bit, Adafactor, Prodigy, "
                     f"Lion or SGDNesterov")


def _optimizer_kwargs(optimizer_type: str, groups: List[dict], lr: float, extra_args: str) -> Dict[str, object]:
    """The keyword arguments the optimiser gets: sd-scripts' defaults, then ``optimizer_args``."""
    kwargs = parse_optimizer_args(extra_args)
    for fixed in ("params", "lr"):
        if fixed in kwargs:
            raise ValueError(f"optimizer_args: {fixed} is set by the trainer (learning_rate for lr); remove "
                             f"{fixed}={kwargs[fixed]!r}")
    if optimizer_type == "AdamW":
        kwargs.setdefault("weight_decay", 0.01)
        if "foreach" not in kwargs:
            # One kernel for all LoRA tensors instead of ~10 small ops per tensor; on CPU and CUDA.
            kwargs.setdefault("fused", _fusable(groups))
    elif optimizer_type == "SGDNesterov":
        if "nesterov" in kwargs:
            raise ValueError("optimizer_args: SGDNesterov always uses nesterov=True; remove nesterov=...")
        kwargs.setdefault("momentum", 0.9)
        kwargs["nesterov"] = True
    elif optimizer_type == "Adafactor":
        # sd-scripts' defaults: an external lr, no relative step.
        kwargs.setdefault("scale_parameter", False)
        kwargs.setdefault("relative_step", False)
        kwargs.setdefault("warmup_init", False)
        return dict(kwargs, lr=None if kwargs["relative_step"] else lr)
    return dict(kwargs, lr=lr)


def build_optimizer(optimizer_type: str, groups: List[dict], lr: float, extra_args: str = "") -> torch.optim.Optimizer:
    """The optimiser ``optimizer_type`` over ``groups``; ``extra_args`` as sd-scripts' optimizer_args."""
    cls = _optimizer_class(optimizer_type)
    return cls(groups, **_optimizer_kwargs(optimizer_type, groups, lr, extra_args))


def _type_problem(name: str, value, default) -> Optional[str]:
    """Why ``value`` cannot stand where the optimiser's signature has ``default`` (None: it can)."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if default is None or default is inspect.Parameter.empty:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else f"{name}={value!r} must be True or False"
    if number(default):
        return None if number(value) else f"{name}={value!r} must be a number (the default is {default!r})"
    if isinstance(default, tuple):
        if not isinstance(value, tuple) or len(value) != len(default) or not all(map(number, value)):
            return (f"{name}={value!r} must be a tuple of {len(default)} numbers like {default!r} (a single value "
                    f"in brackets, (0.9), is just a number)")
    return None


def check_optimizer_args(optimizer_type: str, extra_args: str) -> None:
    """Refuse ``optimizer_args`` that ``optimizer_type`` would not accept, before any training: an
    unknown key, a value of the wrong type (checked against the optimiser's own defaults), or a
    value it rejects when built and stepped once on a small tensor.

    Raises:
        ValueError: naming optimizer_args, the key and the accepted form.
    """
    cls = _optimizer_class(optimizer_type)
    given = parse_optimizer_args(extra_args)
    signature = inspect.signature(cls.__init__)
    params = {n: p.default for n, p in signature.parameters.items() if n not in ("self", "params")}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    for name, value in given.items():
        if name not in params and not takes_any:
            raise ValueError(f"optimizer_args: {optimizer_type} has no argument {name!r}; it takes "
                             f"{', '.join(n for n in params if n != 'lr')}")
        problem = _type_problem(name, value, params.get(name))
        if problem:
            raise ValueError(f"optimizer_args for {optimizer_type}: {problem}")
    probe = nn.Parameter(torch.ones(64))
    groups = [{"params": [probe], "lr": 1e-4}]
    kwargs = _optimizer_kwargs(optimizer_type, groups, 1e-4, extra_args)
    try:
        optimizer = cls(groups, **kwargs)
        probe.grad = torch.full_like(probe, 1e-3)
        optimizer.step()
    except (TypeError, ValueError, RuntimeError, AssertionError) as e:
        raise ValueError(f"optimizer_args {extra_args!r}: {optimizer_type} refused them ({type(e).__name__}: {e}); "
                         f"see its documentation for the accepted values") from e


def _require(module: str, what: str, fix: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ValueError(f"optimizer_type {what} needs the {module} package, which does not import here "
                         f"({e}). Install it ({fix}) or pick another optimizer_type") from e
