"""Text-encoder LoRA (lora_te1_ on CLIP-L) on the host's own CLIP: names the host maps, gradients
through the host's encoder, and the stock LoraLoader reproducing the trained CLIP output."""
import pytest
import torch

import comfy.lora

from sd3_lora_trainer.trainer.config import TrainConfig
from sd3_lora_trainer.trainer.lora_file import save_lora
from sd3_lora_trainer.trainer.prepare import backward_safe_norms, freeze_base_model
from sd3_lora_trainer.trainer.state import build_text_networks


@pytest.fixture(scope="module")
def clip(host, sd35m_checkpoint):
    with torch.inference_mode():
        return host.NODE_CLASS_MAPPINGS["CheckpointLoaderSimple"]().load_checkpoint(sd35m_checkpoint)[1]


def test_text_lora_names_map_and_loraloader_reproduces_the_trained_clip(host, clip, base_dir):
    cfg = TrainConfig(network_train_unet_only=False, network_dim=4, network_alpha=4).validate()
    encoder = clip.cond_stage_model.clip_l.transformer
    with torch.inference_mode(False):
        clip.load_model()
        freeze_base_model(encoder)
        nets = build_text_networks({"clip_l": encoder, "clip_g": None, "t5xxl": None}, cfg)
        assert list(nets) == ["clip_l"]
        net = nets["clip_l"]
        tensors = net.kohya_state_dict()
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
        modules = {k.rsplit(".", 2)[0] for k in tensors if k.endswith("lora_down.weight")}
        assert len(modules) == 12 * 6 and all(m in key_map for m in modules)  # 12 layers x q,k,v,out,fc1,fc2
        assert all(m.startswith("lora_te1_text_model_encoder_layers_") for m in modules)

        tokens = clip.tokenize("a red circle on blue")
        plain = clip.encode_from_tokens(tokens, return_pooled=True)
        with backward_safe_norms(encoder):
            net.attach(encoder)
            try:
                cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
                (cond.float().square().mean() + pooled.float().square().mean()).backward()
                assert all(m.downs[0].grad is None or m.downs[0].grad.abs().sum() == 0 for m in net.loras.values())
                assert any(m.ups[0].grad.abs().sum() > 0 for m in net.loras.values())  # gradients reach the LoRA
                g = torch.Generator().manual_seed(3)
                with torch.no_grad():
                    for m in net.loras.values():
                        m.ups[0].copy_(torch.randn(m.ups[0].shape, generator=g) * 0.2)
                    trained = clip.encode_from_tokens(tokens, return_pooled=True)
            finally:
                net.detach()
    assert (trained[0] - plain[0]).abs().max() > 1e-3
    save_lora(base_dir / "models" / "loras" / "te_check.safetensors", net.kohya_state_dict(), {})
    with torch.inference_mode():
        stock_clip = host.NODE_CLASS_MAPPINGS["LoraLoader"]().load_lora(None, clip, "te_check.safetensors", 0.0, 1.0)[1]
        stock = stock_clip.encode_from_tokens(tokens, return_pooled=True)
    # The host's CLIP runs in fp16 here and merges the LoRA into fp16 weights, so compare the
    # error against the size of the LoRA's effect rather than with an fp32 tolerance.
    for i in (0, 1):
        effect = (trained[i].float() - plain[i].float()).abs().max()
        error = (stock[i].float() - trained[i].float()).abs().max()
        assert error < 0.02 * effect, (error, effect)


def test_text_encoder_lr_values():
    assert TrainConfig(learning_rate=1e-4).text_encoder_lrs() == [1e-4] * 3
    assert TrainConfig(text_encoder_lr="1e-5").text_encoder_lrs() == [1e-5] * 3
    assert TrainConfig(text_encoder_lr="1e-5,2e-5,0").text_encoder_lrs() == [1e-5, 2e-5, 0.0]
    with pytest.raises(ValueError, match="text_encoder_lr"):
        TrainConfig(text_encoder_lr="1e-5,2e-5").validate()
