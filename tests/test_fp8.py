"""fp8_base: training on float8-stored frozen weights, loaded by the host's own UNETLoader."""
import pytest
import torch

import sd3_fixtures
from sd3_lora_trainer.trainer.batches import EncodedData
from sd3_lora_trainer.trainer.config import TrainConfig
from sd3_lora_trainer.trainer.loop import train
from sd3_lora_trainer.trainer.prepare import check_fp8_base, freeze_base_model
from sd3_lora_trainer.trainer.state import build_network, new_train_state


def test_training_on_an_fp8_loaded_model(host, base_dir):
    sd3_fixtures.write_sd3_unet(base_dir / "models" / "diffusion_models" / "fp8_check.safetensors",
                                variant="3.5-medium", depth=2, seed=3)
    with torch.inference_mode():
        fp8 = host.UNETLoader().load_unet("fp8_check.safetensors", "fp8_e4m3fn")[0]
        full = host.UNETLoader().load_unet("fp8_check.safetensors", "default")[0]
    with torch.inference_mode(False):
        mmdit = fp8.model.diffusion_model
        freeze_base_model(mmdit)
        check_fp8_base(mmdit, True)
        with pytest.raises(ValueError, match="weight_dtype fp8_e4m3fn"):
            check_fp8_base(full.model.diffusion_model, True)
        weight = mmdit.joint_blocks[0].x_block.attn.qkv.weight
        assert weight.dtype == torch.float8_e4m3fn
        g = torch.Generator().manual_seed(0)
        data = EncodedData(torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 77, 4096, generator=g),
                           torch.randn(2, 2048, generator=g))
        cfg = TrainConfig(network_dim=4, learning_rate=1e-3, fp8_base=True).validate()
        state = new_train_state(cfg, build_network(mmdit, cfg))
        train(mmdit, data, state, 3, compute_dtype=fp8.model.manual_cast_dtype)
    assert len(state.losses) == 3 and all(torch.isfinite(torch.tensor(state.losses)))
    assert mmdit.joint_blocks[0].x_block.attn.qkv.weight.dtype == torch.float8_e4m3fn  # still stored in fp8
    assert any(m.ups[0].abs().sum() > 0 for m in state.network.loras.values())
