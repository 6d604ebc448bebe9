"""sd3_train_network.py options: each one changes what training does, checked against references."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sd3_lora_trainer.trainer import flow
from sd3_lora_trainer.trainer.batches import EncodedData
from sd3_lora_trainer.trainer.config import LR_SCHEDULERS, OPTIMIZERS, TrainConfig
from sd3_lora_trainer.trainer.loop import micro_step_loss, train
from sd3_lora_trainer.trainer.optim import parse_optimizer_args
from sd3_lora_trainer.trainer.run import attached
from sd3_lora_trainer.trainer.schedules import build_scheduler
from sd3_lora_trainer.trainer.state import build_network, new_train_state, next_batch
from tiny_mmdit import tiny_mmdit


def _data(n=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    return EncodedData(latents=torch.randn(n, 16, 8, 8, generator=g), context=torch.randn(n, 5, 64, generator=g),
                       pooled=torch.randn(n, 32, generator=g))


def _run(steps=3, **kw):
    model, data = tiny_mmdit(), _data()
    cfg = TrainConfig(**dict(dict(network_dim=4, network_alpha=4, learning_rate=1e-3, seed=5), **kw)).validate()
    state = new_train_state(cfg, build_network(model, cfg))
    train(model, data, state, steps)
    return state


def _weights(state):
    return torch.cat([p.detach().float().flatten() for p in state.network.parameters()])


# --- loss types and Huber schedules (sd-scripts' conditional_loss / get_huber_threshold_if_needed)

def test_elementwise_losses_match_sd_scripts_formulas():
    p, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    c = torch.tensor([0.1, 0.5, 1.0])
    cb = c.view(-1, 1, 1, 1)
    torch.testing.assert_close(flow.elementwise_loss(p, t, "l2"), torch.nn.functional.mse_loss(p, t, reduction="none"))
    torch.testing.assert_close(flow.elementwise_loss(p, t, "l1"), torch.nn.functional.l1_loss(p, t, reduction="none"))
    torch.testing.assert_close(flow.elementwise_loss(p, t, "huber", c), 2 * cb * (torch.sqrt((p - t) ** 2 + cb ** 2) - cb))
    torch.testing.assert_close(flow.elementwise_loss(p, t, "smooth_l1", c), 2 * (torch.sqrt((p - t) ** 2 + cb ** 2) - cb))


def test_huber_thresholds():
    sig = torch.tensor([0.001, 0.25, 0.5, 1.0])
    torch.testing.assert_close(flow.huber_threshold("constant", sig, 0.2, 3.0), torch.full((4,), 0.6))
    alpha = -math.log(0.1) / 1000
    torch.testing.assert_close(flow.huber_threshold("exponential", sig, 0.1, 2.0), torch.exp(-alpha * sig * 1000) * 2.0)
    snr = flow.huber_threshold("snr", sig, 0.1)
    ratio = sig / (1 - sig.clamp(max=0.999999))
    torch.testing.assert_close(snr[:3], (1 - 0.1) / (1 + ratio[:3]) ** 2 + 0.1)
    assert snr[-1].item() == pytest.approx(0.1)  # pure noise: the threshold falls to huber_c


@pytest.mark.parametrize("loss_type", ["l1", "huber", "smooth_l1"])
def test_loss_type_changes_training(loss_type):
    assert not torch.equal(_weights(_run(loss_type=loss_type)), _weights(_run()))


# --- network args, optimisers and schedules

def test_network_args_change_the_network():
    base = _run()
    assert len(_run(x_mlp_dim=0).network.loras) < len(base.network.loras)
    assert {m.rank for m in _run(context_attn_dim=2).network.loras.values()} == {2, 4}
    assert any(m.splits == 3 for m in _run(split_qkv=True).network.loras.values())
    assert "lora_unet_context_embedder" in _run(emb_dims="[2,0,0,0,0,0]").network.loras


@pytest.mark.parametrize("kw", [dict(network_dropout=0.3), dict(rank_dropout=0.3), dict(module_dropout=0.3)])
def test_dropouts_change_training_reproducibly(kw):
    a, b = _run(**kw), _run(**kw)
    assert torch.equal(_weights(a), _weights(b))
    assert not torch.equal(_weights(a), _weights(_run()))


def test_loraplus_scales_the_up_matrices_lr():
    state = _run(loraplus_lr_ratio=16.0, steps=1)
    lrs = [g["lr"] for g in state.optimizer.param_groups]
    assert lrs == [pytest.approx(1e-3), pytest.approx(16e-3)]
    ups = {id(p) for n, p in state.network.named_parameters() if ".ups." in n}
    assert {id(p) for p in state.optimizer.param_groups[1]["params"]} == ups


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_trains(name):
    args = "relative_step=False" if name == "Adafactor" else ""
    state = _run(optimizer_type=name, optimizer_args=args, learning_rate=1e-3 if name != "Prodigy" else 1.0)
    assert len(state.losses) == 3 and all(math.isfinite(x) for x in state.losses)
    assert any(m.ups[0].abs().sum() > 0 for m in state.network.loras.values())
    assert name.lower().replace("8bit", "") in type(state.optimizer).__name__.lower().replace("8bit", "") or \
        name == "SGDNesterov" and state.optimizer.defaults["nesterov"]


def test_optimizer_args_parse():
    assert parse_optimizer_args("weight_decay=0.1, betas=(0.9, 0.99) decouple=True") == \
        {"weight_decay": 0.1, "betas": (0.9, 0.99), "decouple": True}
    with pytest.raises(ValueError, match="key=value"):
        parse_optimizer_args("oops")


@pytest.mark.parametrize("name", LR_SCHEDULERS)
def test_schedules_match_diffusers(name):
    """Every schedule against diffusers' independent implementation of the same formulas, on two
    parameter groups with different rates (LoRA+ and text-encoder rates) and past the last step."""
    from diffusers.optimization import get_scheduler

    def lrs(make):
        groups = [{"params": [torch.nn.Parameter(torch.zeros(1))]},
                  {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.4}]
        opt = torch.optim.SGD(groups, lr=0.1)
        sched = make(opt)
        out = []
        for _ in range(34):
            out.extend(sched.get_last_lr())
            opt.step()
            sched.step()
        return out

    ours = lrs(lambda o: build_scheduler(name, o, 5, 30, num_cycles=2, power=2.0))
    kw = {"num_cycles": 2} if name == "cosine_with_restarts" else {"power": 2.0} if name == "polynomial" else {}
    ref = lrs(lambda o: get_scheduler(name, o, num_warmup_steps=5, num_training_steps=30, **kw))
    assert ours == pytest.approx(ref, rel=1e-6, abs=1e-12)
    if name != "constant":
        assert ours[0] < ours[10]  # warm-up (two rates per step)


def test_polynomial_edges():
    """Warm-up as long as the run steps through (transformers divides by zero at its last step);
    a learning rate at or under the 1e-7 end rate is refused, naming the setting."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = build_scheduler("polynomial", opt, 5, 5)
    lrs = []
    for _ in range(7):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:6] == pytest.approx([0.0, 0.02, 0.04, 0.06, 0.08, 0.1]) and lrs[6] == pytest.approx(1e-7)
    with pytest.raises(ValueError, match="learning_rate"):
        build_scheduler("polynomial", torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-8), 0, 5)


def test_schedule_state_round_trips():
    """A resumed run's schedule continues where it stopped (the state travels in checkpoints)."""
    def sched(steps, state=None):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        s = build_scheduler("cosine_with_restarts", opt, 2, 20, num_cycles=3)
        if state is not None:
            s.load_state_dict(state)
        for _ in range(steps):
            opt.step()
            s.step()
        return s

    resumed = sched(4, sched(7).state_dict())
    assert resumed.get_last_lr() == sched(11).get_last_lr()


def test_training_state_does_not_import_heavy_packages():
    """Building a run's optimiser and schedule must not import transformers.optimization (which
    drags peft, accelerate, bitsandbytes and scipy in: about 230 MB of resident memory)."""
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import host_env; host_env.setup(cpu=True); "
            "from sd3_lora_trainer.trainer.config import TrainConfig; "
            "from sd3_lora_trainer.trainer.state import build_network, new_train_state; "
            "from tiny_mmdit import tiny_mmdit; "
            "cfg = TrainConfig(lr_scheduler='polynomial', network_dim=4).validate(); "
            "new_train_state(cfg, build_network(tiny_mmdit(), cfg)); "
            "print(sorted(m for m in ('transformers.optimization', 'peft', 'bitsandbytes') if m in sys.modules))")
    here = Path(__file__).resolve().parent
    out = subprocess.run([sys.executable, "-c", code, str(here.parent / "benchmarks"), str(here)],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_gradient_accumulation_takes_one_optimizer_step_per_n_batches():
    state = _run(steps=2, gradient_accumulation_steps=3, train_batch_size=1)
    assert state.step == 2 and state.epoch == 3 and state.cursor == 2  # 6 batches of 1 over 2 samples
    assert not torch.equal(_weights(state), _weights(_run(steps=2)))


# --- precision and memory

@pytest.mark.parametrize("emb_dims", [None, "[2,2,2,2,2,2]"], ids=["blocks", "embedders_too"])
def test_gradient_checkpointing_gives_the_same_loss_and_grads(emb_dims):
    # With LoRA on the embedders the blocks' inputs (c among them, passed by keyword) carry
    # gradients too, which must reach the embedders through the checkpointed blocks.
    model, data = tiny_mmdit(), _data()

    def grads(checkpointing):
        cfg = TrainConfig(network_dim=4, seed=1, emb_dims=emb_dims, gradient_checkpointing=checkpointing).validate()
        state = new_train_state(cfg, build_network(model, cfg))
        with torch.no_grad():
            for m in state.network.loras.values():
                m.ups[0].normal_(std=0.05, generator=torch.Generator().manual_seed(0))
        saved = []
        with attached(model, state, data):
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
                loss = micro_step_loss(model, next_batch(state, data, 1), state, torch.float32)
            loss.backward()
        grads = {n: p.grad for n, p in state.network.named_parameters()}
        assert all(g is not None for g in grads.values())
        return loss.detach(), torch.cat([g.flatten() for g in grads.values()]), sum(saved)

    (l1, g1, saved1), (l2, g2, saved2) = grads(False), grads(True)
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)
    assert saved2 < 0.5 * saved1  # the blocks really were checkpointed


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_gradient_checkpointing_recomputes_with_the_forwards_lora_dropouts(mixed_precision):
    # The recomputation in backward must draw the forward's dropout masks (and leave the generator
    # where the forward left it), or the gradients belong to other masks than the loss.
    kw = dict(network_dropout=0.3, rank_dropout=0.2, module_dropout=0.3, mixed_precision=mixed_precision)
    plain, checkpointed = _run(**kw), _run(gradient_checkpointing=True, **kw)
    torch.testing.assert_close(torch.tensor(checkpointed.losses), torch.tensor(plain.losses), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_weights(checkpointed), _weights(plain), rtol=1e-4, atol=1e-6)
    assert torch.equal(checkpointed.generator.get_state(), plain.generator.get_state())
    assert not torch.equal(_weights(plain), _weights(_run(mixed_precision=mixed_precision)))  # the dropouts act


def test_fp16_uses_a_grad_scaler_and_full_bf16_keeps_lora_in_bf16():
    fp16 = _run(mixed_precision="fp16", steps=2)
    assert fp16.scaler is not None and all(math.isfinite(x) for x in fp16.losses)
    bf16 = _run(mixed_precision="bf16", full_bf16=True, steps=2)
    assert all(p.dtype == torch.bfloat16 for p in bf16.network.parameters())


@pytest.mark.parametrize("kw", [dict(clip_l_dropout_rate=0.5), dict(t5_dropout_rate=0.9)])
def test_text_encoder_dropout_changes_training(kw):
    def run(**k):  # an SD3-shaped context: 77 CLIP rows + 8 T5 rows, 4096 channels, pooled 2048
        g = torch.Generator().manual_seed(2)
        data = EncodedData(latents=torch.randn(2, 16, 8, 8, generator=g), context=torch.randn(2, 85, 4096, generator=g),
                           pooled=torch.randn(2, 2048, generator=g))
        model = tiny_mmdit(context_dim=4096, adm=2048)
        cfg = TrainConfig(network_dim=4, learning_rate=1e-3, seed=5, **k).validate()
        state = new_train_state(cfg, build_network(model, cfg))
        train(model, data, state, 3)
        return state

    assert not torch.equal(_weights(run(**kw)), _weights(run()))


@pytest.mark.parametrize("kw", [dict(pos_emb_random_crop_rate=0.5), dict(enable_scaled_pos_embed=True)])
def test_position_options_change_training_and_leave_the_model(kw):
    state = _run(**kw)
    assert not torch.equal(_weights(state), _weights(_run()))


@pytest.mark.parametrize("naming", ["kohya", "diffusers"])
def test_network_weights_start_from_a_saved_lora(tmp_path, naming):
    from sd3_lora_trainer.trainer.diffusers_format import kohya_to_diffusers
    from sd3_lora_trainer.trainer.lora_file import save_lora

    trained = _run(steps=2)
    tensors = trained.network.kohya_state_dict()
    path = tmp_path / "start.safetensors"
    save_lora(path, tensors if naming == "kohya" else kohya_to_diffusers(tensors), {})
    model = tiny_mmdit()
    cfg = TrainConfig(network_dim=4, network_alpha=4, network_weights=str(path)).validate()
    started = build_network(model, cfg)
    for name, module in started.loras.items():
        torch.testing.assert_close(module.downs[0], trained.network.loras[name].downs[0])
        torch.testing.assert_close(module.ups[0], trained.network.loras[name].ups[0])
    with pytest.raises(ValueError, match="file not found"):
        build_network(model, TrainConfig(network_weights=str(tmp_path / "nope.safetensors")))


def test_blocks_to_swap_runs_the_schedule_and_changes_nothing_numerically():
    # On the CPU the "device" is the CPU too: the hooks and moves run, the numbers must not change.
    model = tiny_mmdit(depth=4)
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    def run(n):
        cfg = TrainConfig(network_dim=4, learning_rate=1e-3, seed=5, blocks_to_swap=n).validate()
        state = new_train_state(cfg, build_network(model, cfg))
        train(model, _data(), state, 3)
        return state

    swapped, plain = run(2), run(0)
    assert swapped.losses == plain.losses and torch.equal(_weights(swapped), _weights(plain))
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert not any(block._forward_pre_hooks for block in model.joint_blocks)  # hooks removed after the run
    with pytest.raises(ValueError, match="blocks_to_swap"):
        run(3)  # the window on the device must hold at least two blocks
