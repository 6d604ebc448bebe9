"""blocks_to_swap schedule: the pure functions, and the hooks running it on real torch modules.

The "device" here is a stand-in: a mover that records its calls and flags each block as
resident or not; the blocks check that flag whenever they compute, forward and backward.
"""
import pytest
import torch
from torch import nn

from sd3_lora_trainer.trainer.offload import (BlockSwapper, Mover, Swap, backward_swap_after, check_blocks_to_swap,
                                              forward_swap_after, initial_offloaded, step_schedule)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class _CheckResident(torch.autograd.Function):
    """Identity whose backward asserts that ``block`` is resident (its weights are needed then)."""

    @staticmethod
    def forward(ctx, x, block):
        ctx.block = block
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        assert ctx.block.resident, f"block {ctx.block.index} ran its backward while on the CPU"
        return grad, None


class JointLikeBlock(nn.Module):
    """(context, x) -> (context, x) like an MMDiT joint block: a frozen Linear per stream and a
    trainable LoRA-like parameter. Asserts it is resident whenever it computes."""

    def __init__(self, index: int, dim: int = 8, last: bool = False):
        super().__init__()
        self.index, self.last, self.resident = index, last, False
        self.ctx = nn.Linear(dim, dim).requires_grad_(False)
        self.img = nn.Linear(dim, dim).requires_grad_(False)
        self.lora = nn.Parameter(torch.zeros(dim))

    def forward(self, context, x, c=None):
        assert self.resident, f"block {self.index} ran its forward while on the CPU"
        # Backward of these identities runs last / first in this block's backward.
        x = _CheckResident.apply(x, self)
        context = _CheckResident.apply(context, self) if context.requires_grad else context
        mixed = torch.tanh(self.img(x) + self.ctx(context).mean(1, keepdim=True)) + self.lora
        out_ctx = None if self.last else torch.tanh(self.ctx(context)) + self.lora
        out_x = _CheckResident.apply(x + mixed, self)
        return out_ctx, out_x


class RecordingMover(Mover):
    """Stand-in device: records every call and sets the block's ``resident`` flag."""

    def __init__(self):
        super().__init__("cpu")
        self.log = []

    def to_device(self, idx, block):
        super().to_device(idx, block)
        self.log.append(("to_device", idx))
        block.resident = True

    def to_cpu(self, idx, block):
        super().to_cpu(idx, block)
        self.log.append(("to_cpu", idx))
        block.resident = False

    def wait(self, idx, block):
        super().wait(idx, block)
        self.log.append(("wait", idx))


def _model(num_blocks):
    return nn.ModuleList(JointLikeBlock(i, last=(i == num_blocks - 1)) for i in range(num_blocks))


def _run(blocks, grad=True):
    context = torch.randn(2, 3, 8)
    x = torch.randn(2, 5, 8)
    with torch.set_grad_enabled(grad):
        for block in blocks:
            context, x = block(context, x, c=None)
        if grad:
            x.square().mean().backward()


@pytest.mark.parametrize("num_blocks,n", [(6, 1), (6, 2), (6, 3), (6, 4), (8, 5), (4, 0)])
def test_hooks_follow_the_schedule_and_blocks_are_resident_when_used(num_blocks, n):
    blocks = _model(num_blocks)
    mover = RecordingMover()
    swapper = BlockSwapper(blocks, n, mover).install()
    assert [b.resident for b in blocks] == [i not in initial_offloaded(num_blocks, n) for i in range(num_blocks)]
    mover.log.clear()  # the initial placement is not part of a step
    for _ in range(2):  # a second step starts from the placement the first one left
        _run(blocks)
        assert mover.log == step_schedule(num_blocks, n)
        assert sum(b.resident for b in blocks) == num_blocks - n
        mover.log.clear()
    swapper.remove()
    assert all(b.lora.grad is not None for b in blocks)


def test_a_forward_without_backward_is_undone_before_the_next_forward():
    blocks = _model(6)
    mover = RecordingMover()
    BlockSwapper(blocks, 2, mover).install()
    _run(blocks, grad=False)  # e.g. a preview: the window ends at the last blocks
    assert [b.resident for b in blocks] == [False, False, True, True, True, True]
    mover.log.clear()
    _run(blocks)
    restore = [("to_cpu", 4), ("to_cpu", 5), ("to_device", 0), ("to_device", 1)]
    assert mover.log == restore + step_schedule(6, 2)


def test_schedule_functions():
    assert initial_offloaded(10, 7) == [3, 4, 5, 6, 7, 8, 9]
    assert forward_swap_after(10, 7, 0) == Swap(0, 3)
    assert forward_swap_after(10, 7, 6) == Swap(6, 9)
    assert forward_swap_after(10, 7, 7) is None
    assert backward_swap_after(10, 7, 9) == Swap(9, 6)
    assert backward_swap_after(10, 7, 3) == Swap(3, 0)
    assert backward_swap_after(10, 7, 2) is None
    assert forward_swap_after(10, 0, 0) is None and backward_swap_after(10, 0, 9) is None
    assert step_schedule(3, 1) == [("wait", 0), ("to_cpu", 0), ("to_device", 2), ("wait", 1), ("wait", 2),
                                   ("wait", 2), ("to_cpu", 2), ("to_device", 0), ("wait", 1), ("wait", 0)]


@pytest.mark.parametrize("n", [-1, 5, 6])
def test_bad_blocks_to_swap_names_the_range(n):
    with pytest.raises(ValueError, match="between 0 and 4"):
        check_blocks_to_swap(6, n)


def test_only_frozen_tensors_move_and_cpu_copies_are_kept():
    blocks = _model(4)
    mover = RecordingMover()
    BlockSwapper(blocks, 2, mover).install()
    lora_ptrs = [b.lora.data_ptr() for b in blocks]
    weight_ptr = blocks[3].img.weight.data_ptr()
    _run(blocks)
    assert [b.lora.data_ptr() for b in blocks] == lora_ptrs  # trainable parameters never move
    assert blocks[3].img.weight.data_ptr() == weight_ptr  # the kept CPU copy is what the block uses
    moved = {id(t) for t, _ in mover._pairs[3]}
    assert id(blocks[3].img.weight) in moved and id(blocks[3].lora) not in moved
