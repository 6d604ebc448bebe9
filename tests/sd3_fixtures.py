"""Tiny, seeded SD3-family checkpoint files and a tiny captioned image dataset.

Used by the test suite and by ``scripts/make_demo_assets.py``. Everything is generated at
run time from a seed; no binary weights live in the repository.

Why the layouts are written out by hand here (rather than taken from the host's modules):
the host (ComfyUI) skips weight initialisation, so every tensor its model classes expect
must be in the file, and a key list derived independently of the host is a real check of
that contract: ``tests/test_fixtures.py`` loads each file through the host's own loaders
and asserts the key sets match exactly. This module itself imports only torch, safetensors
and Pillow, so it also works where the host is not importable.

Layouts (see the host's ``comfy/model_detection.py``, ``comfy/ldm/modules/diffusionmodules/mmdit.py``,
``comfy/clip_model.py``, ``comfy/taesd/taesd.py``, ``comfy/ldm/modules/diffusionmodules/model.py``):

* ``model.diffusion_model.*``: the MMDiT. Depth ``d`` means hidden ``64*d``, ``d`` heads and
  ``d`` joint blocks; the last block's context half is "pre-only" (no ``attn.proj``/``mlp``).
* ``text_encoders.clip_l.*``: a full-size, random CLIP-L (the host's stock loaders use a fixed
  config, so a smaller one would not load through ``CheckpointLoaderSimple``).
* ``first_stage_model.*``: a 16-channel VAE, either TAESD-format (small) or the standard
  SD3 layout (84 M parameters).
"""
from __future__ import annotations

import inspect
import json
import math
import os
import random
import uuid
import zlib
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from safetensors.torch import save_file

# Bump when the generated content changes, so cached files from older generators are not reused.
FIXTURE_VERSION = 1

VARIANTS = ("medium", "3.5-medium", "3.5-large")

# Fixed by SD3 itself and by the host's SD3 text stack.
LATENT_CHANNELS = 16
PATCH_SIZE = 2
CONTEXT_DIM = 4096  # CLIP-L/G outputs are zero-padded to T5's width
ADM_DIM = 768 + 1280  # pooled CLIP-L + CLIP-G
TIMESTEP_FREQ_DIM = 256

# The host's fixed CLIP-L config (comfy/sd1_clip_config.json).
CLIP_L = dict(vocab=49408, positions=77, hidden=768, layers=12, mlp=3072)

PathLike = Union[str, os.PathLike]


# ----------------------------------------------------------------------------------------
# Layout specs: key -> (shape, how to initialise it)
# ----------------------------------------------------------------------------------------
#
# Init kinds:
#   "lecun"   normal(0, 1/sqrt(fan_in)): keeps activations of unit scale through each layer,
#             so a random model gives non-trivial outputs that depend on all of its inputs.
#   "normal:S" normal(0, S) (CLIP's own init uses 0.02).
#   "bias"    normal(0, 0.01): small but not zero, so biases are not a degenerate special case.
#   "ones" / "zeros" / "const:V"
#   "sincos"  2D sin-cos position table (SD3's pos_embed).

Spec = Dict[str, Tuple[Tuple[int, ...], str]]


def _linear(spec: Spec, name: str, out_f: int, in_f: int, bias: bool = True, init: str = "lecun") -> None:
    """Add a Linear layer's weight [out, in] (and bias [out]) to ``spec``."""
    spec[f"{name}.weight"] = ((out_f, in_f), init)
    if bias:
        spec[f"{name}.bias"] = ((out_f,), "bias")


def _conv(spec: Spec, name: str, out_c: int, in_c: int, k: Union[int, Tuple[int, ...]], bias: bool = True) -> None:
    """Add a Conv2d/Conv3d layer's weight [out, in, *k] (and bias) to ``spec``."""
    kernel = (k, k) if isinstance(k, int) else tuple(k)
    spec[f"{name}.weight"] = ((out_c, in_c) + kernel, "lecun")
    if bias:
        spec[f"{name}.bias"] = ((out_c,), "bias")


def _norm(spec: Spec, name: str, dim: int, bias: bool = True) -> None:
    """Add an affine LayerNorm/GroupNorm/RMSNorm: weight ones, bias zeros (the identity)."""
    spec[f"{name}.weight"] = ((dim,), "ones")
    if bias:
        spec[f"{name}.bias"] = ((dim,), "zeros")


def variant_flags(variant: str) -> Tuple[bool, List[int]]:
    """(qk_norm, blocks with an extra x-block self-attention ``attn2``) for a variant name."""
    if variant == "medium":
        return False, []
    if variant == "3.5-medium":
        return True, [0]  # SD3.5 Medium has attn2 in its first blocks; block 0 is enough to detect
    if variant == "3.5-large":
        return True, []
    raise ValueError(f"unknown SD3 variant {variant!r}; expected one of {VARIANTS}")


def _attention(spec: Spec, name: str, hidden: int, pre_only: bool, qk_norm: bool) -> None:
    """An MMDiT SelfAttention: fused qkv (with bias), proj unless pre-only, RMSNorm q/k per head."""
    _linear(spec, f"{name}.qkv", 3 * hidden, hidden)
    if not pre_only:
        _linear(spec, f"{name}.proj", hidden, hidden)
    if qk_norm:
        _norm(spec, f"{name}.ln_q", 64, bias=False)  # head_dim is always 64 in SD3
        _norm(spec, f"{name}.ln_k", 64, bias=False)


def _dismantled_block(spec: Spec, name: str, hidden: int, pre_only: bool, qk_norm: bool, attn2: bool) -> None:
    """One half (context or x) of a joint block. Its LayerNorms have no affine parameters."""
    _attention(spec, f"{name}.attn", hidden, pre_only, qk_norm)
    if attn2:
        _attention(spec, f"{name}.attn2", hidden, False, qk_norm)
    if not pre_only:
        _linear(spec, f"{name}.mlp.fc1", 4 * hidden, hidden)
        _linear(spec, f"{name}.mlp.fc2", hidden, 4 * hidden)
    n_mods = 9 if attn2 else (2 if pre_only else 6)  # shift/scale/gate sets
    _linear(spec, f"{name}.adaLN_modulation.1", n_mods * hidden, hidden)


def mmdit_spec(variant: str = "medium", depth: int = 2, pos_embed_max_size: int = 64) -> Spec:
    """The SD3 MMDiT's tensors (no prefix), as the host builds it for the detected config."""
    if depth < 1:
        raise ValueError("depth must be >= 1")
    qk_norm, attn2_blocks = variant_flags(variant)
    if any(i >= depth for i in attn2_blocks):
        raise ValueError(f"variant {variant!r} needs depth > {max(attn2_blocks)}")
    h = 64 * depth
    spec: Spec = {}
    _conv(spec, "x_embedder.proj", h, LATENT_CHANNELS, PATCH_SIZE)
    spec["pos_embed"] = ((1, pos_embed_max_size ** 2, h), "sincos")
    _linear(spec, "t_embedder.mlp.0", h, TIMESTEP_FREQ_DIM)
    _linear(spec, "t_embedder.mlp.2", h, h)
    _linear(spec, "y_embedder.mlp.0", h, ADM_DIM)
    _linear(spec, "y_embedder.mlp.2", h, h)
    _linear(spec, "context_embedder", h, CONTEXT_DIM)
    for i in range(depth):
        last = i == depth - 1
        _dismantled_block(spec, f"joint_blocks.{i}.context_block", h, pre_only=last, qk_norm=qk_norm, attn2=False)
        _dismantled_block(spec, f"joint_blocks.{i}.x_block", h, pre_only=False, qk_norm=qk_norm,
                          attn2=i in attn2_blocks)
    _linear(spec, "final_layer.linear", PATCH_SIZE * PATCH_SIZE * LATENT_CHANNELS, h)
    _linear(spec, "final_layer.adaLN_modulation.1", 2 * h, h)
    return spec


def clip_l_spec() -> Spec:
    """The host's full-size CLIP-L text encoder as SD3's text stack holds it (prefix ``clip_l.``)."""
    c = CLIP_L
    spec: Spec = {}
    t = "clip_l.transformer.text_model"
    spec[f"{t}.embeddings.token_embedding.weight"] = ((c["vocab"], c["hidden"]), "normal:0.02")
    spec[f"{t}.embeddings.position_embedding.weight"] = ((c["positions"], c["hidden"]), "normal:0.01")
    for i in range(c["layers"]):
        layer = f"{t}.encoder.layers.{i}"
        _norm(spec, f"{layer}.layer_norm1", c["hidden"])
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(spec, f"{layer}.self_attn.{proj}", c["hidden"], c["hidden"], init="normal:0.02")
        _norm(spec, f"{layer}.layer_norm2", c["hidden"])
        _linear(spec, f"{layer}.mlp.fc1", c["mlp"], c["hidden"], init="normal:0.02")
        _linear(spec, f"{layer}.mlp.fc2", c["hidden"], c["mlp"], init="normal:0.02")
    _norm(spec, f"{t}.final_layer_norm", c["hidden"])
    # Unused by SD3 (it takes the unprojected pooled output) but part of the host's module.
    _linear(spec, "clip_l.transformer.text_projection", c["hidden"], c["hidden"], bias=False, init="normal:0.02")
    spec["clip_l.logit_scale"] = ((), "const:4.6055")  # log(100), CLIP's usual value
    return spec


def _taesd_block(spec: Spec, name: str, ch: int = 64) -> None:
    """A TAESD residual Block(ch, ch): Sequential(conv, ReLU, conv, ReLU, conv); identity skip."""
    for j in (0, 2, 4):
        _conv(spec, f"{name}.conv.{j}", ch, ch, 3)


def taesd_spec(latent_channels: int = LATENT_CHANNELS) -> Spec:
    """A TAESD-format VAE (host's comfy/taesd/taesd.py) with ``latent_channels`` latents.

    Sequential indices follow the host's Encoder()/Decoder(); activation, Clamp and Upsample
    entries have no parameters, so their indices are skipped.
    """
    spec: Spec = {}
    e = "taesd_encoder"
    _conv(spec, f"{e}.0", 64, 3, 3)
    _taesd_block(spec, f"{e}.1")
    for stage, first in enumerate((2, 6, 10)):  # three stride-2 convs, each followed by 3 blocks
        _conv(spec, f"{e}.{first}", 64, 64, 3, bias=False)
        for b in range(1, 4):
            _taesd_block(spec, f"{e}.{first + b}")
    _conv(spec, f"{e}.14", latent_channels, 64, 3)

    d = "taesd_decoder"
    _conv(spec, f"{d}.1", 64, latent_channels, 3)  # 0 is Clamp, 2 is ReLU
    for first in (3, 8, 13):  # three blocks, Upsample, conv (no bias)
        for b in range(3):
            _taesd_block(spec, f"{d}.{first + b}")
        _conv(spec, f"{d}.{first + 4}", 64, 64, 3, bias=False)
    _taesd_block(spec, f"{d}.18")
    _conv(spec, f"{d}.19", 3, 64, 3)
    # The host scales latents as (z - shift) * scale around the decoder; identity here.
    spec["vae_scale"] = ((), "const:1.0")
    spec["vae_shift"] = ((), "const:0.0")
    return spec


def _resnet(spec: Spec, name: str, in_c: int, out_c: int) -> None:
    """A standard VAE ResnetBlock (GroupNorm, conv, GroupNorm, conv, 1x1 shortcut if widths differ)."""
    _norm(spec, f"{name}.norm1", in_c)
    _conv(spec, f"{name}.conv1", out_c, in_c, 3)
    _norm(spec, f"{name}.norm2", out_c)
    _conv(spec, f"{name}.conv2", out_c, out_c, 3)
    if in_c != out_c:
        _conv(spec, f"{name}.nin_shortcut", out_c, in_c, 1)


def _vae_mid(spec: Spec, name: str, ch: int) -> None:
    """The VAE middle: resnet, single-head conv attention, resnet."""
    _resnet(spec, f"{name}.block_1", ch, ch)
    _norm(spec, f"{name}.attn_1.norm", ch)
    for proj in ("q", "k", "v", "proj_out"):
        _conv(spec, f"{name}.attn_1.{proj}", ch, ch, 1)
    _resnet(spec, f"{name}.block_2", ch, ch)


def full_vae_spec(z_channels: int = LATENT_CHANNELS, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 4, 4),
                  num_res_blocks: int = 2) -> Spec:
    """The standard SD3 VAE layout (AutoencodingEngine, no quant convs): about 84 M parameters."""
    spec: Spec = {}
    # Encoder: conv_in, per level num_res_blocks resnets (+ downsample except the last level).
    _conv(spec, "encoder.conv_in", ch, 3, 3)
    block_in = ch
    for level, mult in enumerate(ch_mult):
        for b in range(num_res_blocks):
            _resnet(spec, f"encoder.down.{level}.block.{b}", block_in, ch * mult)
            block_in = ch * mult
        if level != len(ch_mult) - 1:
            _conv(spec, f"encoder.down.{level}.downsample.conv", block_in, block_in, 3)
    _vae_mid(spec, "encoder.mid", block_in)
    _norm(spec, "encoder.norm_out", block_in)
    _conv(spec, "encoder.conv_out", 2 * z_channels, block_in, 3)  # mean and log-variance

    # Decoder: mirror image, num_res_blocks + 1 resnets per level, upsample except level 0.
    block_in = ch * ch_mult[-1]
    _conv(spec, "decoder.conv_in", block_in, z_channels, 3)
    _vae_mid(spec, "decoder.mid", block_in)
    for level in reversed(range(len(ch_mult))):
        for b in range(num_res_blocks + 1):
            _resnet(spec, f"decoder.up.{level}.block.{b}", block_in, ch * ch_mult[level])
            block_in = ch * ch_mult[level]
        if level != 0:
            _conv(spec, f"decoder.up.{level}.upsample.conv", block_in, block_in, 3)
    _norm(spec, "decoder.norm_out", block_in)
    _conv(spec, "decoder.conv_out", 3, block_in, 3)
    return spec


def wan21_t2v_spec(dim: int = 128, ffn_dim: int = 256, layers: int = 1, in_dim: int = 16, out_dim: int = 16) -> Spec:
    """A tiny Wan 2.1 text-to-video DiT (host's comfy/ldm/wan/model.py): a non-SD3 model.

    Wan is picked because the host reads every size it needs from the state dict (dim, ffn,
    depth, channels; heads = dim // 128), so it can be made tiny, and because its 16-channel
    latents and flow objective make it the kind of model a user could plausibly mistake for SD3.
    """
    spec: Spec = {}
    _conv(spec, "patch_embedding", dim, in_dim, (1, 2, 2))
    _linear(spec, "text_embedding.0", dim, CONTEXT_DIM)
    _linear(spec, "text_embedding.2", dim, dim)
    _linear(spec, "time_embedding.0", dim, 256)
    _linear(spec, "time_embedding.2", dim, dim)
    _linear(spec, "time_projection.1", 6 * dim, dim)
    for i in range(layers):
        blk = f"blocks.{i}"
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                _linear(spec, f"{blk}.{attn}.{proj}", dim, dim)
            _norm(spec, f"{blk}.{attn}.norm_q", dim, bias=False)
            _norm(spec, f"{blk}.{attn}.norm_k", dim, bias=False)
        _norm(spec, f"{blk}.norm3", dim)  # cross_attn_norm
        _linear(spec, f"{blk}.ffn.0", ffn_dim, dim)
        _linear(spec, f"{blk}.ffn.2", dim, ffn_dim)
        spec[f"{blk}.modulation"] = ((1, 6, dim), "normal:0.02")
    _linear(spec, "head.head", 4 * out_dim, dim)  # patch (1, 2, 2) -> 4 values per channel
    spec["head.modulation"] = ((1, 2, dim), "normal:0.02")
    return spec


# ----------------------------------------------------------------------------------------
# Materialising specs into tensors
# ----------------------------------------------------------------------------------------

def sincos_pos_embed(grid_size: int, dim: int) -> torch.Tensor:
    """A [1, grid_size**2, dim] 2D sin-cos table: half the channels encode x, half encode y.

    Rows are in row-major (y, x) order, which is how the host crops its centre for smaller
    latents. Values lie in [-1, 1], so the table is exact enough in fp16.
    """
    if dim % 4:
        raise ValueError("dim must be a multiple of 4")
    quarter = dim // 4
    freqs = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    pos = torch.arange(grid_size, dtype=torch.float64)
    ang = pos[:, None] * freqs[None, :]  # [G, dim/4]
    axis = torch.cat([ang.sin(), ang.cos()], dim=1)  # [G, dim/2]
    ys, xs = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    table = torch.cat([axis[xs.reshape(-1)], axis[ys.reshape(-1)]], dim=1)  # [G*G, dim]
    return table.unsqueeze(0).float()


def _tensor_seed(seed: int, key: str) -> int:
    """A per-tensor seed: tensors depend only on (seed, key), not on which other keys exist,
    so e.g. the medium and 3.5-medium files of one seed share all their common weights."""
    return (zlib.crc32(key.encode("utf-8")) * 1_000_003 + int(seed)) % (2 ** 63)


def _init_tensor(key: str, shape: Tuple[int, ...], init: str, seed: int) -> torch.Tensor:
    """Create one fp32 tensor for ``key`` following its init kind (see the Spec comment)."""
    if init == "ones":
        return torch.ones(shape)
    if init == "zeros":
        return torch.zeros(shape)
    if init.startswith("const:"):
        return torch.full(shape, float(init[len("const:"):]))
    if init == "sincos":
        _, n, dim = shape
        return sincos_pos_embed(math.isqrt(n), dim)
    gen = torch.Generator().manual_seed(_tensor_seed(seed, key))
    if init == "lecun":
        fan_in = math.prod(shape[1:])
        std = 1.0 / math.sqrt(fan_in)
    elif init == "bias":
        std = 0.01
    elif init.startswith("normal:"):
        std = float(init[len("normal:"):])
    else:
        raise ValueError(f"unknown init {init!r} for {key}")
    return torch.randn(shape, generator=gen).mul_(std)  # in place: these can be 150 MB


def materialize(spec: Spec, seed: int, dtype: torch.dtype, prefix: str = "") -> Dict[str, torch.Tensor]:
    """Turn a spec into a {prefix+key: tensor} dict stored in ``dtype`` (seeded, deterministic)."""
    return {prefix + key: _init_tensor(key, shape, init, seed).to(dtype).contiguous()
            for key, (shape, init) in spec.items()}


def _dtype_name(dtype: torch.dtype) -> str:
    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    if dtype not in names:
        raise ValueError(f"unsupported storage dtype {dtype}; use torch.float16, bfloat16 or float32")
    return names[dtype]


def _save_atomic(tensors: Dict[str, torch.Tensor], path: PathLike, metadata: Dict[str, str]) -> Path:
    """Write a safetensors file via a temporary name + rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        # safetensors creates files as 0600; give the usual umask-based mode, so that e.g. a
        # ComfyUI server running as another user can read the file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _metadata(kind: str, **params) -> Dict[str, str]:
    """safetensors metadata (strings only) recording how a fixture was made."""
    return {"sd3_fixtures.kind": kind, "sd3_fixtures.version": str(FIXTURE_VERSION),
            "sd3_fixtures.params": json.dumps(params, sort_keys=True, default=str)}


# ----------------------------------------------------------------------------------------
# Public writers
# ----------------------------------------------------------------------------------------

def sd3_variant_label(variant: str) -> str:
    """The base-model label sd-scripts uses (``ss_base_model_version``): medium | 5-medium | 5-large."""
    return {"medium": "medium", "3.5-medium": "5-medium", "3.5-large": "5-large"}[variant]


def write_sd3_checkpoint(path: PathLike, variant: str = "medium", depth: int = 2, seed: int = 0,
                         clip: Optional[str] = "full", vae: Optional[str] = "taesd",
                         dtype: torch.dtype = torch.float16, pos_embed_max_size: int = 64) -> Path:
    """Write a single-file SD3-family checkpoint (MMDiT + optional CLIP-L + optional VAE).

    Args:
        path: output ``.safetensors`` path (parent folders are created).
        variant: "medium" (no qk-norm, no attn2), "3.5-medium" (qk-norm and ``attn2`` in block 0),
            "3.5-large" (qk-norm only).
        depth: MMDiT depth d: hidden 64*d, d heads, d blocks. d=2 is about 1.9 M parameters
            plus the position table (64*64 x 128 = 0.5 M values).
        seed: all random weights derive from it.
        clip: "full" for a random full-size CLIP-L (fp16, ~123 M parameters) under
            ``text_encoders.clip_l.*``; None for no text encoders. CLIP-G and T5 are never
            included: the host fills zeros for them (context padded to 4096, pooled 2048).
        vae: "taesd" (small TAESD-format, 16 channels), "full" (standard SD3 VAE layout, 84 M
            parameters) or None. VAE weights are stored in fp16.
        dtype: storage dtype of the MMDiT weights (float16, bfloat16 or float32).
        pos_embed_max_size: side of the position table in patches; 64 covers 1024 px images.
    """
    _dtype_name(dtype)
    tensors = materialize(mmdit_spec(variant, depth, pos_embed_max_size), seed, dtype, "model.diffusion_model.")
    if clip == "full":
        tensors.update(materialize(clip_l_spec(), seed, torch.float16, "text_encoders."))
    elif clip is not None:
        raise ValueError(f"clip must be 'full' or None, not {clip!r}")
    if vae == "taesd":
        tensors.update(materialize(taesd_spec(), seed, torch.float16, "first_stage_model."))
    elif vae == "full":
        tensors.update(materialize(full_vae_spec(), seed, torch.float16, "first_stage_model."))
    elif vae is not None:
        raise ValueError(f"vae must be 'taesd', 'full' or None, not {vae!r}")
    meta = _metadata("checkpoint", variant=variant, depth=depth, seed=seed, clip=clip, vae=vae,
                     dtype=_dtype_name(dtype), pos_embed_max_size=pos_embed_max_size)
    return _save_atomic(tensors, path, meta)


def write_sd3_unet(path: PathLike, variant: str = "medium", depth: int = 2, seed: int = 0,
                   dtype: torch.dtype = torch.float16, prefix: str = "", pos_embed_max_size: int = 64) -> Path:
    """Write an MMDiT-only file for the host's UNETLoader / ``comfy.sd.load_diffusion_model``.

    ``prefix`` "" (the usual ``diffusion_models/`` file) or "model.diffusion_model." (as cut
    from a checkpoint); the host accepts both. Same weights as ``write_sd3_checkpoint``'s
    MMDiT for the same arguments.
    """
    meta = _metadata("unet", variant=variant, depth=depth, seed=seed, dtype=_dtype_name(dtype),
                     prefix=prefix, pos_embed_max_size=pos_embed_max_size)
    return _save_atomic(materialize(mmdit_spec(variant, depth, pos_embed_max_size), seed, dtype, prefix), path, meta)


def write_non_sd3_unet(path: PathLike, seed: int = 0) -> Path:
    """Write the smallest diffusion-model file the host detects as a non-SD3 model.

    It is a Wan 2.1 text-to-video DiT (dim 128, one block, about 0.9 M parameters) that the
    host loads as ``comfy.model_base.WAN21``: for testing that the pack rejects non-SD3 models.
    """
    return _save_atomic(materialize(wan21_t2v_spec(), seed, torch.float16), path, _metadata("non_sd3_unet", seed=seed))


# Taken once, so that names stay stable even if a test monkeypatches write_sd3_checkpoint.
_CHECKPOINT_SIGNATURE = inspect.signature(write_sd3_checkpoint)


def checkpoint_name(**kwargs) -> str:
    """The cache file name for ``write_sd3_checkpoint`` arguments (defaults filled in)."""
    bound = _CHECKPOINT_SIGNATURE.bind("unused", **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    return (f"sd3fx{FIXTURE_VERSION}_{a['variant']}_d{a['depth']}_s{a['seed']}_clip-{a['clip'] or 'none'}"
            f"_vae-{a['vae'] or 'none'}_{_dtype_name(a['dtype'])}_pe{a['pos_embed_max_size']}.safetensors")


def cached_checkpoint(cache_dir: PathLike, **kwargs) -> Path:
    """``cache_dir/<name from params>.safetensors``, written by ``write_sd3_checkpoint`` only if absent.

    Safe across processes: the file appears by atomic rename, so a present file is complete.
    """
    path = Path(cache_dir) / checkpoint_name(**kwargs)
    if not path.exists():
        write_sd3_checkpoint(path, **kwargs)
    return path


# ----------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (235, 210, 40),
    "white": (245, 245, 245), "black": (20, 20, 20), "purple": (140, 50, 170), "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "stripes")
DEFAULT_SIZES = ((96, 64), (64, 128), (80, 80), (200, 150), (128, 96), (72, 120), (160, 160), (112, 64))
FORMATS = ("png", "jpg", "webp")


def _draw_shape(draw, shape: str, box: Tuple[int, int, int, int], color: Tuple[int, int, int]) -> None:
    """Draw one filled shape inside ``box`` = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=color)
    elif shape == "stripes":
        step = max(2, (x1 - x0) // 6)
        for x in range(x0, x1, 2 * step):
            draw.rectangle((x, y0, min(x + step - 1, x1), y1), fill=color)
    else:
        raise ValueError(shape)


def make_image(width: int, height: int, shape: str, fg: str, bg: str, rng: random.Random):
    """A simple, learnable picture: one large ``fg`` shape on a ``bg`` background with a soft
    vertical brightness gradient (so it is not piecewise constant). Returns a PIL RGB image."""
    from PIL import Image, ImageDraw

    base = COLORS[bg]
    img = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(img)
    for y in range(height):
        k = 0.8 + 0.4 * y / max(1, height - 1)  # 0.8 .. 1.2 from top to bottom
        draw.line((0, y, width - 1, y), fill=tuple(min(255, int(c * k)) for c in base))
    side = int(min(width, height) * rng.uniform(0.55, 0.8))  # large: easy to learn and to see
    x0 = rng.randint(0, width - side)
    y0 = rng.randint(0, height - side)
    _draw_shape(draw, shape, (x0, y0, x0 + side - 1, y0 + side - 1), COLORS[fg])
    return img


def caption_for(shape: str, fg: str, bg: str) -> str:
    """The caption of an image from ``make_image``, e.g. "a red circle on blue"."""
    if shape == "stripes":
        return f"{fg} stripes on {bg}"
    article = "an" if fg[0] in "aeiou" else "a"
    return f"{article} {fg} {shape} on {bg}"


def write_dataset(dirpath: PathLike, n: int = 6, seed: int = 0,
                  sizes: Optional[Iterable[Tuple[int, int]]] = None) -> Path:
    """Write ``n`` captioned images into ``dirpath`` and return it.

    Images cycle through ``sizes`` ((width, height) pairs; default a mix of landscape, portrait
    and square sizes from 64 to 200 px) and through png, jpg and webp. Each ``img_NNN.<ext>``
    has an ``img_NNN.txt`` caption such as "a red circle on blue" (see ``caption_for``).
    Deterministic for a seed.
    """
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    sizes = list(sizes) if sizes is not None else list(DEFAULT_SIZES)
    rng = random.Random(seed)
    names = list(COLORS)
    for i in range(n):
        width, height = sizes[i % len(sizes)]
        shape = SHAPES[(i + seed) % len(SHAPES)]  # every shape appears once n >= 4
        fg = rng.choice(names)
        bg = rng.choice([c for c in names if c != fg])
        img = make_image(width, height, shape, fg, bg, rng)
        ext = FORMATS[i % len(FORMATS)]
        stem = f"img_{i:03d}"
        if ext == "jpg":
            img.save(dirpath / f"{stem}.jpg", quality=95)
        elif ext == "webp":
            img.save(dirpath / f"{stem}.webp", lossless=True)
        else:
            img.save(dirpath / f"{stem}.png")
        (dirpath / f"{stem}.txt").write_text(caption_for(shape, fg, bg) + "\n", encoding="utf-8")
    return dirpath
