"""Training state on disk: save after k steps, restore in a fresh state, continue == never stopped (bitwise)."""
import json

import pytest
import torch

from sd3_lora_trainer.trainer import checkpoint
from sd3_lora_trainer.trainer.batches import EncodedData
from sd3_lora_trainer.trainer.config import TrainConfig
from sd3_lora_trainer.trainer.loop import train
from sd3_lora_trainer.trainer.state import build_network, new_train_state
from tiny_mmdit import tiny_mmdit


def _data(n=3, seed=3):
    g = torch.Generator().manual_seed(seed)
    return EncodedData(latents=torch.randn(n, 16, 8, 8, generator=g), context=torch.randn(n, 5, 64, generator=g),
                       pooled=torch.randn(n, 32, generator=g))


def _fresh(cfg, model):
    return new_train_state(cfg, build_network(model, cfg))


def _params(state):
    return {k: v.detach().clone() for k, v in state.network.get_adapter_params().items()}


@pytest.mark.parametrize("cfg", [
    TrainConfig(network_dim=4, network_alpha=2, learning_rate=1e-3, seed=7, train_batch_size=2),
    # A schedule with warm-up and dropouts: the scheduler's and the generator's states must survive too.
    TrainConfig(network_dim=4, learning_rate=1e-3, seed=3, lr_scheduler="cosine", lr_warmup_steps=3,
                max_train_steps=10, network_dropout=0.1),
], ids=["adamw", "cosine_dropout"])
def test_saved_state_resumed_from_disk_equals_uninterrupted_bitwise(tmp_path, cfg):
    model, data = tiny_mmdit(), _data()
    cfg = cfg.validate()
    straight = _fresh(cfg, model)
    train(model, data, straight, 7)

    first = _fresh(cfg, model)
    train(model, data, first, 3)
    path = checkpoint.save_state(tmp_path / "run", checkpoint.state_dict(first, {"session_id": 5}))
    del first
    loaded = checkpoint.load_state(path)  # either file or the stem works
    resumed, warnings = checkpoint.restore(loaded, model, cfg)
    assert warnings == [] and resumed.step == 3 and loaded[checkpoint.INFO] == {"session_id": 5}
    train(model, data, resumed, 4)

    assert resumed.losses == straight.losses
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("optimizer_type", ["AdamW", "AdamW8bit", "Adafactor", "Prodigy", "Lion", "SGDNesterov"])
def test_every_optimizer_resumes_from_disk_bitwise(tmp_path, optimizer_type):
    """Each optimizer's whole state survives the files: AdamW8bit keeps nested quantisation tensors
    (rank 16 makes the fc1/fc2 up matrices large enough for its 8-bit state), Adafactor a tuple eps,
    Prodigy its step size in the param groups. The state is taken inside the loop after step 2, as
    Save Every's save_state takes it, while that run goes on (and is then dropped, as by a crash)."""
    model, data = tiny_mmdit(), _data()
    cfg = TrainConfig(network_dim=16, network_alpha=16, learning_rate=1e-3, seed=5, optimizer_type=optimizer_type,
                      lr_scheduler="linear", max_train_steps=10).validate()
    straight = _fresh(cfg, model)
    train(model, data, straight, 5)
    crashed = _fresh(cfg, model)
    path = tmp_path / optimizer_type

    def periodic_save(step, loss):
        if step == 2:
            checkpoint.save_state(path, checkpoint.state_dict(crashed, {}))
    train(model, data, crashed, 4, on_step=periodic_save)
    del crashed
    resumed, _ = checkpoint.restore(checkpoint.load_state(path), model, cfg)
    train(model, data, resumed, 3)
    assert resumed.losses == straight.losses
    a, b = _params(straight), _params(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    if optimizer_type == "AdamW8bit":  # the 8-bit path was taken (not only bitsandbytes' 32-bit fallback)
        assert any("__bnb_optimizer_quant_state__" in s and s["__bnb_optimizer_quant_state__"]["state1"].dtype
                   == torch.uint8 for s in resumed.optimizer.state_dict()["state"].values())


def test_state_files_are_safetensors_and_json_without_pickle(tmp_path):
    model = tiny_mmdit()
    cfg = TrainConfig(network_dim=2).validate()
    state = _fresh(cfg, model)
    train(model, _data(), state, 1)
    checkpoint.save_state(tmp_path / "s", checkpoint.state_dict(state, {}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.safetensors"]
    meta = json.loads((tmp_path / "s.json").read_text())
    assert meta[checkpoint.PROGRESS]["step"] == 1 and meta[checkpoint.CONFIG]["network_dim"] == 2
    assert b"\x80\x04" not in (tmp_path / "s.safetensors").read_bytes()[:16]  # not a pickle stream


def test_architecture_comes_from_the_saved_state_with_a_warning(tmp_path, caplog):
    model = tiny_mmdit()
    saved_cfg = TrainConfig(network_dim=4, network_alpha=4).validate()
    state = _fresh(saved_cfg, model)
    ckpt = checkpoint.state_dict(state, {})
    resumed, warnings = checkpoint.restore(ckpt, model, TrainConfig(network_dim=8, network_alpha=4).validate())
    assert resumed.config.network_dim == 4
    assert len(warnings) == 1 and "network_dim" in warnings[0] and "using the saved 4" in warnings[0]
    assert all(p.shape[0] == 4 or p.shape[1] == 4 for p in resumed.network.get_adapter_params().values())


def test_state_for_another_model_is_refused(tmp_path):
    ckpt = checkpoint.state_dict(_fresh(TrainConfig(network_dim=2).validate(), tiny_mmdit(depth=2)), {"variant": "medium"})
    with pytest.raises(ValueError, match="does not fit this model"):
        checkpoint.restore(ckpt, tiny_mmdit(depth=3), TrainConfig(network_dim=2).validate())


def test_missing_state_file_names_both_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope.json .*nope.safetensors"):
        checkpoint.load_state(tmp_path / "nope")
