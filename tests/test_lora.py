"""LoRA modules and network: formula, init, targets, attach/detach, kohya layout."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sd3_lora_trainer.trainer.lora import LoRAModule, LoRANetwork, LoRAWrapper, find_lora_targets, kohya_name
from tiny_mmdit import tiny_mmdit


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def _with_up(module, std=0.5):
    with torch.no_grad():
        for up in module.ups:
            up.normal_(std=std)
    return module


def test_lora_formula_and_zero_init():
    base = nn.Linear(8, 6)
    lora = LoRAModule(base, rank=4, alpha=2.0)
    assert torch.count_nonzero(lora.ups[0]) == 0 and torch.count_nonzero(lora.downs[0]) > 0
    layer = LoRAWrapper(base, lora)
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(layer(x), base(x))  # fresh LoRA is a no-op
    _with_up(lora)
    expected = base(x) + (x @ lora.downs[0].T @ lora.ups[0].T) * (2.0 / 4)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_lora_casts_at_the_boundary():
    base = nn.Linear(8, 6).to(torch.bfloat16)
    layer = LoRAWrapper(base, _with_up(LoRAModule(base, rank=2, alpha=2.0)))
    out = layer(torch.randn(2, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and layer.lora.downs[0].dtype == torch.float32


def test_conv_lora_matches_its_merged_weight():
    base = nn.Conv2d(16, 12, kernel_size=2, stride=2)
    lora = _with_up(LoRAModule(base, rank=3, alpha=1.5))
    x = torch.randn(2, 16, 8, 8)
    merged = base.weight + (lora.ups[0].flatten(1) @ lora.downs[0].flatten(1)).view_as(base.weight) * 0.5
    torch.testing.assert_close(LoRAWrapper(base, lora)(x), F.conv2d(x, merged, base.bias, stride=2),
                               rtol=1e-5, atol=1e-5)


def test_split_qkv_saves_fused_at_full_strength():
    base = nn.Linear(8, 12)
    lora = _with_up(LoRAModule(base, rank=2, alpha=1.0, splits=3))
    x = torch.randn(4, 8)
    delta = LoRAWrapper(base, lora)(x) - base(x)
    sd = lora.kohya_tensors("m")
    assert sd["m.lora_down.weight"].shape == (6, 8) and sd["m.lora_up.weight"].shape == (12, 6)
    # the host merges up @ down · alpha / rank: the stored alpha keeps the trained strength
    scale = sd["m.alpha"].item() / sd["m.lora_down.weight"].shape[0]
    torch.testing.assert_close(x @ (sd["m.lora_up.weight"] @ sd["m.lora_down.weight"]).T * scale, delta,
                               rtol=1e-5, atol=1e-6)
    again = LoRAModule(base, rank=2, alpha=1.0, splits=3)
    again.load_kohya(sd, "m")
    torch.testing.assert_close(LoRAWrapper(base, again)(x), LoRAWrapper(base, lora)(x))


def test_dropouts_only_in_training_and_reproducible():
    base = nn.Linear(8, 6)
    lora = _with_up(LoRAModule(base, rank=8, alpha=8.0, dropout=0.5, rank_dropout=0.25))
    x = torch.randn(2, 5, 8)
    lora.eval()
    clean = lora.delta(x)
    lora.train()
    lora.generator = torch.Generator().manual_seed(3)
    a = lora.delta(x)
    lora.generator = torch.Generator().manual_seed(3)
    torch.testing.assert_close(lora.delta(x), a)
    assert not torch.allclose(a, clean)
    skip = LoRAModule(base, rank=2, alpha=1.0, module_dropout=0.999)
    skip.generator = torch.Generator().manual_seed(0)
    assert skip.delta(x) is None


def test_rank_below_one_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        LoRAModule(nn.Linear(7, 6), rank=0, alpha=1.0)


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
        for m in net.loras.values():
            m.ups[0].normal_(std=0.1)
    out = _forward(model)
    assert (out - before).abs().max() > 1e-3
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.get_adapter_params().values())
    lora_ids = {id(p) for p in net.parameters()}
    assert all(p.grad is None for p in model.parameters() if id(p) not in lora_ids)
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


def test_network_args_select_layers_and_ranks():
    from sd3_lora_trainer.trainer.lora_targets import select_targets

    model = tiny_mmdit(depth=3)
    dims = [None, 0, None, 2, None, 0]  # context_attn, context_mlp, context_mod, x_attn, x_mlp, x_mod
    targets = {t.path: t for t in select_targets(model, 8, dims, train_block_indices="0,2",
                                                 emb_dims="[4,0,3,0,0,5]", split_qkv=True)}
    assert not any(p.startswith("joint_blocks.1.") for p in targets)
    assert "joint_blocks.0.context_block.mlp.fc1" not in targets and "joint_blocks.0.x_block.adaLN_modulation.1" not in targets
    assert targets["joint_blocks.0.x_block.attn.qkv"].rank == 2 and targets["joint_blocks.0.x_block.attn.qkv"].splits == 3
    assert targets["joint_blocks.0.context_block.adaLN_modulation.1"].rank == 8
    assert targets["joint_blocks.2.x_block.mlp.fc2"].rank == 8
    assert targets["context_embedder"].rank == 4 and targets["x_embedder.proj"].rank == 3
    assert targets["final_layer.linear"].rank == 5 and "t_embedder.mlp.0" not in targets
    net = LoRANetwork(model, list(targets.values()), alpha=1.0)
    before = _forward(model)
    net.attach(model)
    torch.testing.assert_close(_forward(model), before)  # still a no-op at init, conv included
    net.detach()


@pytest.mark.parametrize("text,msg", [("0,x", "cannot read"), ("7", "outside"), ("3-1", "outside")])
def test_bad_block_indices_are_explained(text, msg):
    from sd3_lora_trainer.trainer.lora_targets import parse_block_selection

    with pytest.raises(ValueError, match=msg):
        parse_block_selection(text, 4)


def test_bad_emb_dims_are_explained():
    from sd3_lora_trainer.trainer.lora_targets import parse_emb_dims

    with pytest.raises(ValueError, match="six ranks"):
        parse_emb_dims("[1,2,3]")
    with pytest.raises(ValueError, match="not a list of integers"):
        parse_emb_dims("[a,b]")


def test_diffusers_export_roundtrip_is_exact():
    from sd3_lora_trainer.trainer.diffusers_format import diffusers_to_kohya, kohya_to_diffusers
    from sd3_lora_trainer.trainer.lora_targets import select_targets

    model = tiny_mmdit(depth=2, qk_norm=True, attn2_layers=[0])
    net = LoRANetwork(model, select_targets(model, 4, emb_dims="[2,2,2,2,2,2]"), alpha=2.0)
    for m in net.loras.values():
        _with_up(m, 0.1)
    kohya = net.kohya_state_dict()
    diff = kohya_to_diffusers(kohya)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in diff
    assert "transformer.transformer_blocks.0.attn.add_k_proj.lora_B.weight" in diff
    assert "transformer.transformer_blocks.0.attn2.to_v.lora_B.weight" in diff
    assert not any("alpha" in k for k in diff)
    back = diffusers_to_kohya(diff)
    again = LoRANetwork(model, select_targets(model, 4, emb_dims="[2,2,2,2,2,2]"), alpha=2.0)
    assert again.load_kohya_state_dict(back) == []
    before = _forward(model)
    net.attach(model)
    expected = _forward(model)
    net.detach()
    again.attach(model)
    torch.testing.assert_close(_forward(model), expected, rtol=1e-5, atol=1e-6)
    again.detach()
    assert (expected - before).abs().max() > 1e-3
