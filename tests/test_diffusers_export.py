"""The diffusers export, checked against diffusers itself: diffusers' SD3Transformer2DModel with the
same weights (converted from the host's layout by the host's own key map) and our exported LoRA
loaded through diffusers' loader gives the output of the host with our kohya file through the
stock LoraLoader."""
import pytest
import torch

import comfy.model_management
import comfy.utils

pytest.importorskip("peft")
from diffusers import SD3Transformer2DModel  # noqa: E402

from sd3_lora_trainer.trainer.diffusers_format import kohya_to_diffusers  # noqa: E402
from sd3_lora_trainer.trainer.lora import LoRANetwork  # noqa: E402
from sd3_lora_trainer.trainer.lora_file import save_lora  # noqa: E402
from sd3_lora_trainer.trainer.lora_targets import select_targets  # noqa: E402


def diffusers_weights(host_sd: dict, config: dict, wanted: dict) -> dict:
    """Host MMDiT weights in diffusers' layout, through the host's mmdit_to_diffusers key map."""
    key_map = comfy.utils.mmdit_to_diffusers(config)
    out = {}
    for key in wanted:
        src = key_map[key]
        if isinstance(src, str):
            out[key] = host_sd[src]
        elif src[1] is None:  # (host key, None, transform)
            out[key] = src[2](host_sd[src[0]])
        else:  # (host key, (dim, start, length)): one of q/k/v in the fused qkv
            dim, start, length = src[1]
            out[key] = host_sd[src[0]].narrow(dim, start, length)
    return out


@pytest.mark.parametrize("split_qkv", [False, True])
def test_diffusers_loader_with_our_export_matches_host_with_kohya_file(host, base_dir, sd35m_checkpoint, split_qkv):
    N = host.NODE_CLASS_MAPPINGS
    with torch.inference_mode():
        model = N["CheckpointLoaderSimple"]().load_checkpoint(sd35m_checkpoint)[0]
    mmdit = model.model.diffusion_model
    depth = len(mmdit.joint_blocks)
    targets = select_targets(mmdit, 4, emb_dims="[2,2,2,2,2,2]", split_qkv=split_qkv)
    with torch.inference_mode(False):
        net = LoRANetwork(mmdit, targets, alpha=3.0)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for m in net.loras.values():
                for up in m.ups:
                    up.copy_(torch.randn(up.shape, generator=g) * 0.05)
        kohya = net.kohya_state_dict()
    name = f"export_check_{split_qkv}.safetensors"
    save_lora(base_dir / "models" / "loras" / name, kohya, {})
    with torch.inference_mode():
        patched = N["LoraLoader"]().load_lora(model, None, name, 1.0, 0.0)[0]

    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, 16, 16, 16, generator=g), torch.randn(1, 77, 4096, generator=g)
    pooled, t = torch.randn(1, 2048, generator=g), torch.tensor([600.0])
    comfy.model_management.load_models_gpu([patched], force_full_load=True)
    with torch.no_grad():
        host_v = patched.model.diffusion_model(x, t, context=ctx, y=pooled).float()
        host_sd = {k: v.float() for k, v in model.model.diffusion_model.state_dict().items()}
    comfy.model_management.load_models_gpu([model], force_full_load=True)  # unpatch: base weights

    ref = SD3Transformer2DModel(sample_size=32, num_layers=depth, attention_head_dim=64, num_attention_heads=depth,
                                caption_projection_dim=64 * depth, pos_embed_max_size=mmdit.pos_embed_max_size,
                                dual_attention_layers=(0,), qk_norm="rms_norm")
    base_sd = {k: v.float() for k, v in model.model.diffusion_model.state_dict().items()}
    ref.load_state_dict(diffusers_weights(base_sd, {"depth": depth}, ref.state_dict()), strict=True)
    ref.eval()
    with torch.no_grad():
        no_lora = ref(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
                      return_dict=False)[0]
    ref.load_lora_adapter(kohya_to_diffusers(kohya), prefix="transformer", adapter_name="ours")
    with torch.no_grad():
        ref_v = ref(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
                    return_dict=False)[0]
    assert (host_v - no_lora).abs().max() > 1e-2  # the LoRA matters
    torch.testing.assert_close(ref_v, host_v, rtol=0, atol=1e-4)
    del host_sd
