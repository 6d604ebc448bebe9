"""pos_emb_random_crop_rate and enable_scaled_pos_embed on the host's MMDiT."""
import torch

from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed
from sd3_lora_trainer.trainer.pos_embed import PositionEmbedder, latent_sizes_for, scaled_sincos_table
from tiny_mmdit import tiny_mmdit


def test_scaled_table_centre_equals_the_hosts_sincos_table():
    # With sample_size = base_size the centre region is the host's plain table of that size.
    ours = scaled_sincos_table(64, grid=24, sample_size=16)
    ref = torch.from_numpy(get_2d_sincos_pos_embed(64, 16)).float()
    centre = ours.view(24, 24, 64)[4:20, 4:20].reshape(-1, 64)
    torch.testing.assert_close(centre, ref, rtol=1e-5, atol=1e-5)


def test_scaled_tables_keep_relative_positions_across_sizes():
    a = scaled_sincos_table(64, grid=48, sample_size=32).view(48, 48, 64)[8:40, 8:40]
    b = scaled_sincos_table(64, grid=24, sample_size=16).view(24, 24, 64)[4:20, 4:20]
    torch.testing.assert_close(a[::2, ::2], b, rtol=1e-5, atol=1e-5)  # same positions, twice as dense


def test_default_embedder_matches_the_host_and_random_crop_moves():
    model = tiny_mmdit(depth=2)
    host = model.cropped_pos_embed((8, 8), device="cpu")
    plain = PositionEmbedder(model)
    torch.testing.assert_close(plain((8, 8), "cpu"), host)
    crop = PositionEmbedder(model, random_crop_rate=1.0, generator=torch.Generator().manual_seed(0))
    assert any(not torch.equal(crop((8, 8), "cpu"), host) for _ in range(5))


def test_active_patches_only_the_instance_and_changes_the_forward():
    model = tiny_mmdit(depth=2)
    g = torch.Generator().manual_seed(0)
    x, ctx, y = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 5, 64, generator=g), torch.randn(1, 32, generator=g)
    t = torch.tensor([500.0])
    before = model(x, t, context=ctx, y=y)
    emb = PositionEmbedder(model, latent_sizes=latent_sizes_for([(64, 64)]))
    with emb.active():
        scaled = model(x, t, context=ctx, y=y)
    assert "cropped_pos_embed" not in vars(model)
    torch.testing.assert_close(model(x, t, context=ctx, y=y), before)
    assert not torch.allclose(scaled, before)
