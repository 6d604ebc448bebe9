"""The training loop on the host's tiny MMDiT: it learns, it continues exactly, it stops cleanly."""
import pytest
import torch

from sd3_lora_trainer.trainer import flow
from sd3_lora_trainer.trainer.config import TrainConfig
from sd3_lora_trainer.trainer.loop import train
from sd3_lora_trainer.trainer.batches import EncodedData
from sd3_lora_trainer.trainer.state import build_network, new_train_state
from tiny_mmdit import tiny_mmdit


def _data(n=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    return EncodedData(latents=torch.randn(n, 16, 8, 8, generator=g), context=torch.randn(n, 5, 64, generator=g),
                       pooled=torch.randn(n, 32, generator=g))


def _eval_loss(model, data, state):
    """Loss on fixed noise and fixed σ values: comparable before and after training."""
    g = torch.Generator().manual_seed(123)
    sig = torch.tensor([0.3, 0.7])
    noise = torch.randn(data.latents.shape, generator=g)
    xs = flow.add_noise(data.latents, noise, sig)
    state.network.attach(model)
    try:
        with torch.no_grad():
            v = model(xs, sig * 1000, context=data.context, y=data.pooled)
        return flow.flow_loss(v, xs, data.latents, sig).item()
    finally:
        state.network.detach()


def _session(cfg, model):
    return new_train_state(cfg, build_network(model, cfg))


def test_training_lowers_loss_and_leaves_model_untouched():
    model, data = tiny_mmdit(), _data()
    before_params = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(network_dim=8, network_alpha=8, learning_rate=1e-2, seed=1).validate()
    state = _session(cfg, model)
    start = _eval_loss(model, data, state)
    steps = []
    assert train(model, data, state, 60, on_step=lambda s, l: steps.append(s)) == 60
    assert steps == list(range(1, 61)) and len(state.losses) == 60
    assert _eval_loss(model, data, state) < 0.9 * start
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_params[k]), k


def test_continuing_equals_uninterrupted_bitwise():
    model, data = tiny_mmdit(), _data(n=3)
    cfg = TrainConfig(network_dim=4, learning_rate=1e-3, seed=7, train_batch_size=2).validate()
    a = _session(cfg, model)
    train(model, data, a, 6)
    b = _session(cfg, model)
    train(model, data, b, 2)
    train(model, data, b, 4)
    assert a.losses == b.losses
    for (ka, pa), (kb, pb) in zip(a.network.get_adapter_params().items(), b.network.get_adapter_params().items()):
        assert ka == kb and torch.equal(pa, pb)


def test_should_stop_keeps_finished_steps():
    model, data = tiny_mmdit(), _data()
    state = _session(TrainConfig(seed=1).validate(), model)
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 3

    assert train(model, data, state, 10, should_stop=stop) == 3
    assert state.step == 3 and len(state.losses) == 3
    assert "LoRAWrapper" not in {type(m).__name__ for m in model.modules()}


def test_failure_mid_run_detaches_and_keeps_steps():
    model, data = tiny_mmdit(), _data()
    state = _session(TrainConfig(seed=1).validate(), model)

    def boom(step, loss):
        if step == 2:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        train(model, data, state, 5, on_step=boom)
    assert state.step == 2
    assert "LoRAWrapper" not in {type(m).__name__ for m in model.modules()}


def test_bf16_autocast_trains():
    model, data = tiny_mmdit(), _data()
    state = _session(TrainConfig(seed=1, mixed_precision="bf16", learning_rate=1e-2, network_dim=8,
                                 network_alpha=8).validate(), model)
    start = _eval_loss(model, data, state)
    train(model, data, state, 30)
    assert all(p.dtype == torch.float32 for p in state.network.parameters())
    assert _eval_loss(model, data, state) < 0.9 * start


@pytest.mark.parametrize("field,value,msg", [
    ("network_dim", 0, "network_dim"), ("learning_rate", 0.0, "learning_rate"),
    ("weighting_scheme", "foo", "logit_normal"), ("mixed_precision", "fp8", "mixed_precision"),
    ("optimizer_type", "Adam", "AdamW8bit"), ("lr_scheduler", "exp", "cosine_with_restarts"),
    ("loss_type", "l3", "smooth_l1"), ("huber_schedule", "x", "exponential"), ("x_mlp_dim", -2, "x_mlp_dim"),
    ("emb_dims", "[1,2]", "six ranks"), ("train_block_indices", "a-b", "train_block_indices"),
    ("rank_dropout", 1.0, "rank_dropout"), ("gradient_accumulation_steps", 0, "gradient_accumulation_steps"),
    ("full_bf16", True, "full_bf16")])
def test_config_errors_name_the_setting(field, value, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig(**{field: value}).validate()
