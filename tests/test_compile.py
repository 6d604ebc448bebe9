"""torch_compile (sd-scripts' --torch_compile / --dynamo_backend): joint blocks run through
torch.compile with the chosen backend, give the eager results, and are eager again afterwards."""
import time

import pytest
import torch

from sd3_lora_trainer.trainer.config import TrainConfig
from sd3_lora_trainer.trainer.loop import micro_step_loss, train
from sd3_lora_trainer.trainer.run import attached
from sd3_lora_trainer.trainer.state import build_network, new_train_state, next_batch
from test_loop import _data
from tiny_mmdit import tiny_mmdit

GRAPHS = []


@torch._dynamo.register_backend(name="sd3lora_counting")
def _counting_backend(gm, example_inputs):
    """Runs the captured graph as it is, after noting that a graph was captured."""
    GRAPHS.append(gm)
    return gm.forward


def _run(steps=3, depth=3, **kw):
    model, data = tiny_mmdit(depth=depth), _data()
    cfg = TrainConfig(seed=1, network_dim=4, learning_rate=1e-2, **kw).validate()
    state = new_train_state(cfg, build_network(model, cfg))
    train(model, data, state, steps)
    return model, state


@pytest.mark.parametrize("mixed_precision,checkpointing", [("no", False), ("bf16", False), ("bf16", True)])
def test_compiled_blocks_give_the_eager_losses_and_are_restored(mixed_precision, checkpointing):
    torch._dynamo.reset()
    GRAPHS.clear()
    kw = dict(mixed_precision=mixed_precision, gradient_checkpointing=checkpointing)
    _, eager = _run(**kw)
    model, compiled = _run(**kw, torch_compile=True, dynamo_backend="sd3lora_counting")
    assert GRAPHS, "no joint block went through torch.compile"
    torch.testing.assert_close(torch.tensor(compiled.losses), torch.tensor(eager.losses), rtol=1e-5, atol=1e-6)
    assert all("forward" not in vars(block) for block in model.joint_blocks)


def _saved_bytes(**kw):
    """Bytes autograd keeps for backward after one forward of a compiled run."""
    model, data = tiny_mmdit(depth=3), _data()
    cfg = TrainConfig(seed=1, network_dim=4, mixed_precision="bf16", torch_compile=True,
                      dynamo_backend="sd3lora_counting", **kw).validate()
    state = new_train_state(cfg, build_network(model, cfg))
    total = []

    def keep(t):
        total.append(t.numel() * t.element_size())
        return t

    with attached(model, state, data), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        micro_step_loss(model, next_batch(state, data, 1), state, torch.float32)
    return sum(total)


def test_compiled_blocks_are_still_checkpointed():
    # The host's in-block checkpoint cannot be traced, so the compiled block is checkpointed from
    # outside: it must still save far less for backward than without checkpointing.
    assert _saved_bytes(gradient_checkpointing=True) < 0.5 * _saved_bytes(gradient_checkpointing=False)


def test_inductor_compiles_and_trains():
    torch._dynamo.reset()
    t0 = time.perf_counter()
    # fp32: inductor's bf16 kernels are emulated (and far slower to run) on CPUs without native
    # bf16; bf16 under compiled blocks is covered by the counting-backend tests above. Depth 2:
    # one block of each kind (a joint block, and the last one with its pre-only context half) is
    # all inductor needs to compile; a third block added about 10 s to a cold compile of ~60 s.
    _, eager = _run(steps=2, depth=2)
    _, compiled = _run(steps=2, depth=2, torch_compile=True)
    print(f"inductor: 2 steps incl. compiling in {time.perf_counter() - t0:.0f} s")
    torch.testing.assert_close(torch.tensor(compiled.losses), torch.tensor(eager.losses), rtol=2e-2, atol=1e-3)


def test_unknown_backend_is_refused_with_the_list():
    with pytest.raises(ValueError, match="dynamo_backend.*inductor"):
        TrainConfig(torch_compile=True, dynamo_backend="nope").validate()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_blocks_with_blocks_to_swap(checkpointing):
    """The swap hooks move each block's weights (``tensor.data`` re-pointed, on the CPU to its kept
    copy) around compiled blocks: same losses as eager, and no recompiling as the weights move
    (dynamo gives up compiling after a few recompiles and would silently run eager)."""
    kw = dict(mixed_precision="bf16", gradient_checkpointing=checkpointing)
    _, eager = _run(steps=4, **kw, blocks_to_swap=1)
    counts = []
    for steps, swap in ((2, 0), (4, 1)):  # twice the steps with swapping: still no more graphs
        torch._dynamo.reset()
        GRAPHS.clear()
        _, compiled = _run(steps=steps, **kw, blocks_to_swap=swap, torch_compile=True,
                           dynamo_backend="sd3lora_counting")
        counts.append(len(GRAPHS))
    torch.testing.assert_close(torch.tensor(compiled.losses), torch.tensor(eager.losses), rtol=1e-5, atol=1e-6)
    assert counts[0] > 0 and counts == [counts[0]] * 2, counts  # as many graphs as without swapping
