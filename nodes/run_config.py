"""The Save node's ``<name>.toml``: the run that trained the LoRA as a ``--config_file`` of
``scripts/sd3_train_network.py``, read from the executed graph (the host's API prompt).

The training options come from the LoRA itself (its TrainConfig); the model files, dataset,
samples, step saves and resume from the nodes that fed the train node. What a command line
cannot say (a dataset from graph images, a model patched by other nodes) is named in a comment.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

from ..cli import config_file
from ..cli.translate import config_args, encoder_args
from .dataset import SD3LoraImageFolder, is_toml, resolve_folder

CLIP_LOADERS = {"CLIPLoader": ("clip_name",), "DualCLIPLoader": ("clip_name1", "clip_name2"),
                "TripleCLIPLoader": ("clip_name1", "clip_name2", "clip_name3")}


def _source(prompt: dict, value) -> Optional[dict]:
    """The node a link ``[id, slot]`` comes from (None for a constant)."""
    if isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt:
        return prompt[str(value[0])]
    return None


def _full_path(kind: str, name: str) -> str:
    import folder_paths

    return folder_paths.get_full_path(kind, name) or name


def _model_args(prompt: dict, train: dict, notes: List[str]) -> Dict[str, object]:
    """--pretrained_model_name_or_path, --clip_l/g/t5xxl and --vae from the train node's loaders."""
    out: Dict[str, object] = {}
    model = _source(prompt, train["inputs"].get("model")) or {}
    if model.get("class_type") == "CheckpointLoaderSimple":
        out["pretrained_model_name_or_path"] = _full_path("checkpoints", model["inputs"]["ckpt_name"])
    elif model.get("class_type") == "UNETLoader":
        out["pretrained_model_name_or_path"] = _full_path("diffusion_models", model["inputs"]["unet_name"])
    else:
        notes.append(f"the MODEL came from {model.get('class_type', '?')}: set --pretrained_model_name_or_path")
    for socket, kind in (("clip", "text encoders"), ("vae", "VAE")):
        node = _source(prompt, train["inputs"].get(socket)) or {}
        cls = node.get("class_type")
        if cls == "CheckpointLoaderSimple":
            if _full_path("checkpoints", node["inputs"]["ckpt_name"]) != out.get("pretrained_model_name_or_path"):
                out["pretrained_model_name_or_path"] = _full_path("checkpoints", node["inputs"]["ckpt_name"])
        elif socket == "clip" and cls in CLIP_LOADERS:
            out.update(encoder_args([_full_path("text_encoders", node["inputs"][k]) for k in CLIP_LOADERS[cls]]))
        elif socket == "vae" and cls == "VAELoader":
            out["vae"] = _full_path("vae", node["inputs"]["vae_name"])
        else:
            notes.append(f"the {kind} came from {cls or '?'}: set them on the command line")
    return out


def _cache_flags(inputs: dict) -> Dict[str, object]:
    out = {}
    for kind in ("latents", "text_encoder_outputs"):
        mode = inputs.get(f"cache_{kind}", "memory")
        out[f"cache_{kind}"] = mode != "none"
        out[f"cache_{kind}_to_disk"] = mode == "disk"
    out.update(prior_loss_weight=inputs.get("prior_loss_weight", 1.0),
               validate_every_n_steps=inputs.get("validate_every_n_steps", 0))
    return out


def _dataset_args(node: dict, notes: List[str]) -> Dict[str, object]:
    """The dataset arguments of the dataset node that fed the train node."""
    cls, inputs = node.get("class_type"), dict(node.get("inputs", {}))
    if cls == "SD3LoraDatasetConfig":
        return dict(_cache_flags(inputs), dataset_config=resolve_folder(inputs["toml_path"]))
    if cls != "SD3LoraImageFolder":
        notes.append(f"the dataset came from {cls or '?'}: set --train_data_dir or --dataset_config")
        return {}
    spec = SD3LoraImageFolder.INPUT_TYPES()
    defaults = {k: v[1].get("default") for section in ("required", "optional") for k, v in spec[section].items()}
    get = lambda k: inputs.get(k, defaults.get(k))  # noqa: E731  (inputs the workflow left out: the node's defaults)
    out = dict(_cache_flags(inputs), resolution=str(get("resolution")), caption_extension=get("caption_extension"))
    if is_toml(get("folder")):
        return dict(out, dataset_config=resolve_folder(get("folder")))
    out.update(train_data_dir=resolve_folder(get("folder")), reg_data_dir=resolve_folder(get("reg_folder") or "") or None)
    out.update({k: get(k) for k in ("enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
                                    "bucket_no_upscale", "flip_aug", "alpha_mask", "validation_split",
                                    "validation_seed")})
    return out


def _extra_args(prompt: dict, train: dict, stem: str, notes: List[str]) -> Dict[str, object]:
    """Sampling (its prompts written to ``<stem>.prompts.txt``), step saves and resume."""
    out: Dict[str, object] = {}
    sampling = _source(prompt, train["inputs"].get("sampling"))
    if sampling is not None:
        s = sampling["inputs"]
        with open(stem + ".prompts.txt", "w", encoding="utf-8") as f:
            f.write(s["sample_prompts"])
        out.update(sample_prompts=stem + ".prompts.txt", sample_every_n_steps=s["sample_every_n_steps"],
                   sample_at_first=s["sample_at_first"])
        if (s.get("sampler_name"), s.get("scheduler")) != ("euler", "sgm_uniform"):
            notes.append(f"samples were made with {s.get('sampler_name')}/{s.get('scheduler')}; the command line "
                         f"samples with euler/sgm_uniform")
    every = _source(prompt, train["inputs"].get("save_every"))
    if every is not None:
        out.update(save_every_n_steps=every["inputs"]["save_every_n_steps"],
                   save_last_n_steps=every["inputs"]["save_last_n_steps"])
    resume = _source(prompt, train["inputs"].get("resume"))
    if resume is not None:
        from .state_nodes import state_stem

        out["resume"] = state_stem(resume["inputs"]["state_name"])
    return out


def run_arguments(lora, prompt: dict, save_id: str, folder: str, stem: str,
                  save_inputs: dict) -> Tuple[Dict[str, object], List[str]]:
    """The command-line arguments of the run that made ``lora`` (the Save node ``save_id``'s input),
    and notes on what the command line cannot reproduce."""
    notes: List[str] = []
    train = _source(prompt, prompt[str(save_id)]["inputs"].get("lora")) or {}
    if train.get("class_type") != "SD3LoraTrain":
        return {}, ["the LoRA did not come straight from 'SD3 LoRA Train'"]
    args = _model_args(prompt, train, notes)
    args.update(_dataset_args(_source(prompt, train["inputs"].get("dataset")) or {}, notes))
    args.update(config_args(lora.config))
    args.update(_extra_args(prompt, train, stem, notes))
    args.update(steps=lora.step, output_dir=folder, output_name=save_inputs["output_name"],
                save_precision=save_inputs["save_precision"], diffusers_export=save_inputs["diffusers_export"])
    return args, notes


def write_run_config(stem: str, lora, prompt: Optional[dict], save_id, save_inputs: dict) -> Optional[str]:
    """Write ``<stem>.toml`` for the run (None when the host passed no graph: an in-process call)."""
    if not prompt or save_id is None or str(save_id) not in prompt:
        return None
    args, notes = run_arguments(lora, prompt, save_id, os.path.dirname(stem), stem, save_inputs)
    comment = "; ".join(["scripts/sd3_train_network.py --config_file " + os.path.basename(stem) + ".toml"] + notes)
    return str(config_file.write(stem + ".toml", args, comment))
