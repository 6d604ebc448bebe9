"""``blocks_to_swap``: keep N joint blocks' frozen weights in CPU memory and bring each block to the
device just before it runs, in the forward and again in the backward (sd-scripts' option of the
same name, ``library/custom_offloading_utils.py``).

The device always holds a window of ``W = num_blocks - N`` consecutive blocks. Forward, block i
runs on the window ``[i, i + W)``; once it is done it leaves for the CPU and block ``i + W`` starts
coming in, so that copy overlaps the compute of the W - 1 blocks before it (on a side stream
where CUDA exists). Backward walks the blocks downwards, and the window slides back: once block
i's backward is done it leaves and block ``i - W`` comes in. After one forward + backward the
placement is the initial one again (blocks ``0..W-1`` on the device).

The schedule is plain functions of (num_blocks, blocks_to_swap); :class:`BlockSwapper` runs it
with module hooks and a :class:`Mover` that does the copies. Only frozen tensors move: the
LoRA's trainable parameters (which sit inside the blocks once attached) stay where the optimiser
expects them. Frozen weights keep one CPU copy for good, so sending a block back costs no copy.
"""
from __future__ import annotations

import contextlib

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn


class Swap(NamedTuple):
    """After a block is done: move block ``out`` to the CPU and start moving block ``into`` to the device."""

    out: int
    into: int


def check_blocks_to_swap(num_blocks: int, blocks_to_swap: int) -> None:
    """Raise a ValueError unless 0 <= blocks_to_swap <= num_blocks - 2 (the device must hold two
    blocks: the one running and the one being fetched)."""
    if not 0 <= blocks_to_swap <= num_blocks - 2:
        raise ValueError(f"blocks_to_swap must be between 0 and {num_blocks - 2} for a model with "
                         f"{num_blocks} joint blocks (got {blocks_to_swap}); 0 turns swapping off")


def initial_offloaded(num_blocks: int, blocks_to_swap: int) -> List[int]:
    """Blocks that live on the CPU before a forward: the last ``blocks_to_swap``."""
    check_blocks_to_swap(num_blocks, blocks_to_swap)
    return list(range(num_blocks - blocks_to_swap, num_blocks))


def forward_swap_after(num_blocks: int, blocks_to_swap: int, i: int) -> Optional[Swap]:
    """The move to start once block i's forward is done, or None (the window has reached the end)."""
    window = num_blocks - blocks_to_swap
    return Swap(i, i + window) if blocks_to_swap and i + window < num_blocks else None


def backward_swap_after(num_blocks: int, blocks_to_swap: int, i: int) -> Optional[Swap]:
    """The move to start once block i's backward is done, or None (the window has reached block 0)."""
    window = num_blocks - blocks_to_swap
    return Swap(i, i - window) if blocks_to_swap and i - window >= 0 else None


def step_schedule(num_blocks: int, blocks_to_swap: int) -> List[Tuple[str, int]]:
    """Every mover call of one forward + backward, in order: ("wait", i) before block i runs (forward,
    then again before its backward), ("to_cpu", i) and ("to_device", j) for each swap.

    Example:
        >>> step_schedule(3, 1)[:4]
        [('wait', 0), ('to_cpu', 0), ('to_device', 2), ('wait', 1)]
    """
    check_blocks_to_swap(num_blocks, blocks_to_swap)
    ops: List[Tuple[str, int]] = []
    for i in range(num_blocks):
        ops.append(("wait", i))
        swap = forward_swap_after(num_blocks, blocks_to_swap, i)
        if swap:
            ops += [("to_cpu", swap.out), ("to_device", swap.into)]
    for i in reversed(range(num_blocks)):
        ops.append(("wait", i))
        swap = backward_swap_after(num_blocks, blocks_to_swap, i)
        if swap:
            ops += [("to_cpu", swap.out), ("to_device", swap.into)]
    return ops


def _frozen_tensors(module: nn.Module) -> List[Tuple[nn.Module, str, torch.Tensor]]:
    """(owner, name, tensor) of every frozen parameter and buffer: what a swap moves."""
    out = []
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None and not p.requires_grad:
                out.append((m, name, p))
        for name, b in m._buffers.items():
            if b is not None:
                out.append((m, name, b))
    return out


class Mover:
    """Copies one block's frozen tensors between the CPU and ``device``.

    ``to_device`` may return before the copy is done (it runs on a side stream under CUDA);
    ``wait`` makes the compute stream wait for it. The CPU copy of each tensor is made once (pinned
    under CUDA) and kept, so ``to_cpu`` only points the tensors back at it: frozen weights never
    change. Tensors are remembered by object, so wrapping layers later (attaching a LoRA) is fine.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._pairs: Dict[int, List[Tuple[torch.Tensor, torch.Tensor]]] = {}
        self._events: Dict[int, object] = {}

    def keep_cpu_copy(self, idx: int, block: nn.Module) -> None:
        """Remember block idx's frozen tensors with a CPU copy of each (wherever they are now)."""
        pairs = []
        for _, _, t in _frozen_tensors(block):
            cpu = t.detach().to("cpu")
            pairs.append((t, cpu.pin_memory() if self.cuda else cpu))
        self._pairs[idx] = pairs

    def to_device(self, idx: int, block: nn.Module) -> None:
        with torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext():
            for t, cpu in self._pairs[idx]:
                t.data = cpu.to(self.device, non_blocking=True)
            if self.cuda:
                event = torch.cuda.Event()
                event.record(self.stream)
                self._events[idx] = event

    def to_cpu(self, idx: int, block: nn.Module) -> None:
        main = torch.cuda.current_stream(self.device) if self.cuda else None
        for t, cpu in self._pairs[idx]:
            if main is not None and t.device.type == "cuda":
                # Made on the side stream, read by the compute stream: the allocator must not hand
                # this memory out again before the compute stream is past its last use.
                t.data.record_stream(main)
            t.data = cpu

    def wait(self, idx: int, block: nn.Module) -> None:
        event = self._events.pop(idx, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)


class BlockSwapper:
    """Runs the swap schedule on ``blocks`` (e.g. ``mmdit.joint_blocks``) with module and grad hooks.

    Args:
        blocks: the joint blocks, in forward order; called as ``block(*tensors, **kwargs)``.
        blocks_to_swap: N, how many blocks live on the CPU at any time.
        mover: does the copies (:class:`Mover`, or a stand-in that records calls in tests).

    Backward timing comes from a grad hook on each block's outputs: once all their gradients exist,
    the block above has finished its backward (swap it out) and this block's is about to run (wait
    for its weights). The last block's backward is waited for when the loss's gradient reaches it.
    Blocks must not be re-run by a checkpoint wrapper outside them (the trainer's checkpointing
    wraps the blocks' forwards, inside the module call, which is fine).
    """

    def __init__(self, blocks: Sequence[nn.Module], blocks_to_swap: int, mover):
        check_blocks_to_swap(len(blocks), blocks_to_swap)
        self.blocks, self.n, self.mover = list(blocks), blocks_to_swap, mover
        self.on_device = set(range(len(self.blocks))) - set(initial_offloaded(len(self.blocks), blocks_to_swap))
        self._handles = []

    def install(self) -> "BlockSwapper":
        """Move the blocks to their initial places (wherever they are now) and hook them. Returns self."""
        for i, block in enumerate(self.blocks):
            self.mover.keep_cpu_copy(i, block)
            if i in self.on_device:
                self.mover.to_device(i, block)
            else:
                self.mover.to_cpu(i, block)
            self._handles.append(block.register_forward_pre_hook(self._pre_forward(i), with_kwargs=True))
            self._handles.append(block.register_forward_hook(self._post_forward(i)))
        return self

    def remove(self) -> None:
        """Remove the hooks (the blocks stay where they are)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _move(self, swap: Optional[Swap]) -> None:
        if swap is None:
            return
        self.mover.to_cpu(swap.out, self.blocks[swap.out])
        self.on_device.discard(swap.out)
        self.mover.to_device(swap.into, self.blocks[swap.into])
        self.on_device.add(swap.into)

    def _restore_initial(self) -> None:
        """Undo a forward that had no backward (e.g. a no-grad preview): blocks 0..W-1 back on the device."""
        want = set(range(len(self.blocks) - self.n))
        for i in sorted(self.on_device - want):
            self.mover.to_cpu(i, self.blocks[i])
        for i in sorted(want - self.on_device):
            self.mover.to_device(i, self.blocks[i])
        self.on_device = want

    def _pre_forward(self, i: int):
        def hook(module, args, kwargs):
            if i == 0:
                self._restore_initial()
            self.mover.wait(i, module)
        return hook

    def _post_forward(self, i: int):
        def hook(module, args, output):
            self._move(forward_swap_after(len(self.blocks), self.n, i))
            outputs = [t for t in _tensors(output, {}) if t.requires_grad]
            if torch.is_grad_enabled() and outputs:
                torch.autograd.graph.register_multi_grad_hook(outputs, lambda grads: self._backward_reached(i))
        return hook

    def _backward_reached(self, i: int) -> None:
        """All gradients of block i's outputs exist: block i + 1's backward is done and block i's starts."""
        if i + 1 < len(self.blocks):
            self._move(backward_swap_after(len(self.blocks), self.n, i + 1))
        self.mover.wait(i, self.blocks[i])


def _tensors(args, kwargs) -> List[torch.Tensor]:
    """The tensors among positional arguments / outputs (tuples flattened) and keyword values."""
    items = list(args) if isinstance(args, (tuple, list)) else [args]
    items += list(kwargs.values())
    return [t for t in items if isinstance(t, torch.Tensor)]
