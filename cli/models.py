"""The model files of a run: checked from their headers before anything loads, then loaded with
the host's own loader nodes, the ones the equivalent workflow uses (:func:`loader_nodes`).

The loaders find files by name in ComfyUI's model folders, so each file's folder is added to
the host's folder list for its kind first (this process only), and the nodes get the file name.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from .arguments import CliError
from .translate import ModelFiles

SD3_KEY = "joint_blocks.0.context_block.attn.qkv.weight"
# Keys that tell other model families apart, for the message when the file is not SD3.
OTHER_FAMILIES = (("double_blocks.", "a Flux model"), ("label_emb.", "an SDXL model"),
                  ("input_blocks.", "a Stable Diffusion 1.x/2.x model"), ("blocks.0.self_attn.", "a video (Wan) model"),
                  ("transformer_blocks.", "a diffusers-format transformer"))


def header_keys(path: str, argument: str) -> List[str]:
    """The tensor names of a .safetensors file, read from its header only (no weights load).

    Raises:
        CliError: naming ``argument`` when the file is missing or not a safetensors file.
    """
    if not os.path.isfile(path):
        raise CliError(f"--{argument} {path}: no such file; pass the path of the .safetensors file")
    try:
        with open(path, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            if size > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(size))
    except (ValueError, struct.error, UnicodeDecodeError) as e:
        raise CliError(f"--{argument} {path} is not a .safetensors file ({e}); convert it to safetensors") from None
    return [k for k in header if k != "__metadata__"]


def check(files: ModelFiles) -> bool:
    """Check the files before loading: present, safetensors, an SD3-family MMDiT, and a VAE and
    text encoders there (in the checkpoint or given apart). Returns whether the checkpoint is a
    full one (MMDiT under ``model.diffusion_model.``) rather than a diffusion-model-only file.
    """
    keys = header_keys(files.checkpoint, "pretrained_model_name_or_path")
    if not any(k.endswith(SD3_KEY) for k in keys):
        kind = next((name for marker, name in OTHER_FAMILIES if any(marker in k for k in keys)), "not an SD3 model")
        raise CliError(f"--pretrained_model_name_or_path {files.checkpoint} is {kind}, not SD3 / SD3.5 (MMDiT): "
                       f"pass an SD3 Medium, SD3.5 Medium or SD3.5 Large checkpoint")
    for path, argument in zip(files.text_encoders, _encoder_arguments(files)):
        header_keys(path, argument)
    if files.vae:
        header_keys(files.vae, "vae")
    full = any(k.startswith("model.diffusion_model.") for k in keys)
    if not files.vae and not any(k.startswith("first_stage_model.") for k in keys):
        raise CliError(f"--pretrained_model_name_or_path {files.checkpoint} has no VAE: pass --vae FILE")
    if not files.text_encoders and not any(k.startswith("text_encoders.") for k in keys):
        raise CliError(f"--pretrained_model_name_or_path {files.checkpoint} has no text encoders: pass "
                       f"--clip_l, --clip_g and --t5xxl")
    return full


def _encoder_arguments(files: ModelFiles) -> List[str]:
    return ["clip_l", "clip_g", "t5xxl"][:len(files.text_encoders)]


@dataclass(frozen=True)
class LoaderNode:
    """One stock loader node of the run: its class, widget inputs, and which outputs the training
    takes from it ({"MODEL": output slot, ...}); ``files`` are (model folder kind, path) pairs."""

    node: str
    inputs: Dict[str, object]
    provides: Dict[str, int]
    files: Tuple[Tuple[str, str], ...]


def loader_nodes(files: ModelFiles, full: bool) -> List[LoaderNode]:
    """The stock loaders that give the run its MODEL, CLIP and VAE, as the workflow holds them.

    A full checkpoint comes through 'Load Checkpoint' (its MMDiT through 'Load Diffusion Model'
    instead with --fp8_base, which needs float8 weights); text encoders given apart through the
    CLIP loader for their number (type sd3), a VAE given apart through 'Load VAE'.
    """
    name = os.path.basename
    ckpt = files.checkpoint
    nodes: List[LoaderNode] = []
    from_checkpoint = {}
    if not files.text_encoders:
        from_checkpoint["CLIP"] = 1
    if not files.vae:
        from_checkpoint["VAE"] = 2
    if full and not files.fp8:
        from_checkpoint["MODEL"] = 0
    else:
        nodes.append(LoaderNode("UNETLoader", {"unet_name": name(ckpt), "weight_dtype": "fp8_e4m3fn" if files.fp8
                                               else "default"}, {"MODEL": 0}, (("diffusion_models", ckpt),)))
    if from_checkpoint:
        nodes.insert(0, LoaderNode("CheckpointLoaderSimple", {"ckpt_name": name(ckpt)}, from_checkpoint,
                                   (("checkpoints", ckpt),)))
    encoders = files.text_encoders
    if encoders:
        kinds = tuple(("text_encoders", p) for p in encoders)
        if len(encoders) == 1:
            nodes.append(LoaderNode("CLIPLoader", {"clip_name": name(encoders[0]), "type": "sd3"}, {"CLIP": 0}, kinds))
        elif len(encoders) == 2:
            nodes.append(LoaderNode("DualCLIPLoader", {"clip_name1": name(encoders[0]), "clip_name2": name(encoders[1]),
                                                       "type": "sd3"}, {"CLIP": 0}, kinds))
        else:
            nodes.append(LoaderNode("TripleCLIPLoader", {f"clip_name{i + 1}": name(p) for i, p in enumerate(encoders)},
                                    {"CLIP": 0}, kinds))
    if files.vae:
        nodes.append(LoaderNode("VAELoader", {"vae_name": name(files.vae)}, {"VAE": 0}, (("vae", files.vae),)))
    return nodes


def _node_class(name: str):
    """The host's class of a stock node (nodes.py, or comfy_extras for TripleCLIPLoader)."""
    import nodes as host_nodes

    if hasattr(host_nodes, name):
        return getattr(host_nodes, name)
    import comfy_extras.nodes_sd3

    return getattr(comfy_extras.nodes_sd3, name)


def _call(cls, inputs: dict) -> tuple:
    """Run a node class as the executor would (classic FUNCTION, or a V3 node's execute)."""
    if hasattr(cls, "define_schema"):
        out = cls.execute(**inputs)
        return tuple(out[i] for i in range(len(out.result)))
    return tuple(getattr(cls(), cls.FUNCTION)(**inputs))


def load(loaders: List[LoaderNode]) -> Tuple[object, object, object]:
    """(MODEL, CLIP, VAE) from the loader nodes, each file's folder added to the host's model
    folders first so the node finds it by name."""
    import folder_paths

    found: Dict[str, object] = {}
    for loader in loaders:
        for kind, path in loader.files:
            folder_paths.add_model_folder_path(kind, os.path.dirname(path), is_default=True)
        outputs = _call(_node_class(loader.node), loader.inputs)
        for socket, slot in loader.provides.items():
            found[socket] = outputs[slot]
    return found["MODEL"], found["CLIP"], found["VAE"]

