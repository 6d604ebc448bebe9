"""Nested state (an optimizer's ``state_dict()``, a scheduler's) as JSON text plus a flat dict of
tensors, and back, exactly: no pickle, and nothing an optimizer keeps is turned into something else.

Optimizers keep tensors in more places than ``state[i][name]`` (bitsandbytes' AdamW8bit nests
them in ``state[i]["__bnb_optimizer_quant_state__"]``), tuples in their param groups (``betas``,
Adafactor's ``eps``) and integer keys (the parameter indices). JSON has none of these, so they
are written as tagged objects:

- a tensor as ``{"__tensor__": key}``, its data stored under ``key`` in the tensor dict;
- a tuple as ``{"__tuple__": [...]}``;
- a dict with a key that is not a string as ``{"__items__": [[key, value], ...]}``.

Example:
    >>> tree, tensors = split({"state": {0: {"step": 3, "exp_avg": torch.zeros(2)}}, "betas": (0.9, 0.99)})
    >>> tree
    {'state': {'__items__': [[0, {'step': 3, 'exp_avg': {'__tensor__': 'state/0/exp_avg'}}]]}, 'betas': {'__tuple__': [0.9, 0.99]}}
    >>> join(tree, tensors)["state"][0]["exp_avg"]
    tensor([0., 0.])
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

TENSOR, TUPLE, ITEMS = "__tensor__", "__tuple__", "__items__"


def split(tree, prefix: str = "") -> Tuple[object, Dict[str, torch.Tensor]]:
    """(JSON-able tree, {key: detached CPU tensor}) for ``tree``; tensor keys are the paths to them."""
    tensors: Dict[str, torch.Tensor] = {}

    def visit(node, path: str):
        if torch.is_tensor(node):
            key, n = path or "tensor", 1
            while key in tensors:  # paths are unique unless names contain "/": number the rest
                key, n = f"{path}#{n}", n + 1
            tensors[key] = node.detach().cpu().clone().contiguous()
            return {TENSOR: key}
        if isinstance(node, tuple):
            return {TUPLE: [visit(v, f"{path}/{i}") for i, v in enumerate(node)]}
        if isinstance(node, list):
            return [visit(v, f"{path}/{i}") for i, v in enumerate(node)]
        if isinstance(node, dict):
            if all(isinstance(k, str) for k in node):
                return {k: visit(v, f"{path}/{k}" if path else k) for k, v in node.items()}
            return {ITEMS: [[k, visit(v, f"{path}/{k}" if path else str(k))] for k, v in node.items()]}
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"cannot store a {type(node).__name__} at {path or 'the top'} of a training state "
                        f"(only tensors, numbers, strings, lists, tuples and dicts)")

    return visit(tree, prefix), tensors


def join(tree, tensors: Dict[str, torch.Tensor]):
    """The tree :func:`split` took apart, with its tensors put back (the tensors in ``tensors``
    themselves, not copies).

    Raises:
        KeyError: naming a tensor the tree refers to that ``tensors`` lacks.
    """
    if isinstance(tree, list):
        return [join(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if set(tree) == {TENSOR}:
        return tensors[tree[TENSOR]]
    if set(tree) == {TUPLE}:
        return tuple(join(v, tensors) for v in tree[TUPLE])
    if set(tree) == {ITEMS}:
        return {k: join(v, tensors) for k, v in tree[ITEMS]}
    return {k: join(v, tensors) for k, v in tree.items()}
