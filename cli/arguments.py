"""The command line of sd-scripts' ``sd3_train_network.py``, under its names.

The training options come from :class:`~trainer.config.TrainConfig`'s fields, so the command
line cannot drift from the nodes: each field is a flag (``--learning_rate``), or, where
sd-scripts takes it inside ``--network_args`` (``"split_qkv=True"``), a key there. The rest
(model files, dataset, saving, sampling, logging) are defined below. Defaults are sd-scripts'
where they differ from the nodes' (:data:`SD_SCRIPTS_DEFAULTS`), so a command means what it
means there.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from typing import Dict, List, Optional, Sequence

from ..trainer.config import LR_SCHEDULERS, MIXED_PRECISION, OPTIMIZERS, TrainConfig
from ..trainer.flow import HUBER_SCHEDULES, LOSS_TYPES, WEIGHTING_SCHEMES
from ..trainer.lora_targets import TYPE_DIM_NAMES

PROG = "sd3_train_network.py"
# TrainConfig fields that sd-scripts' networks.lora_sd3 takes as --network_args "key=value".
NETWORK_ARG_FIELDS = TYPE_DIM_NAMES + ("emb_dims", "train_block_indices", "split_qkv", "rank_dropout",
                                       "module_dropout", "verbose", "train_t5xxl", "loraplus_lr_ratio")
# Fields given as a list on sd-scripts' command line, and how the list joins into the field's text.
LIST_FIELDS = {"optimizer_args": " ", "text_encoder_lr": ","}
# sd-scripts' defaults where they differ from TrainConfig's (seed None: a random seed, printed).
SD_SCRIPTS_DEFAULTS = {"network_dim": 4, "learning_rate": 2e-6, "seed": None, "network_train_unet_only": False}
CHOICES = {"optimizer_type": OPTIMIZERS, "lr_scheduler": LR_SCHEDULERS, "mixed_precision": MIXED_PRECISION,
           "weighting_scheme": WEIGHTING_SCHEMES, "loss_type": LOSS_TYPES, "huber_schedule": HUBER_SCHEDULES}
NETWORK_MODULES = ("networks.lora_sd3", "networks.lora")  # the guide's example command names networks.lora

# sd-scripts arguments that do not apply here, and why (refused with the reason).
REFUSED = {
    "v2": "it selects Stable Diffusion 2.x; SD3 / SD3.5 models are detected from the checkpoint",
    "v_parameterization": "SD3 predicts rectified-flow velocity, not v-prediction",
    "clip_skip": "SD3 uses its text encoders' fixed layers; there is no CLIP skip",
    "in_json": "fine-tuning metadata files are not read; use --dataset_config or --train_data_dir "
               "(images with caption files)",
}
# sd-scripts dataset options that only a --dataset_config can set here (the folder arguments
# make one subset per folder, with the options of the image-folder node).
DATASET_CONFIG_ONLY = ("shuffle_caption", "keep_tokens", "keep_tokens_separator", "caption_separator",
                       "caption_prefix", "caption_suffix", "caption_dropout_rate",
                       "caption_dropout_every_n_epochs", "caption_tag_dropout_rate", "enable_wildcard",
                       "color_aug", "random_crop", "dataset_repeats", "class_tokens")
# Accepted for compatibility; they change nothing here (no DataLoader workers: the data is encoded once).
IGNORED = ("max_data_loader_n_workers", "persistent_data_loader_workers", "ddp_gradient_as_bucket_view",
           "ddp_static_graph", "sample_sampler", "lowram", "highvram", "save_state_on_train_end")


class CliError(ValueError):
    """A bad command line: the message names the argument and the fix."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises CliError (one message) instead of printing usage and exiting."""

    def error(self, message):
        raise CliError(message)


def _field_types() -> Dict[str, type]:
    """TrainConfig field -> its plain type (int, float, str, bool), Optional unwrapped."""
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for f in dataclasses.fields(TrainConfig):
        kind = hints[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        out[f.name] = args[0] if args else kind
    return out


def flag_fields() -> List[str]:
    """TrainConfig fields that are command-line flags (the others go in --network_args)."""
    return [f.name for f in dataclasses.fields(TrainConfig) if f.name not in NETWORK_ARG_FIELDS] + ["loraplus_lr_ratio"]


def _add_train_options(parser: argparse.ArgumentParser, tips: Dict[str, str]) -> None:
    """One flag per TrainConfig field (not the --network_args ones), typed and defaulted from it."""
    types, defaults = _field_types(), TrainConfig()
    group = parser.add_argument_group("training (the nodes' Settings / Optimizer / Advanced options)")
    for name in dict.fromkeys(flag_fields()):
        default = SD_SCRIPTS_DEFAULTS.get(name, getattr(defaults, name))
        help_text = tips.get(name, "") + (f" (default {default})" if default not in (None, "", False) else "")
        if types[name] is bool:
            group.add_argument(f"--{name}", action="store_true", default=default, help=help_text)
        elif name in LIST_FIELDS:
            group.add_argument(f"--{name}", nargs="*", default=None, help=help_text)
        else:
            group.add_argument(f"--{name}", type=types[name], default=default, choices=CHOICES.get(name),
                               help=help_text)


def _add(group, name: str, help_text: str, **kwargs) -> None:
    group.add_argument(f"--{name}", help=help_text, **kwargs)


def _add_model_options(parser) -> None:
    g = parser.add_argument_group("models")
    _add(g, "pretrained_model_name_or_path", "the SD3 / SD3.5 .safetensors checkpoint (with or without its "
         "text encoders and VAE)")
    for name, what in (("clip_l", "CLIP-L"), ("clip_g", "CLIP-G"), ("t5xxl", "T5-XXL")):
        _add(g, name, f"{what} text-encoder file; without --clip_l/--clip_g/--t5xxl the checkpoint's own are used")
    _add(g, "vae", "VAE file; without it the checkpoint's own VAE is used")
    _add(g, "sdpa", "PyTorch scaled-dot-product attention (the host's --use-pytorch-cross-attention)",
         action="store_true")


def _add_dataset_options(parser) -> None:
    g = parser.add_argument_group("dataset")
    _add(g, "dataset_config", "sd-scripts dataset config (.toml)")
    _add(g, "train_data_dir", "folder of captioned images, or of kohya N_name repeat folders")
    _add(g, "reg_data_dir", "folder of regularisation images (same layout)")
    _add(g, "resolution", "training size: 512 or 512,512 (square with the folder arguments)")
    _add(g, "caption_extension", "extension of the caption files (default .caption, as sd-scripts)")
    _add(g, "enable_bucket", "aspect-ratio buckets", action="store_true")
    _add(g, "min_bucket_reso", "smallest bucket side", type=int, default=256)
    _add(g, "max_bucket_reso", "largest bucket side", type=int, default=1024)
    _add(g, "bucket_reso_steps", "bucket sides are multiples of this", type=int, default=64)
    _add(g, "bucket_no_upscale", "never enlarge images", action="store_true")
    _add(g, "flip_aug", "random horizontal flips", action="store_true")
    _add(g, "alpha_mask", "transparency as the loss mask", action="store_true")
    _add(g, "prior_loss_weight", "loss weight of regularisation images", type=float, default=1.0)
    _add(g, "validation_split", "fraction of the images held out for validation", type=float, default=0.0)
    _add(g, "validation_seed", "which images are held out", type=int, default=0)
    _add(g, "validate_every_n_steps", "validation loss every N steps (0 = off)", type=int, default=0)
    for kind in ("latents", "text_encoder_outputs"):
        _add(g, f"cache_{kind}", f"encode the {kind.replace('_', ' ')} once and keep them in memory",
             action="store_true")
        _add(g, f"cache_{kind}_to_disk", f"also keep the {kind.replace('_', ' ')} on disk for later runs",
             action="store_true")


def _add_output_options(parser) -> None:
    g = parser.add_argument_group("output")
    _add(g, "output_dir", "folder of the LoRA, its .loss.json, step/epoch files, states and samples")
    _add(g, "output_name", "file name without extension (default last, as sd-scripts)", default="last")
    _add(g, "save_model_as", "safetensors (the only format written)", default="safetensors")
    _add(g, "save_precision", "fp16, bf16 or float (default float)", default="float", choices=("fp16", "bf16", "float"))
    _add(g, "diffusers_export", "also write <name>.diffusers.safetensors (diffusers/PEFT names)", action="store_true")
    _add(g, "save_every_n_steps", "write <name>-stepNNNNNNNN.safetensors every N steps", type=int, default=0)
    _add(g, "save_every_n_epochs", "write <name>-NNNNNN.safetensors every N epochs", type=int, default=0)
    _add(g, "save_last_n_steps", "delete step files older than N steps (0 keeps all)", type=int, default=0)
    _add(g, "save_last_n_epochs", "keep only the newest N epoch files (0 keeps all)", type=int, default=0)
    _add(g, "save_state", "with each save, write the training state folder <name>-...-state", action="store_true")
    _add(g, "resume", "continue from a state folder written by --save_state")
    _add(g, "max_train_epochs", "train this many epochs (overrides --max_train_steps)", type=int, default=None)
    _add(g, "steps", "stop after this many steps in total (the train node's steps); the schedule still "
         "spans --max_train_steps (default: train until max_train_steps)", type=int, default=None)
    _add(g, "write_workflow", "write the editor workflow of this command line to FILE and exit", metavar="FILE")
    _add(g, "config_file", "sd-scripts arguments in TOML; the command line overrides them", metavar="FILE.toml")
    _add(g, "output_config", "write the arguments as a --config_file TOML to <output_dir>/<output_name>.toml "
         "and exit", action="store_true")


def _add_network_options(parser, tips) -> None:
    g = parser.add_argument_group("network")
    _add(g, "network_module", "networks.lora_sd3 (the LoRA this pack trains)", default="networks.lora_sd3")
    _add(g, "network_args", "lora_sd3 options as key=value: " + ", ".join(NETWORK_ARG_FIELDS), nargs="*")
    _add(g, "unet_lr", "learning rate of the MMDiT LoRA (default --learning_rate)", type=float, default=None)


def _add_sampling_and_logging(parser) -> None:
    g = parser.add_argument_group("samples and logs")
    _add(g, "sample_prompts", "text file of prompts, one a line, with --w --h --s --l --d --n")
    _add(g, "sample_every_n_steps", "sample every N steps", type=int, default=0)
    _add(g, "sample_every_n_epochs", "sample every N epochs", type=int, default=0)
    _add(g, "sample_at_first", "also sample before training", action="store_true")
    _add(g, "logging_dir", "folder of the TensorBoard logs (with --log_with tensorboard)")
    _add(g, "log_with", "tensorboard (the only logger here)", choices=("tensorboard",))
    _add(g, "log_prefix", "prefix of the log run's folder name")
    _add(g, "ddp_timeout", "minutes a collective waits for a process that hangs (default 30)", type=float, default=None)


def build_parser(tips: Optional[Dict[str, str]] = None) -> argparse.ArgumentParser:
    """The parser of every accepted argument; ``tips``: help texts by option name (the nodes' tooltips)."""
    parser = _Parser(prog=PROG, allow_abbrev=False, description="Train an SD3 / SD3.5 LoRA with sd-scripts' "
                     "sd3_train_network.py arguments, on this ComfyUI pack's trainer.")
    _add_model_options(parser)
    _add_dataset_options(parser)
    _add_network_options(parser, tips or {})
    _add_train_options(parser, tips or {})
    _add_output_options(parser)
    _add_sampling_and_logging(parser)
    hidden = parser.add_argument_group("accepted, no effect here")
    for name in IGNORED:
        hidden.add_argument(f"--{name}", nargs="?", const=True, default=None, help=argparse.SUPPRESS)
    for name in tuple(REFUSED) + DATASET_CONFIG_ONLY:
        hidden.add_argument(f"--{name}", nargs="?", const=True, default=None, help=argparse.SUPPRESS)
    return parser


def option_names(parser: argparse.ArgumentParser) -> List[str]:
    """Every long option the parser accepts, without dashes."""
    return sorted({s[2:] for a in parser._actions for s in a.option_strings if s.startswith("--")})


def unknown_error(parser: argparse.ArgumentParser, unknown: Sequence[str], where: str = "") -> CliError:
    """The error for unknown arguments, listing the close valid names."""
    names = [u.split("=", 1)[0].lstrip("-") for u in unknown if u.startswith("-")] or list(unknown)
    name = names[0]
    close = difflib.get_close_matches(name, option_names(parser), n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else "; see --help for the arguments"
    return CliError(f"unknown argument --{name}{where}{hint}")


def check_refused(args: argparse.Namespace) -> None:
    """Refuse sd-scripts arguments that do not apply, with the reason and the fix."""
    for name, reason in REFUSED.items():
        if getattr(args, name, None) is not None:
            raise CliError(f"--{name} does not apply to SD3: {reason}. Remove it")
    if args.network_module not in NETWORK_MODULES:
        raise CliError(f"--network_module {args.network_module} is not supported: this trainer trains "
                       f"networks.lora_sd3 (sd-scripts' SD3 LoRA); use --network_module networks.lora_sd3")
    if args.save_model_as != "safetensors":
        raise CliError(f"--save_model_as {args.save_model_as}: only safetensors is written; "
                       f"use --save_model_as safetensors")


def parse_network_args(items: Optional[Sequence[str]]) -> Dict[str, object]:
    """``--network_args "key=value" ...`` as TrainConfig values (typed from its fields).

    Raises:
        CliError: for an item without '=', an unknown key (listing the close ones) or a bad value.
    """
    types, out = _field_types(), {}
    for item in items or []:
        if "=" not in item:
            raise CliError(f"--network_args item {item!r} is not key=value, e.g. \"split_qkv=True\"")
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in NETWORK_ARG_FIELDS:
            close = difflib.get_close_matches(key, NETWORK_ARG_FIELDS, n=3, cutoff=0.5)
            raise CliError(f"--network_args key {key!r} is not a networks.lora_sd3 option"
                           + (f"; did you mean {', '.join(close)}?" if close else
                              f"; the keys are: {', '.join(NETWORK_ARG_FIELDS)}"))
        out[key] = _typed(key, value, types[key])
    return out


def _typed(key: str, value: str, kind: type):
    """A --network_args value as the field's type (bool: true/false/1/0; emb_dims stays text)."""
    if kind is bool:
        if value.lower() not in ("true", "false", "1", "0"):
            raise CliError(f"--network_args {key}={value}: use {key}=True or {key}=False")
        return value.lower() in ("true", "1")
    try:
        return kind(value)
    except ValueError:
        raise CliError(f"--network_args {key}={value}: {key} takes a {kind.__name__}") from None
