"""LoRA modules and network: formula, init, targets, attach/detach, kohya layout."""
import pytest
import torch
from torch import nn

from sd3_lora_trainer.trainer.lora import LoRALinear, LoRANetwork, find_lora_targets, kohya_name, new_lora_pair
from tiny_mmdit import tiny_mmdit


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def test_lora_linear_formula_and_zero_init():
    base = nn.Linear(8, 6)
    down, up = new_lora_pair(8, 6, rank=4)
    assert torch.count_nonzero(up) == 0 and torch.count_nonzero(down) > 0
    layer = LoRALinear(base, down, up, alpha=2.0)
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(layer(x), base(x))  # fresh LoRA is a no-op
    with torch.no_grad():
        up.normal_()
    expected = base(x) + (x @ down.T @ up.T) * (2.0 / 4)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_lora_linear_casts_at_the_boundary():
    base = nn.Linear(8, 6).to(torch.bfloat16)
    down, up = new_lora_pair(8, 6, rank=2)
    layer = LoRALinear(base, down, up, alpha=2.0)
    out = layer(torch.randn(2, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and layer.lora_down.dtype == torch.float32


def test_lora_linear_rejects_wrong_shapes():
    down, up = new_lora_pair(7, 6, rank=2)
    with pytest.raises(ValueError, match="do not fit"):
        LoRALinear(nn.Linear(8, 6), down, up, alpha=1.0)


def test_targets_match_lora_sd3_defaults():
    model = tiny_mmdit(depth=2)
    targets = find_lora_targets(model)
    # block 0: both halves have qkv, proj, fc1, fc2, adaLN; the last block's context half
    # is "pre only" (qkv and adaLN, no proj/mlp).
    assert len(targets) == 10 + 7
    assert "joint_blocks.0.context_block.attn.qkv" in targets
    assert "joint_blocks.1.x_block.adaLN_modulation.1" in targets
    assert "joint_blocks.1.context_block.attn.proj" not in targets
    assert all(isinstance(model.get_submodule(t), nn.Linear) for t in targets)


def test_targets_include_attn2_on_sd35_medium_shape():
    targets = find_lora_targets(tiny_mmdit(depth=2, qk_norm=True, attn2_layers=[0]))
    assert "joint_blocks.0.x_block.attn2.qkv" in targets and "joint_blocks.0.x_block.attn2.proj" in targets
    assert not any("ln_q" in t for t in targets)


def test_kohya_names():
    assert kohya_name("joint_blocks.0.x_block.attn.qkv") == "lora_unet_joint_blocks_0_x_block_attn_qkv"


def _forward(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 8, 8, generator=g)
    ctx = torch.randn(1, 5, 64, generator=g)
    y = torch.randn(1, 32, generator=g)
    return model(x, torch.tensor([500.0]), context=ctx, y=y)


def test_attach_detach_restores_model_and_grads_reach_only_lora():
    model = tiny_mmdit(depth=2)
    originals = {t: model.get_submodule(t) for t in find_lora_targets(model)}
    before = _forward(model)
    net = LoRANetwork.for_model(model, rank=4, alpha=4.0)
    net.attach(model)
    torch.testing.assert_close(_forward(model), before)  # zero-init up: unchanged output
    with torch.no_grad():
        for p in net.ups.values():
            p.normal_(std=0.1)
    out = _forward(model)
    assert (out - before).abs().max() > 1e-3
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.get_adapter_params().values())
    assert all(p.grad is None for p in model.parameters() if not any(p is q for q in net.parameters()))
    net.detach()
    assert all(model.get_submodule(t) is m for t, m in originals.items())
    torch.testing.assert_close(_forward(model), before)


def test_kohya_state_dict_layout():
    model = tiny_mmdit(depth=2)
    net = LoRANetwork.for_model(model, rank=4, alpha=2.0)
    sd = net.kohya_state_dict(torch.float16)
    key = "lora_unet_joint_blocks_0_x_block_mlp_fc1"
    fc1 = model.get_submodule("joint_blocks.0.x_block.mlp.fc1")
    assert sd[f"{key}.lora_down.weight"].shape == (4, fc1.in_features)
    assert sd[f"{key}.lora_up.weight"].shape == (fc1.out_features, 4)
    assert sd[f"{key}.alpha"].item() == 2.0 and sd[f"{key}.alpha"].dim() == 0
    assert len(sd) == 3 * 17 and all(v.dtype == torch.float16 for v in sd.values())


def test_network_rejects_rank_zero():
    with pytest.raises(ValueError, match="network_dim"):
        LoRANetwork.for_model(tiny_mmdit(depth=2), rank=0, alpha=1.0)


@pytest.mark.parametrize("kw,label", [({}, "medium"), ({"qk_norm": True}, "5-large"),
                                      ({"qk_norm": True, "attn2_layers": [0]}, "5-medium")])
def test_detect_variant(kw, label):
    from sd3_lora_trainer.trainer.lora_file import detect_variant

    assert detect_variant(tiny_mmdit(depth=2, **kw)) == label
