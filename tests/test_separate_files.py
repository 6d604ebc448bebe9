"""The model from separate files through the host's own loaders: UNETLoader (MMDiT), CLIPLoader
(type sd3, a CLIP-L file) and VAELoader (a full-size 16-channel VAE file)."""
import pytest
import torch
from safetensors.torch import save_file

import sd3_fixtures
from conftest import FIXTURE_CACHE
from train_settings import settings


def _write_once(path, make):
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(make(), str(path))
    return path


@pytest.mark.slow
def test_train_from_separate_files(N, base_dir, dataset_dir):
    models = base_dir / "models"
    sd3_fixtures.write_sd3_unet(models / "diffusion_models" / "sep_unet.safetensors", variant="3.5-large", depth=2, seed=6)
    clip_file = _write_once(FIXTURE_CACHE / "sep_clip_l.safetensors", lambda: {
        k[len("clip_l.transformer."):] if k.startswith("clip_l.transformer.") else k[len("clip_l."):]: v
        for k, v in sd3_fixtures.materialize(sd3_fixtures.clip_l_spec(), 0, torch.float16).items()})
    vae_file = _write_once(FIXTURE_CACHE / "sep_vae_full.safetensors",
                           lambda: sd3_fixtures.materialize(sd3_fixtures.full_vae_spec(), 0, torch.float16))
    for folder, src in (("text_encoders", clip_file), ("vae", vae_file)):
        link = models / folder / src.name
        if not link.exists():
            link.symlink_to(src)
    with torch.inference_mode():
        model = N["UNETLoader"]().load_unet("sep_unet.safetensors", "default")[0]
        clip = N["CLIPLoader"]().load_clip("sep_clip_l.safetensors", "sd3")[0]
        vae = N["VAELoader"]().load_vae("sep_vae_full.safetensors")[0]
        dataset = N["SD3LoraImageFolder"]().load(str(dataset_dir), 64, ".txt")[0]
        out = N["SD3LoraTrain"]().run(model, clip, vae, dataset, settings(N), 2, unique_id="separate")["result"]
    lora = out[1]
    assert lora.step == 2 and lora.info["variant"] == "5-large"
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a photo"), return_pooled=True)
    assert cond.shape[-1] == 4096 and pooled.shape[-1] == 2048  # the host's SD3 text layout
