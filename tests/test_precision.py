"""Speed levers that must not change results: frozen weights cast once per run, the LoRA update
fused into the up matmul, the fused fp32 CPU Linear, fused AdamW, and q, k, v split by unbind."""
import contextlib
import sys

import pytest
import torch
from torch import nn

from sd3_lora_trainer.trainer import cpu_linear, precision
from sd3_lora_trainer.trainer.config import TrainConfig
from sd3_lora_trainer.trainer.lora import LoRAModule, LoRAWrapper
from sd3_lora_trainer.trainer.loop import train, training_step
from sd3_lora_trainer.trainer.run import attached
from sd3_lora_trainer.trainer.optim import build_optimizer
from sd3_lora_trainer.trainer.state import build_network, new_train_state
from test_loop import _data
from tiny_mmdit import tiny_mmdit


def _bf16_session(model, **kw):
    cfg = TrainConfig(seed=1, mixed_precision="bf16", learning_rate=1e-2, network_dim=8, **kw).validate()
    return new_train_state(cfg, build_network(model, cfg))


def _steps_and_grads(cast_once: bool, steps: int = 3):
    """Losses and final LoRA weights of a bf16 run, with the frozen weights cast once or by autocast."""
    model, data = tiny_mmdit(qk_norm=True, attn2_layers=(0,)), _data()
    state = _bf16_session(model)
    with attached(model, state, data):
        if not cast_once:
            state.network.uncast()
        assert bool(state.network.stored_weights) == cast_once
        for _ in range(steps):
            training_step(model, data, state)
    return state.losses, {k: v.clone() for k, v in state.network.state_dict().items()}


def test_casting_frozen_weights_once_is_bitwise_what_autocast_computes():
    losses_once, weights_once = _steps_and_grads(cast_once=True)
    losses_autocast, weights_autocast = _steps_and_grads(cast_once=False)
    assert losses_once == losses_autocast
    for k in weights_once:
        assert torch.equal(weights_once[k], weights_autocast[k]), k


def test_cast_weights_are_in_the_autocast_dtype_during_the_run_and_the_originals_return():
    model, data = tiny_mmdit(), _data()
    originals = {n: p for n, p in model.named_parameters()}
    state = _bf16_session(model)
    seen = []
    train(model, data, state, 1, on_step=lambda s, l: seen.append(model.joint_blocks[0].x_block.attn.qkv.base_layer.weight.dtype))
    assert seen == [torch.bfloat16]
    after = dict(model.named_parameters())
    assert after.keys() == originals.keys()
    assert all(after[n] is originals[n] and after[n].dtype == torch.float32 for n in originals)


@pytest.mark.parametrize("mixed_precision,blocks_to_swap,checkpointing,cast", [
    ("no", 0, False, False), ("bf16", 2, False, False), ("bf16", 0, False, True),
    ("bf16", 0, True, True)])  # checkpointing skips the cast only on a GPU, to keep VRAM low
def test_cast_only_under_autocast_and_without_blocks_to_swap(mixed_precision, blocks_to_swap, checkpointing, cast):
    model, data = tiny_mmdit(depth=4), _data()
    cfg = TrainConfig(network_dim=4, mixed_precision=mixed_precision, blocks_to_swap=blocks_to_swap,
                      gradient_checkpointing=checkpointing).validate()
    state = new_train_state(cfg, build_network(model, cfg))
    with attached(model, state, data):
        assert bool(state.network.stored_weights) == cast
    assert state.network.frozen_dtype is None and precision.cast_frozen_layers(model, None) == []


def test_only_plain_fp32_weights_are_cast():
    fp8 = nn.Linear(4, 4).to(torch.float8_e4m3fn)
    fp16 = nn.Linear(4, 4).half()
    patched = nn.Linear(4, 4)
    patched.weight_function = [lambda w: w]
    plain = nn.Linear(4, 4)
    saved = precision.cast_frozen_layers(nn.Sequential(fp8, fp16, patched, plain.requires_grad_(False)),
                                         torch.bfloat16)
    assert fp8.weight.dtype == torch.float8_e4m3fn and patched.weight.dtype == torch.float32
    assert fp16.weight.dtype == torch.float16  # a bf16 copy would double 16-bit weights
    assert plain.weight.dtype == torch.bfloat16 and plain.bias.dtype == torch.bfloat16
    precision.restore_layers(saved)
    assert plain.weight.dtype == torch.float32 and saved == []


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("splits", [1, 3])
def test_wrapper_output_equals_the_unfused_formula(autocast, splits):
    torch.manual_seed(0)
    base = nn.Linear(12, 24).requires_grad_(False)
    lora = LoRAModule(base, rank=4, alpha=2.0, splits=splits)
    for u in lora.ups:
        nn.init.normal_(u)
    x = torch.randn(2, 5, 12)
    ref = base(x) + 0.5 * torch.cat([(x @ d.T) @ u.T for d, u in zip(lora.downs, lora.ups)], -1) * lora.scale
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = LoRAWrapper(base, lora, multiplier=0.5)(x)
    tol = dict(atol=3e-2, rtol=3e-2) if autocast else dict(atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.float(), ref, **tol)


def test_adamw_is_fused_unless_foreach_is_asked_for():
    params = [nn.Parameter(torch.zeros(3))]
    assert build_optimizer("AdamW", [{"params": params}], 1e-3).defaults["fused"] is True
    opt = build_optimizer("AdamW", [{"params": params}], 1e-3, "foreach=True")
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]
    assert build_optimizer("AdamW", [{"params": params}], 1e-3, "fused=False").defaults["fused"] is False


def _linear_and_lora(fin=96, fout=80, rank=8):
    torch.manual_seed(0)
    base = nn.Linear(fin, fout).requires_grad_(False)
    lora = LoRAModule(base, rank=rank, alpha=4.0)
    nn.init.normal_(lora.ups[0])
    return base, lora


def _value_and_grads(base, lora, x, forward):
    """The output of ``forward`` and the gradients of x, down and up for a fixed output gradient."""
    x = x.detach().clone().requires_grad_()
    for p in (lora.downs[0], lora.ups[0]):
        p.grad = None
    out = forward(x)
    # Drawn in fp32 for every dtype: float64 draws other numbers from the same seed.
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype))
    return [t.detach().double() for t in (out, x.grad, lora.downs[0].grad, lora.ups[0].grad)]


@pytest.mark.skipif(not cpu_linear.on_x86(), reason="the fused node is for x86 CPUs")
@pytest.mark.parametrize("onednn", [False, True], ids=["MKL", "oneDNN"])
def test_fused_cpu_linear_is_as_close_to_float64_as_the_unfused_formula(onednn):
    """Value and every gradient, with the frozen products in either library (the trainer picks one
    by the CPU's make): the fused node's error against float64 is no larger than (2x) the error of
    fp32 autograd through the unfused formula."""
    if onednn and not cpu_linear.onednn_linear_available():
        pytest.skip("this torch build has no oneDNN linear")
    base, lora = _linear_and_lora()
    x = torch.randn(3, 37, 96)
    assert cpu_linear.applies(base, lora, x)
    with cpu_linear.forced_library(onednn):
        fused = _value_and_grads(base, lora, x, lambda t: cpu_linear.linear_with_lora(base, lora, t, 0.7))
    unfused = _value_and_grads(base, lora, x, lambda t: lora.delta(t, base(t), 0.7))
    base64 = nn.Linear(96, 80).double().requires_grad_(False)
    base64.load_state_dict({k: v.double() for k, v in base.state_dict().items()})
    lora.double()
    ref = _value_and_grads(base64, lora, x.double(), lambda t: lora.delta(t, base64(t), 0.7))
    for name, f, u, r in zip(("value", "x grad", "down grad", "up grad"), fused, unfused, ref):
        scale = r.abs().max()
        err_f, err_u = (f - r).abs().max() / scale, (u - r).abs().max() / scale
        assert err_f <= max(2 * err_u, 1e-6), (name, err_f.item(), err_u.item())


def test_fused_cpu_linear_only_where_it_computes_the_same_function():
    base, lora = _linear_and_lora()
    x = torch.randn(2, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not cpu_linear.applies(base, lora, x)
    assert not cpu_linear.applies(base, lora, x.double())
    patched = nn.Linear(96, 80).requires_grad_(False)
    patched.weight_function = [lambda w: w]
    assert not cpu_linear.applies(patched, lora, x)
    assert not cpu_linear.applies(nn.Linear(96, 80), lora, x)  # a trainable weight would get no gradient
    lora.rank_dropout = 0.5
    assert not cpu_linear.applies(base, lora, x)  # dropouts draw masks the fused node has not
    lora.eval()
    assert cpu_linear.applies(base, lora, x) == cpu_linear.on_x86()
    lora.fused_cpu = False
    assert not cpu_linear.applies(base, lora, x)


def test_fused_cpu_linear_runs_in_mkl_on_intel_and_in_onednn_elsewhere(monkeypatch):
    """MKL is the faster library on Intel CPUs, oneDNN on AMD ones (README, fp32 levers); a forced
    library holds only inside its block."""
    for vendor, onednn in (("GenuineIntel", False), ("AuthenticAMD", True), ("", True)):
        monkeypatch.setattr(cpu_linear, "cpu_vendor", lambda v=vendor: v)
        cpu_linear._onednn_on_this_cpu.cache_clear()
        assert cpu_linear.frozen_matmuls_in_onednn() == (onednn and cpu_linear.onednn_linear_available()), vendor
        with cpu_linear.forced_library(False):
            assert not cpu_linear.frozen_matmuls_in_onednn()
        assert cpu_linear.frozen_matmuls_in_onednn() == (onednn and cpu_linear.onednn_linear_available())
    cpu_linear._onednn_on_this_cpu.cache_clear()
    monkeypatch.undo()
    if sys.platform.startswith("linux") and cpu_linear.on_x86():
        assert cpu_linear.cpu_vendor(), "no vendor_id read from /proc/cpuinfo"


def test_fp32_training_with_the_fused_cpu_linear_follows_the_unfused_formula():
    """Three fp32 steps, fused (the default on x86) and unfused: the same losses to 1e-5, and LoRA
    weights to 1e-4 of steps of about 1e-2 (AdamW divides by the root of the squared gradients, so a
    rounding difference in a gradient near zero moves its weight by up to a step's fraction)."""
    runs = []
    for fused in (True, False):
        model, data = tiny_mmdit(qk_norm=True, attn2_layers=(0,)), _data()
        cfg = TrainConfig(seed=1, learning_rate=1e-2, network_dim=8).validate()
        state = new_train_state(cfg, build_network(model, cfg))
        state.network.set_fused_cpu_linear(fused)
        with attached(model, state, data):
            qkv = model.joint_blocks[0].x_block.attn.qkv
            out = qkv(torch.zeros(1, qkv.base_layer.in_features, requires_grad=True))
            assert (type(out.grad_fn).__name__ == "_LinearWithLoRABackward") == (
                fused and cpu_linear.on_x86())  # the wrapper takes the fused node
            for _ in range(3):
                training_step(model, data, state)
        runs.append((state.losses, {k: v.clone() for k, v in state.network.state_dict().items()}))
    (losses_f, weights_f), (losses_u, weights_u) = runs
    torch.testing.assert_close(torch.tensor(losses_f), torch.tensor(losses_u), atol=1e-5, rtol=1e-5)
    for k in weights_f:
        torch.testing.assert_close(weights_f[k], weights_u[k], atol=1e-4, rtol=0)


def test_qkv_split_by_unbind_trains_bitwise_the_same_and_the_hosts_split_is_restored():
    """Training swaps the host MMDiT's ``split_qkv`` (whose indexing zero-fills a qkv-sized gradient
    per q, k and v) for one ``unbind``: three fp32 steps give bitwise the same losses and LoRA
    weights, the swapped function is the one used, and the host's is back afterwards."""
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit_module
    from sd3_lora_trainer.nodes.host import attention_for_training, split_qkv_by_unbind

    hosts_own = mmdit_module.split_qkv
    qkv = torch.randn(2, 7, 3 * 4 * 8, requires_grad=True)
    for mine, theirs in zip(split_qkv_by_unbind(qkv, 8), hosts_own(qkv, 8)):
        assert torch.equal(mine, theirs) and mine.shape == theirs.shape == (2, 7, 4, 8)
        assert type(mine.grad_fn).__name__ == "UnbindBackward0"  # not select: no zero-filled gradients
    runs = []
    for swapped in (True, False):
        model, data = tiny_mmdit(qk_norm=True, attn2_layers=(0,)), _data()
        cfg = TrainConfig(seed=1, learning_rate=1e-2, network_dim=8).validate()
        state = new_train_state(cfg, build_network(model, cfg))
        with attention_for_training(False) if swapped else contextlib.nullcontext():
            assert (mmdit_module.split_qkv is split_qkv_by_unbind) == swapped
            with attached(model, state, data):
                for _ in range(3):
                    training_step(model, data, state)
        assert mmdit_module.split_qkv is hosts_own
        runs.append((state.losses, state.network.state_dict()))
    (losses_s, weights_s), (losses_h, weights_h) = runs
    assert losses_s == losses_h
    assert all(torch.equal(weights_s[k], weights_h[k]) for k in weights_h)
