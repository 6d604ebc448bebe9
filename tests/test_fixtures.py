"""Checks of the generated fixtures (tests/sd3_fixtures.py) against the real host.

Every file is loaded through the host's own loaders (``comfy.sd`` and the stock loader
nodes) and compared key by key and value by value with what was written: the host skips
weight initialisation, so a missing key would silently be garbage memory.
"""
import logging
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import sd3_fixtures as fx

MMDIT = "model.diffusion_model."
VAE = "first_stage_model."
TE = "text_encoders."


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------

def read_file(path, prefix=""):
    """{key without prefix: tensor} for the keys of a safetensors file that start with prefix."""
    with safe_open(str(path), "pt") as f:
        return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def assert_same_tensors(host_sd, file_sd, what):
    """Host module state == file content: same keys, and the host holds exactly the file's values."""
    missing = sorted(set(host_sd) - set(file_sd))
    unexpected = sorted(set(file_sd) - set(host_sd))
    assert not missing and not unexpected, f"{what}: missing {missing[:5]}, unexpected {unexpected[:5]}"
    for k, v in host_sd.items():
        assert v.shape == file_sd[k].shape, (what, k)
        assert torch.isfinite(v).all(), (what, k)
        # The host may hold a wider dtype than the file (fp32 on CPU); the values must be the file's.
        assert torch.equal(v.to(file_sd[k].dtype), file_sd[k]), (what, k)


def no_load_warnings(caplog):
    """The host only logs (never raises) on missing/unexpected keys: there must be none."""
    bad = [r.getMessage()[:200] for r in caplog.records
           if re.search(r"missing|unexpected", r.getMessage(), re.IGNORECASE) and r.levelno >= logging.WARNING
           and "torchaudio" not in r.getMessage()]
    assert not bad, bad


def mmdit_forward(model_patcher, x, sigma, context, pooled):
    """Velocity prediction of the host's MMDiT (timestep = 1000 * sigma), without grad."""
    dm = model_patcher.model.diffusion_model
    dtype = model_patcher.model.get_dtype()
    with torch.no_grad():
        t = torch.full((x.shape[0],), 1000.0 * sigma)
        return dm(x.to(dtype), t.to(dtype), y=pooled.to(dtype), context=context.to(dtype)).float()


def rel_change(a, b):
    return ((a - b).norm() / a.norm()).item()


def random_sd3_cond(seed):
    """A CLIP-L-only style conditioning: 77 tokens, 768 used of 4096 channels; pooled 768 of 2048."""
    g = torch.Generator().manual_seed(seed)
    cond = torch.zeros(1, 77, 4096)
    cond[..., :768] = torch.randn(1, 77, 768, generator=g)
    pooled = torch.zeros(1, 2048)
    pooled[:, :768] = torch.randn(1, 768, generator=g)
    return cond, pooled


@pytest.fixture(scope="module")
def comfy_sd():
    import comfy.sd

    return comfy.sd


@pytest.fixture(scope="module")
def stock_nodes(tmp_path_factory):
    """The host's ``nodes`` module with a private checkpoints / diffusion_models folder registered
    (not as default, so other tests' folders keep priority). Returns (nodes, folder)."""
    import folder_paths
    import nodes

    folder = tmp_path_factory.mktemp("fixture_models")
    for kind in ("checkpoints", "diffusion_models"):
        (folder / kind).mkdir()
        folder_paths.add_model_folder_path(kind, str(folder / kind))
    return nodes, folder


# ----------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", fx.VARIANTS)
def test_checkpoint_is_detected_as_sd3_with_every_tensor(variant, tmp_path, comfy_sd, caplog):
    import comfy.model_base

    path = fx.write_sd3_checkpoint(tmp_path / "ckpt.safetensors", variant=variant, depth=2, clip=None, vae="taesd")
    with caplog.at_level(logging.DEBUG):
        mp, clip, vae, _ = comfy_sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    no_load_warnings(caplog)
    assert isinstance(mp.model, comfy.model_base.SD3)
    assert clip is None  # clip=None wrote no text encoders

    cfg = mp.model.model_config.unet_config
    qk_norm, attn2 = fx.variant_flags(variant)
    assert cfg["depth"] == 2 and cfg["in_channels"] == 16 and cfg["patch_size"] == 2
    assert cfg["adm_in_channels"] == 2048
    assert cfg["context_embedder_config"]["params"] == {"in_features": 4096, "out_features": 128}
    assert cfg["pos_embed_max_size"] == 64  # 64 patches = 1024 px; 512 px needs 32
    assert cfg.get("qk_norm") == ("rms" if qk_norm else None)
    assert cfg["x_block_self_attn_layers"] == attn2
    # The last block's context half is pre-only (no proj/mlp), as in real SD3 files.
    blocks = mp.model.diffusion_model.joint_blocks
    assert not hasattr(blocks[-1].context_block.attn, "proj") and hasattr(blocks[0].context_block.attn, "proj")

    assert_same_tensors(mp.model.diffusion_model.state_dict(), read_file(path, MMDIT), "MMDiT")
    assert_same_tensors(vae.first_stage_model.state_dict(), read_file(path, VAE), "TAESD")
    pos = read_file(path, MMDIT)["pos_embed"].float()
    assert pos.abs().max() > 0.5 and pos.std() > 0.3  # filled, not zeros

    # sd-scripts' label from the same keys the host used.
    keys = set(read_file(path, MMDIT))
    label = ("5-medium" if "joint_blocks.0.x_block.attn2.qkv.weight" in keys else "5-large") \
        if "joint_blocks.0.context_block.attn.ln_q.weight" in keys else "medium"
    assert label == fx.sd3_variant_label(variant)


@pytest.mark.parametrize("variant", fx.VARIANTS)
def test_random_mmdit_output_is_finite_and_depends_on_every_input(variant, tmp_path, comfy_sd):
    path = fx.write_sd3_unet(tmp_path / "unet.safetensors", variant=variant)
    mp = comfy_sd.load_diffusion_model(str(path))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 32, 24, generator=g)  # a 256x192 px latent: non-square on purpose
    cond, pooled = random_sd3_cond(0)
    out = mmdit_forward(mp, x, 0.5, cond, pooled)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert 0.1 < out.std().item() < 10.0  # unit-scale, like a velocity prediction

    cond2, pooled2 = random_sd3_cond(1)
    changes = {
        "x": mmdit_forward(mp, x + 0.1 * torch.randn(x.shape, generator=g), 0.5, cond, pooled),
        "sigma": mmdit_forward(mp, x, 0.1, cond, pooled),
        "context": mmdit_forward(mp, x, 0.5, cond2, pooled),
        "pooled": mmdit_forward(mp, x, 0.5, cond, pooled2),
    }
    for name, other in changes.items():
        assert rel_change(out, other) > 0.01, name
    # Deterministic: the same inputs give the same output.
    assert torch.equal(out, mmdit_forward(mp, x, 0.5, cond, pooled))


@pytest.fixture(scope="module")
def full_checkpoint(stock_nodes):
    """The demo-style checkpoint (depth 2, full CLIP-L, TAESD) in the stock loader's folder."""
    nodes, folder = stock_nodes
    path = fx.write_sd3_checkpoint(folder / "checkpoints" / "tiny_sd3_full.safetensors",
                                   variant="3.5-medium", clip="full", vae="taesd")
    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint("tiny_sd3_full.safetensors")
    return path, model, clip, vae


def test_full_clip_checkpoint_through_the_stock_loader(full_checkpoint):
    import comfy.model_base

    path, model, clip, vae = full_checkpoint
    assert isinstance(model.model, comfy.model_base.SD3)
    assert path.stat().st_size < 300 * 2 ** 20  # fp16 CLIP-L keeps it about 257 MB
    te = read_file(path, TE)
    assert sum(t.numel() for t in te.values()) > 120e6  # full-size CLIP-L, as the stock loader needs
    assert all(t.dtype == torch.float16 for t in te.values())
    assert_same_tensors(clip.cond_stage_model.state_dict(), te, "CLIP-L")
    assert clip.cond_stage_model.clip_g is None and clip.cond_stage_model.t5xxl is None


def test_full_clip_encodes_and_conditions_the_model(full_checkpoint):
    _, model, clip, _ = full_checkpoint
    outs = {}
    for prompt in ("a photo", "a red circle on blue"):
        with torch.no_grad():
            cond, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
        assert cond.shape == (1, 77, 4096) and pooled.shape == (1, 2048)
        assert torch.isfinite(cond).all() and torch.isfinite(pooled).all()
        # CLIP-L fills the first 768 channels; the absent CLIP-G / T5 parts are zeros.
        assert cond[..., :768].std() > 0.1 and cond[..., 768:].abs().max() == 0
        assert pooled[:, :768].std() > 0.1 and pooled[:, 768:].abs().max() == 0
        outs[prompt] = (cond.float(), pooled.float())
    (c1, p1), (c2, p2) = outs.values()
    assert rel_change(c1, c2) > 0.01

    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    v1 = mmdit_forward(model, x, 0.7, c1, p1)
    v2 = mmdit_forward(model, x, 0.7, c2, p2)
    assert torch.isfinite(v1).all() and rel_change(v1, v2) > 0.01  # the prompt matters


def test_taesd_vae_encodes_and_decodes(full_checkpoint):
    *_, vae = full_checkpoint
    assert vae.latent_channels == 16
    g = torch.Generator().manual_seed(0)
    images = torch.rand(1, 64, 64, 3, generator=g)
    z = vae.encode(images)
    assert z.shape == (1, 16, 8, 8) and torch.isfinite(z).all() and z.std() > 0.01
    assert rel_change(z, vae.encode(torch.rand(1, 64, 64, 3, generator=g))) > 0.01  # depends on the image
    out = vae.decode(z)
    assert out.shape == (1, 64, 64, 3) and torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1 and out.std() > 0.01


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_unet_only_file_through_the_stock_unet_loader(prefix, stock_nodes, caplog):
    import comfy.model_base

    nodes, folder = stock_nodes
    name = f"tiny_sd3_unet{'_prefixed' if prefix else ''}.safetensors"
    path = fx.write_sd3_unet(folder / "diffusion_models" / name, variant="3.5-medium", depth=3, seed=5, prefix=prefix)
    with caplog.at_level(logging.DEBUG):
        (model,) = nodes.UNETLoader().load_unet(name, "default")
    no_load_warnings(caplog)
    assert isinstance(model.model, comfy.model_base.SD3)
    cfg = model.model.model_config.unet_config
    assert cfg["depth"] == 3 and cfg["qk_norm"] == "rms" and cfg["x_block_self_attn_layers"] == [0]
    assert_same_tensors(model.model.diffusion_model.state_dict(), read_file(path, prefix), "MMDiT")
    # Same weights as the MMDiT of a checkpoint with the same arguments.
    ckpt = fx.write_sd3_checkpoint(folder / "same.safetensors", variant="3.5-medium", depth=3, seed=5,
                                   clip=None, vae=None)
    ck = read_file(ckpt, MMDIT)
    assert set(read_file(ckpt)) == {MMDIT + k for k in ck}  # vae=None, clip=None: MMDiT only
    assert all(torch.equal(v, ck[k]) for k, v in read_file(path, prefix).items())


def test_storage_dtype_and_determinism(tmp_path, comfy_sd):
    a = read_file(fx.write_sd3_unet(tmp_path / "a.safetensors", seed=3))
    b = read_file(fx.write_sd3_unet(tmp_path / "b.safetensors", seed=3))
    c = read_file(fx.write_sd3_unet(tmp_path / "c.safetensors", seed=4))
    f32_path = fx.write_sd3_unet(tmp_path / "f32.safetensors", seed=3, dtype=torch.float32)
    f32 = read_file(f32_path)
    m35 = read_file(fx.write_sd3_unet(tmp_path / "m35.safetensors", variant="3.5-medium", seed=3))

    assert all(t.dtype == torch.float16 for t in a.values())
    assert all(t.dtype == torch.float32 for t in f32.values())
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same bytes
    assert sum(not torch.equal(a[k], c[k]) for k in a) > len(a) // 2  # another seed, other weights
    assert all(torch.equal(f32[k].half(), a[k]) for k in a)  # fp16 file = fp32 file rounded
    # Variants share the weights they have in common (attn2 blocks have 9 modulations, not 6).
    assert all(torch.equal(m35[k], a[k]) for k in a if m35[k].shape == a[k].shape)

    mp = comfy_sd.load_diffusion_model(str(f32_path))
    assert_same_tensors(mp.model.diffusion_model.state_dict(), f32, "fp32 MMDiT")


def test_cached_checkpoint_writes_once(tmp_path, monkeypatch):
    kwargs = dict(variant="3.5-large", clip=None, vae=None, seed=7)
    path = fx.cached_checkpoint(tmp_path, **kwargs)
    assert path.parent == tmp_path and path.exists()
    stat = path.stat()

    calls = []
    monkeypatch.setattr(fx, "write_sd3_checkpoint", lambda *a, **k: calls.append(a))
    again = fx.cached_checkpoint(tmp_path, **kwargs)
    assert again == path and not calls and path.stat().st_mtime_ns == stat.st_mtime_ns
    # Spelling out a default names the same file; any other parameter names another.
    assert fx.cached_checkpoint(tmp_path, depth=2, dtype=torch.float16, **kwargs) == path
    assert fx.checkpoint_name(**{**kwargs, "seed": 8}) != path.name
    assert fx.checkpoint_name(**{**kwargs, "dtype": torch.float32}) != path.name
    assert fx.checkpoint_name(**{**kwargs, "vae": "taesd"}) != path.name
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(fx, "save_file", broken_save)
    with pytest.raises(OSError):
        fx.cached_checkpoint(tmp_path, clip=None, vae=None)
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary file


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="variant"):
        fx.write_sd3_checkpoint(tmp_path / "x.safetensors", variant="xl")
    with pytest.raises(ValueError, match="clip"):
        fx.write_sd3_checkpoint(tmp_path / "x.safetensors", clip="tiny")
    with pytest.raises(ValueError, match="vae"):
        fx.write_sd3_checkpoint(tmp_path / "x.safetensors", clip=None, vae="sdxl")
    with pytest.raises(ValueError, match="dtype"):
        fx.write_sd3_checkpoint(tmp_path / "x.safetensors", dtype=torch.int8)
    with pytest.raises(ValueError, match="depth"):
        fx.write_sd3_unet(tmp_path / "x.safetensors", variant="3.5-medium", depth=0)
    assert list(tmp_path.iterdir()) == []


def test_sincos_pos_embed_matches_its_formula():
    table = fx.sincos_pos_embed(8, 16)[0]  # 64 positions, 4 frequencies per sin/cos per axis
    freqs = 1.0 / (10000.0 ** (torch.arange(4) / 4))
    y, x = 3, 5
    row = table[y * 8 + x]
    expect = torch.cat([torch.sin(x * freqs), torch.cos(x * freqs), torch.sin(y * freqs), torch.cos(y * freqs)])
    assert torch.allclose(row, expect.float(), atol=1e-6)


# ----------------------------------------------------------------------------------------
# non-SD3 model
# ----------------------------------------------------------------------------------------

def test_non_sd3_unet_loads_as_another_model(tmp_path, comfy_sd, caplog):
    import comfy.model_base

    path = fx.write_non_sd3_unet(tmp_path / "wan.safetensors")
    assert path.stat().st_size < 4 * 2 ** 20
    with caplog.at_level(logging.DEBUG):
        mp = comfy_sd.load_diffusion_model(str(path))
    no_load_warnings(caplog)
    assert isinstance(mp.model, comfy.model_base.WAN21)
    assert not isinstance(mp.model, comfy.model_base.SD3)
    assert not hasattr(mp.model.diffusion_model, "joint_blocks")
    assert_same_tensors(mp.model.diffusion_model.state_dict(), read_file(path), "Wan")


# ----------------------------------------------------------------------------------------
# dataset
# ----------------------------------------------------------------------------------------

def test_dataset_images_and_captions(tmp_path):
    d = fx.write_dataset(tmp_path / "data", n=8, seed=0)
    images = sorted(p for p in d.iterdir() if p.suffix != ".txt")
    captions = sorted(p for p in d.iterdir() if p.suffix == ".txt")
    assert len(images) == 8 and [p.stem for p in images] == [p.stem for p in captions]
    assert {p.suffix for p in images} == {".png", ".jpg", ".webp"}

    sizes = set()
    for img_path in images:
        caption = (d / f"{img_path.stem}.txt").read_text().strip()
        m = re.fullmatch(r"(?:an? )?(\w+) (circle|square|triangle|stripes) on (\w+)", caption)
        assert m, caption
        fg = fx.COLORS[m.group(1)]
        assert m.group(3) in fx.COLORS and m.group(3) != m.group(1)
        with Image.open(img_path) as im:
            assert im.mode == "RGB"
            sizes.add(im.size)
            pixels = torch.from_numpy(np.asarray(im).copy()).reshape(-1, 3).int()
        # The shape's colour covers a good part of the picture (exactly, in lossless formats).
        tol = 40 if img_path.suffix == ".jpg" else 0
        share = ((pixels - torch.tensor(fg)).abs().amax(dim=1) <= tol).float().mean().item()
        assert share > 0.1, (img_path.name, caption, share)
        assert len(torch.unique(pixels, dim=0)) > 3  # not flat: the background has a gradient
    ratios = {round(w / h, 2) for w, h in sizes}
    assert len(sizes) == 8 and any(r > 1 for r in ratios) and any(r < 1 for r in ratios) and 1.0 in ratios


def test_dataset_is_deterministic_per_seed(tmp_path):
    def pixels(p):
        with Image.open(p) as im:
            return np.asarray(im).tobytes(), im.size

    def content(d):
        return {p.name: (pixels(p) if p.suffix != ".txt" else p.read_text()) for p in sorted(d.iterdir())}

    a = content(fx.write_dataset(tmp_path / "a", n=6, seed=1))
    b = content(fx.write_dataset(tmp_path / "b", n=6, seed=1))
    c = content(fx.write_dataset(tmp_path / "c", n=6, seed=2))
    assert a == b and a != c
    custom = fx.write_dataset(tmp_path / "s", n=3, sizes=[(33, 17)])
    assert all(pixels(p)[1] == (33, 17) for p in custom.iterdir() if p.suffix != ".txt")


# ----------------------------------------------------------------------------------------
# full-size VAE (slow: 84 M parameters)
# ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_full_size_vae_checkpoint(tmp_path, comfy_sd, caplog):
    import comfy.ldm.models.autoencoder

    path = fx.write_sd3_checkpoint(tmp_path / "fullvae.safetensors", clip=None, vae="full")
    with caplog.at_level(logging.DEBUG):
        mp, _, vae, _ = comfy_sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=False)
    no_load_warnings(caplog)
    assert isinstance(vae.first_stage_model, comfy.ldm.models.autoencoder.AutoencodingEngine)
    vae_sd = read_file(path, VAE)
    assert math.isclose(sum(t.numel() for t in vae_sd.values()), 83.8e6, rel_tol=0.005)
    assert_same_tensors(vae.first_stage_model.state_dict(), vae_sd, "VAE")
    z = vae.encode(torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0)))
    assert z.shape == (1, 16, 8, 8) and torch.isfinite(z).all() and z.std() > 0.01
    out = vae.decode(z)
    assert out.shape == (1, 64, 64, 3) and torch.isfinite(out).all()
