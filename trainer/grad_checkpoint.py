"""Gradient checkpointing of the joint blocks: each block's forward is recomputed in backward
instead of keeping its activations. The trainer wraps the blocks' forwards itself and keeps the
host MMDiT's own switch (``use_checkpoint``, a non-reentrant checkpoint inside each block) off,
for two reasons:

- The LoRA dropouts draw from the training state's generator, which torch's checkpoint does not
  stash. Recomputed, a block would draw other masks: gradients for masks the loss never saw, and
  with ``module_dropout`` another graph (torch's CheckpointError). Here the recomputation replays
  the generator state of the block's forward and then puts the generator back.
- A non-reentrant checkpoint still builds the block's autograd graph in the forward: one small
  node per op, alive until the backward. On the CPU these small long-lived allocations settle
  among the block's large temporaries in glibc's heap and fragment it (the SD3.5-Medium memory
  benchmark peaked 86 MB higher). The reentrant form runs the forward without autograd and keeps
  one node per block.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.utils.checkpoint


def checkpointed(forward: Callable, generator: Optional[torch.Generator], reentrant: bool = True) -> Callable:
    """``forward`` (a joint block's, called as the host calls it) recomputed in backward.

    ``reentrant=False`` for a compiled forward: the reentrant form runs the forward with autograd
    off and the recomputation with it on, which dynamo would compile as two graphs.
    """
    def run(*args, **kwargs):
        kwargs["use_checkpoint"] = False  # the host's own checkpoint inside the block stays off
        if not torch.is_grad_enabled():  # nothing to recompute for (a validation or preview pass)
            return forward(*args, **kwargs)
        # Tensors given by keyword (the host passes c=...) become checkpoint inputs too: the
        # reentrant form takes gradients only through its inputs, not through closures.
        names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
        rest = {k: v for k, v in kwargs.items() if k not in names}
        n = len(args)

        def block(*inputs):  # the positional args, the keyword tensors, then (reentrant) the anchor
            return forward(*inputs[:n], **dict(zip(names, inputs[n:n + len(names)])), **rest)

        inputs = (*args, *(kwargs[k] for k in names))
        replay = _replaying(block, generator)
        if not reentrant:
            return torch.utils.checkpoint.checkpoint(replay, *inputs, use_reentrant=False)
        # A reentrant checkpoint's output needs a gradient only when an input has one; the first
        # block's inputs come from frozen layers, so a zero-size leaf stands in (it gets none).
        anchor = torch.empty(0, requires_grad=True)
        return torch.utils.checkpoint.checkpoint(replay, *inputs, anchor, use_reentrant=True)
    return run


def _replaying(fn: Callable, generator: Optional[torch.Generator]) -> Callable:
    """``fn``, whose later calls (the recomputation) draw from ``generator`` what its first call
    drew, and leave ``generator`` as they found it (where the whole forward left it)."""
    if generator is None:  # the global RNG, which torch's checkpoint stashes itself
        return fn
    at_forward = []

    def call(*args):
        if not at_forward:
            at_forward.append(generator.get_state())
            return fn(*args)
        now = generator.get_state()
        generator.set_state(at_forward[0])
        try:
            return fn(*args)
        finally:
            generator.set_state(now)
    return call
