"""The pack's node classes driven in-process through the real host, as its executor runs them
(under torch.inference_mode), with the host's own loaders, LoraLoader and progress hook."""
import json

import pytest
import torch
from safetensors import safe_open

import comfy.model_management
import comfy.utils

from train_settings import SETTINGS as SETTINGS_FOR_VERBOSE, settings  # noqa: E402


@pytest.fixture(scope="module")
def dataset(N, dataset_dir):
    with torch.inference_mode():
        return N["SD3LoraImageFolder"]().load(str(dataset_dir), 128, ".txt")[0]



def train(N, loaded, dataset, steps, node_id, **kw):
    model, clip, vae = loaded
    with torch.inference_mode():  # the executor's mode
        return N["SD3LoraTrain"]().run(model, clip, vae, dataset, settings(N, **kw), steps, unique_id=node_id)


def denoise(model, seed=0, sigma=0.6):
    """The host's denoiser output (x̂0) for a fixed input, through the model's patches."""
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 16, 16, generator=g)
    ctx = torch.randn(1, 77, 4096, generator=g)
    pooled = torch.randn(1, 2048, generator=g)
    with torch.no_grad():
        return model.model.apply_model(x, torch.tensor([sigma]), c_crossattn=ctx, y=pooled).float()


def test_dataset_node_resizes_and_crops_every_image(dataset, dataset_dir):
    assert len(dataset.samples) == 8
    assert all(s.image.shape == (128, 128, 3) for s in dataset.samples)
    assert all(s.caption for s in dataset.samples)
    assert dataset.samples[0].caption == (dataset_dir / (dataset.samples[0].path.rsplit("/", 1)[1].rsplit(".", 1)[0]
                                                        + ".txt")).read_text().strip()


def test_train_save_and_stock_lora_loader_agree(N, loaded, dataset, base_dir):
    model = loaded[0]
    base_out = denoise(model)
    out = train(N, loaded, dataset, 12, "t1")
    trained_model, lora, summary = out["result"][:3]
    assert lora.step == 12 and len(lora.losses) == 12 and "started a new session" in summary
    # The input model is untouched: same output, no patches, no wrappers left behind.
    assert not model.patches
    torch.testing.assert_close(denoise(model), base_out, rtol=0, atol=0)
    assert "LoRAWrapper" not in {type(m).__name__ for m in model.model.diffusion_model.modules()}
    lora_out = denoise(trained_model)
    assert (lora_out - base_out).abs().max() > 1e-4

    path = N["SD3LoraSave"]().save(lora, "nodes_test", "loras", "float")["result"][0]
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        assert "lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_down.weight" in f.keys()
    assert meta["ss_network_dim"] == "8" and meta["ss_base_model_version"] == "5-medium"
    assert json.loads(open(path.replace(".safetensors", ".loss.json")).read())["loss"] == lora.losses
    with torch.inference_mode():
        stock = N["LoraLoader"]().load_lora(model, loaded[1], "nodes_test.safetensors", 1.0, 1.0)[0]
    torch.testing.assert_close(denoise(stock), lora_out, rtol=1e-5, atol=1e-5)


def test_trainer_forward_equals_host_lora_patch(N, loaded, dataset, pack):
    """The LoRA as the trainer computes it (wrapped Linears) equals the host's merged-weight patch."""
    sessions = pack.trainer.session
    model = loaded[0]
    out = train(N, loaded, dataset, 3, "t2")
    session = sessions._SESSIONS["node:t2"]
    mmdit = model.model.diffusion_model
    g = torch.Generator().manual_seed(5)
    x, ctx, pooled = torch.randn(1, 16, 16, 16, generator=g), torch.randn(1, 77, 4096, generator=g), torch.randn(1, 2048, generator=g)
    sigma = 0.6
    with torch.no_grad():
        session.state.network.attach(mmdit)
        try:
            v = mmdit(x, torch.tensor([sigma * 1000]), context=ctx, y=pooled)
        finally:
            session.state.network.detach()
    x0_trainer = x - sigma * v
    torch.testing.assert_close(denoise(out["result"][0], seed=5, sigma=sigma), x0_trainer, rtol=1e-5, atol=1e-5)


def test_queue_again_continues_and_changed_settings_restart(N, loaded, dataset):
    first = train(N, loaded, dataset, 4, "t3")["result"][1]
    second = train(N, loaded, dataset, 4, "t3")
    assert second["result"][1].step == 8 and "continuing from step 4" in second["result"][2]
    assert second["result"][1].losses[:4] == first.losses
    third = train(N, loaded, dataset, 2, "t3", network_dim=4)
    assert third["result"][1].step == 2
    assert "settings changed (network_dim 8 -> 4)" in third["result"][2]


def test_cancel_stops_at_step_boundary_and_keeps_steps(N, loaded, dataset, pack):
    sessions = pack.trainer.session
    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append(value)
        # Cancel after the step bar's first update (the dataset-caching bar comes before it): newer
        # hosts throttle the bar's updates to one per 100 ms, but always send the first and the last.
        if value == 1 and total == 10:
            comfy.model_management.interrupt_current_processing(True)  # what the Cancel button does

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            train(N, loaded, dataset, 10, "t4")
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
    assert sessions._SESSIONS["node:t4"].state.step == 1
    assert "LoRAWrapper" not in {type(m).__name__ for m in loaded[0].model.diffusion_model.modules()}
    resumed = train(N, loaded, dataset, 2, "t4")["result"]
    assert resumed[1].step == 3 and "continuing from step 1" in resumed[2]


def test_sd3_medium_from_unet_loader(N, host, base_dir, loaded, dataset):
    """The MMDiT through the stock UNETLoader (text encoders and VAE from elsewhere) trains too."""
    import sd3_fixtures

    sd3_fixtures.write_sd3_unet(base_dir / "models" / "diffusion_models" / "tiny_sd3m_unet.safetensors",
                                variant="medium", depth=2, seed=3)
    with torch.inference_mode():
        unet = N["UNETLoader"]().load_unet("tiny_sd3m_unet.safetensors", "default")[0]
    out = train(N, (unet, loaded[1], loaded[2]), dataset, 2, "t5")
    assert out["result"][1].info["variant"] == "medium" and out["result"][1].step == 2


def test_non_sd3_model_is_refused_with_a_clear_error(N, base_dir, loaded, dataset):
    import sd3_fixtures

    sd3_fixtures.write_non_sd3_unet(base_dir / "models" / "diffusion_models" / "tiny_wan.safetensors")
    with torch.inference_mode():
        wan = N["UNETLoader"]().load_unet("tiny_wan.safetensors", "default")[0]
    with pytest.raises(ValueError, match=r"SD3 / SD3.5 .*WAN21 model"):
        train(N, (wan, loaded[1], loaded[2]), dataset, 1, "t6")


def test_bad_dataset_inputs_name_the_problem(N, tmp_path):
    load = N["SD3LoraImageFolder"]().load
    with pytest.raises(ValueError, match="image folder not found"):
        load(str(tmp_path / "missing"), 128, ".txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load(str(tmp_path / "empty"), 128, ".txt")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        load(str(bad), 128, ".txt")


def test_network_dim_below_one_is_refused(N):
    with pytest.raises(ValueError, match="network_dim must be at least 1"):
        settings(N, network_dim=0)
    assert N["SD3LoraSettings"].INPUT_TYPES()["required"]["network_dim"][1]["min"] == 1


def test_verbose_lists_every_trained_module(N, loaded, dataset):
    with torch.inference_mode():
        args = N["SD3LoraNetworkArgs"]().build(
            context_attn_dim=-1, context_mlp_dim=0, context_mod_dim=-1, x_attn_dim=2, x_mlp_dim=-1, x_mod_dim=-1,
            emb_dims="", train_block_indices="all", split_qkv=False, network_dropout=0.0, rank_dropout=0.0,
            module_dropout=0.0, loraplus_lr_ratio=0.0, network_weights="", verbose=True,
            network_train_unet_only=True, train_t5xxl=False, text_encoder_lr="")[0]
        cfg = N["SD3LoraSettings"]().build(network_args=args, **dict(SETTINGS_FOR_VERBOSE))[0]
        summary = N["SD3LoraTrain"]().run(*loaded, dataset, cfg, 1, unique_id="verbose")["result"][2]
    lines = summary.split("trained modules:\n")[1].splitlines()
    assert any(l.startswith("lora_unet_joint_blocks_0_x_block_attn_qkv") and l.endswith("rank 2") for l in lines)
    assert not any("context_block_mlp" in l for l in lines)
    assert all(l.endswith("rank 8") for l in lines if "x_block_mlp" in l)


def test_every_training_option_is_an_input_of_a_settings_node(N, pack):
    nodes = ("SD3LoraSettings", "SD3LoraNetworkArgs", "SD3LoraOptimizer", "SD3LoraAdvanced")
    inputs = set()
    for name in nodes:
        spec = N[name].INPUT_TYPES()
        inputs |= set(spec["required"]) | set(spec.get("optional", {}))
    missing = set(pack.trainer.config.TrainConfig.__dataclass_fields__) - inputs
    assert not missing, f"TrainConfig options no node offers: {sorted(missing)}"


def test_torch_compile_reaches_the_config_and_a_bad_backend_names_the_setting(N):
    advanced = N["SD3LoraAdvanced"].INPUT_TYPES()
    defaults = {k: v[1].get("default", v[0][0] if isinstance(v[0], list) else None)
                for k, v in advanced["required"].items()}
    group = N["SD3LoraAdvanced"]().build(**defaults, torch_compile=True, dynamo_backend="inductor")[0]
    assert settings(N, advanced=group).torch_compile is True
    bad = N["SD3LoraAdvanced"]().build(**defaults, torch_compile=True, dynamo_backend="turbo")[0]
    with pytest.raises(ValueError, match="dynamo_backend 'turbo'"):
        settings(N, advanced=bad)
