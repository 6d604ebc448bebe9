"""SD3 Medium, SD3.5 Medium and SD3.5 Large are told apart in the saved metadata, as sd-scripts labels them."""
import pytest
import torch
from safetensors import safe_open

from conftest import install_checkpoint

from train_settings import SETTINGS as BASE

SETTINGS = dict(BASE, network_dim=4, network_alpha=4.0, seed=1)


@pytest.fixture(scope="module")
def text_and_data(host, sd35m_checkpoint, dataset_dir):
    """CLIP and VAE from the full-CLIP fixture (the variant files carry none), and the images at 64 px."""
    N = host.NODE_CLASS_MAPPINGS
    with torch.inference_mode():
        _, clip, vae = N["CheckpointLoaderSimple"]().load_checkpoint(sd35m_checkpoint)[:3]
        dataset = N["SD3LoraImageFolder"]().load(str(dataset_dir), 64, ".txt")[0]
    return clip, vae, dataset


@pytest.mark.parametrize("variant,label,arch", [
    ("medium", "medium", "stable-diffusion-3-medium/lora"),
    ("3.5-medium", "5-medium", "stable-diffusion-3-5-medium/lora"),
    ("3.5-large", "5-large", "stable-diffusion-3-5-large/lora"),
])
def test_variant_metadata(host, base_dir, text_and_data, variant, label, arch):
    N = host.NODE_CLASS_MAPPINGS
    name = install_checkpoint(base_dir, f"tiny_{variant}_noclip.safetensors", variant=variant, depth=2, seed=4,
                              clip=None, vae="taesd")
    with torch.inference_mode():
        model = N["CheckpointLoaderSimple"]().load_checkpoint(name)[0]
        clip, vae, dataset = text_and_data
        settings = N["SD3LoraSettings"]().build(**SETTINGS)[0]
        lora = N["SD3LoraTrain"]().run(model, clip, vae, dataset, settings, 1, unique_id=f"variant-{variant}")["result"][1]
        path = N["SD3LoraSave"]().save(lora, f"variant_{label}", "output", "fp16")["result"][0]
    with safe_open(path, "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_base_model_version"] == label and meta["modelspec.architecture"] == arch
    assert meta["modelspec.prediction_type"] == "flow" and meta["ss_network_module"] == "networks.lora_sd3"
    assert any("attn2" in k for k in keys) == (variant == "3.5-medium")
