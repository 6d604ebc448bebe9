"""Training a text-encoder LoRA through the nodes: lora_te1_ keys saved, stock LoraLoader patches
the CLIP with zero unmapped keys, and the train node's CLIP output carries the LoRA."""
import sys

import pytest
import torch
from safetensors import safe_open

import comfy.lora

from train_settings import SETTINGS as BASE

SETTINGS = dict(BASE, network_dim=4, network_alpha=4.0, seed=1)


def _text_lora_settings(N):
    net_args = N["SD3LoraNetworkArgs"]().build(
        context_attn_dim=-1, context_mlp_dim=-1, context_mod_dim=-1, x_attn_dim=-1, x_mlp_dim=-1, x_mod_dim=-1,
        emb_dims="", train_block_indices="all", split_qkv=False, network_dropout=0.0, rank_dropout=0.0,
        module_dropout=0.0, loraplus_lr_ratio=0.0, network_weights="", verbose=False,
        network_train_unet_only=False, train_t5xxl=False, text_encoder_lr="5e-4")[0]
    return N["SD3LoraSettings"]().build(network_args=net_args, **SETTINGS)[0]


def test_text_encoder_lora_through_the_nodes(host, sd35m_checkpoint, dataset_dir):
    N = host.NODE_CLASS_MAPPINGS
    with torch.inference_mode():
        model, clip, vae = N["CheckpointLoaderSimple"]().load_checkpoint(sd35m_checkpoint)[:3]
        cached = N["SD3LoraImageFolder"]().load(str(dataset_dir), 64, ".txt")[0]
        uncached = N["SD3LoraImageFolder"]().load(str(dataset_dir), 64, ".txt",
                                                  cache_text_encoder_outputs="none")[0]
        settings = _text_lora_settings(N)
        train = N["SD3LoraTrain"]()
        with pytest.raises(ValueError, match="cache_text_encoder_outputs to none"):
            train.run(model, clip, vae, cached, settings, 1, unique_id="te-refuse")
        out = train.run(model, clip, vae, uncached, settings, 3, unique_id="te")["result"]
        lora, trained_clip = out[1], out[5]
    state = sys.modules[type(train).__module__.rsplit(".nodes.", 1)[0]].trainer.session.current("node:te").state
    lrs = [g["lr"] for g in state.optimizer.param_groups]
    assert lrs == [pytest.approx(1e-3), pytest.approx(5e-4)]  # MMDiT at learning_rate, CLIP-L at text_encoder_lr
    with torch.inference_mode():
        path = N["SD3LoraSave"]().save(lora, "te_nodes", "loras", "float")["result"][0]
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    te = {k for k in keys if k.startswith("lora_te1_")}
    assert te and not any(k.startswith(("lora_te2_", "lora_te3_")) for k in keys)  # no CLIP-G/T5 in this file
    assert any(tensors[k].abs().sum() > 0 for k in te if "lora_up" in k)  # the text LoRA learned
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, comfy.lora.model_lora_keys_unet(model.model, {}))
    assert len(comfy.lora.load_lora(tensors, key_map)) == len({k.rsplit(".", 2)[0] for k in keys if "lora_down" in k})
    tokens = clip.tokenize("a red circle")
    with torch.inference_mode():
        stock_clip = N["LoraLoader"]().load_lora(model, clip, "te_nodes.safetensors", 1.0, 1.0)[1]
        base = clip.encode_from_tokens(tokens)
        ours = trained_clip.encode_from_tokens(tokens)
        stock = stock_clip.encode_from_tokens(tokens)
    assert (ours - base).abs().max() > 0
    torch.testing.assert_close(ours, stock)  # both are the host's own patching of the same tensors


def test_text_encoder_lora_state_resumes_bitwise(N, pack, loaded, dataset_dir):
    model, clip, vae = loaded
    with torch.inference_mode():
        data = N["SD3LoraImageFolder"]().load(str(dataset_dir), 64, ".txt", cache_text_encoder_outputs="none")[0]
        settings = _text_lora_settings(N)
        run = lambda steps, key, resume=None: N["SD3LoraTrain"]().run(  # noqa: E731
            model, clip, vae, data, settings, steps, resume=resume, unique_id=key)["result"]
        straight = run(4, "te-straight")[1]
        first = run(2, "te-disk")[1]
        N["SD3LoraSaveState"]().save(first, "te_state")
        pack.trainer.session.forget("node:te-disk")  # as after a restart
        resumed = run(2, "te-disk", N["SD3LoraResume"]().load("te_state", "error")[0])
    assert any(k.startswith("lora_te1_") for k in resumed[1].tensors)
    assert "resumed from" in resumed[2] and resumed[1].losses == straight.losses
    assert all(torch.equal(resumed[1].tensors[k], straight.tensors[k]) for k in straight.tensors)
