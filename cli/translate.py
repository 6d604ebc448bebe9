"""Parsed arguments -> what the nodes take: a TrainConfig, the dataset node and its inputs, the
model files, and the save and sample options; and a TrainConfig back to arguments.

One table in each direction, so the command line, ``--write_workflow`` and the Save node's
``<name>.toml`` all mean the same run.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import random
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..trainer.config import TrainConfig
from ..trainer.data import DEFAULT_MAX_PIXELS
from .arguments import DATASET_CONFIG_ONLY, LIST_FIELDS, NETWORK_ARG_FIELDS, CliError, flag_fields, parse_network_args

FOLDER_ONLY = ("reg_data_dir", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
               "bucket_no_upscale", "flip_aug", "alpha_mask", "validation_split", "validation_seed")
CACHES = ("latents", "text_encoder_outputs")


@dataclass(frozen=True)
class ModelFiles:
    """The model files of a run: the checkpoint, the text encoders given apart (in --clip_l,
    --clip_g, --t5xxl order), the VAE given apart, and whether the MMDiT loads as float8."""

    checkpoint: str
    text_encoders: Tuple[str, ...] = ()
    vae: Optional[str] = None
    fp8: bool = False


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset node (its class name) and its inputs, as the workflow would hold them."""

    node: str
    inputs: Dict[str, object]


@dataclass(frozen=True)
class Outputs:
    """Where and what the run writes, and when (sd-scripts' --save_* options)."""

    output_dir: str
    output_name: str = "last"
    save_precision: str = "float"
    diffusers_export: bool = False
    every_n_steps: int = 0
    every_n_epochs: int = 0
    last_n_steps: int = 0
    last_n_epochs: int = 0
    save_state: bool = False


@dataclass(frozen=True)
class Sampling:
    """sd-scripts' --sample_* options; ``prompts`` is the prompt file's text."""

    prompts: str = ""
    every_n_steps: int = 0
    every_n_epochs: int = 0
    at_first: bool = False


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The validated TrainConfig of the arguments (a random seed is drawn when --seed is not given).

    Raises:
        CliError: for a bad value, naming the argument and the fix.
    """
    values = {name: getattr(args, name) for name in dict.fromkeys(flag_fields())}
    for name, sep in LIST_FIELDS.items():
        values[name] = sep.join(values[name] or [])
    values.update(parse_network_args(args.network_args))
    if args.unet_lr is not None:
        values["learning_rate"] = args.unet_lr
    if values["seed"] is None:
        values["seed"] = random.randint(0, 2 ** 32 - 1)  # sd-scripts' default: a random seed
    try:
        return TrainConfig(**values).validate()
    except ValueError as e:
        raise CliError(f"{e} (--{_named_field(str(e))})") from None


def _named_field(message: str) -> str:
    """The TrainConfig field a validation message starts with or names (for the --flag hint)."""
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name in message]
    return max(names, key=len) if names else "help"


def config_args(config: TrainConfig) -> Dict[str, object]:
    """A TrainConfig as command-line arguments: every flag field, and --network_args for the rest
    (only the values that differ from the default)."""
    out: Dict[str, object] = {}
    defaults = TrainConfig()
    for name in dict.fromkeys(flag_fields()):
        value = getattr(config, name)
        if name in LIST_FIELDS:
            value = [v for v in value.replace(",", " ").split(" ") if v] if name == "text_encoder_lr" else \
                ([value] if value else [])
        out[name] = value
    out["network_args"] = [f"{k}={getattr(config, k)}" for k in NETWORK_ARG_FIELDS
                           if getattr(config, k) != getattr(defaults, k) and getattr(config, k) is not None]
    return out


def _given(args: argparse.Namespace, parser: argparse.ArgumentParser, name: str) -> bool:
    """Whether ``name`` differs from its default (was given on the command line or in the config file)."""
    return getattr(args, name) not in (None, False, parser.get_default(name))


def _resolution(text: Optional[str], square: bool) -> Optional[int]:
    """--resolution "512" or "512,512" as one side (only square here)."""
    if text is None:
        return None
    parts = [p for p in str(text).replace("x", ",").split(",") if p.strip()]
    try:
        sides = [int(p) for p in parts]
    except ValueError:
        raise CliError(f"--resolution {text}: use a size like 1024 or 1024,1024") from None
    if len(sides) not in (1, 2) or (square and len(set(sides)) != 1):
        raise CliError(f"--resolution {text}: the folder arguments train square images (e.g. 1024); for "
                       f"{text} use a --dataset_config with resolution = [w, h]")
    return sides[0]


def _cache_mode(args: argparse.Namespace, kind: str) -> str:
    if getattr(args, f"cache_{kind}_to_disk"):
        return "disk"
    return "memory" if getattr(args, f"cache_{kind}") else "none"


def dataset_spec(args: argparse.Namespace, parser: argparse.ArgumentParser) -> DatasetSpec:
    """The dataset node of the arguments: the image-folder node for --train_data_dir (or for a
    --dataset_config with --resolution / --caption_extension as its defaults), else the TOML node.

    Raises:
        CliError: for no dataset or two, and for options that only the other kind can set.
    """
    if bool(args.dataset_config) == bool(args.train_data_dir):
        raise CliError("pass one of --dataset_config FILE.toml or --train_data_dir DIR"
                       + (" (not both)" if args.dataset_config else ""))
    for name in DATASET_CONFIG_ONLY:
        if getattr(args, name) is not None:
            raise CliError(f"--{name}: set {name} in a [[datasets.subsets]] table of a --dataset_config file "
                           f"(the folder arguments make plain subsets)")
    common = {"cache_latents": _cache_mode(args, "latents"), "cache_dir": "",
              "cache_text_encoder_outputs": _cache_mode(args, "text_encoder_outputs"),
              "prior_loss_weight": args.prior_loss_weight, "validate_every_n_steps": args.validate_every_n_steps,
              "max_megapixels": DEFAULT_MAX_PIXELS // 2 ** 20}
    if args.dataset_config:
        toml_path = os.path.abspath(os.path.expanduser(args.dataset_config))
        for name in FOLDER_ONLY:
            if _given(args, parser, name):
                raise CliError(f"--{name} with --dataset_config: set {name} in the dataset config file "
                               f"({toml_path}), or use --train_data_dir")
        if args.resolution is None and args.caption_extension is None:
            return DatasetSpec("SD3LoraDatasetConfig", dict(common, toml_path=toml_path))
        inputs = _folder_inputs(args, toml_path, _resolution(args.resolution, square=False) or 512)
        return DatasetSpec("SD3LoraImageFolder", dict(inputs, **common))
    resolution = _resolution(args.resolution, square=True)
    if resolution is None:
        raise CliError("--train_data_dir needs --resolution, e.g. --resolution 1024")
    folder = os.path.abspath(os.path.expanduser(args.train_data_dir))
    return DatasetSpec("SD3LoraImageFolder", dict(_folder_inputs(args, folder, resolution), **common))


def _folder_inputs(args: argparse.Namespace, folder: str, resolution: int) -> Dict[str, object]:
    """The image-folder node's own inputs (folder, size, buckets, flips, reg folder, validation)."""
    return {"folder": folder, "resolution": resolution,
            "caption_extension": args.caption_extension if args.caption_extension is not None else ".caption",
            "enable_bucket": args.enable_bucket, "min_bucket_reso": args.min_bucket_reso,
            "max_bucket_reso": args.max_bucket_reso, "bucket_reso_steps": args.bucket_reso_steps,
            "bucket_no_upscale": args.bucket_no_upscale, "alpha_mask": args.alpha_mask, "flip_aug": args.flip_aug,
            "reg_folder": os.path.abspath(os.path.expanduser(args.reg_data_dir)) if args.reg_data_dir else "",
            "validation_split": args.validation_split, "validation_seed": args.validation_seed}


def model_files(args: argparse.Namespace) -> ModelFiles:
    """The model files of the arguments, as absolute paths."""
    if not args.pretrained_model_name_or_path:
        raise CliError("--pretrained_model_name_or_path is required: the SD3 / SD3.5 .safetensors checkpoint")
    path = lambda p: os.path.abspath(os.path.expanduser(p))  # noqa: E731
    encoders = tuple(path(p) for p in (args.clip_l, args.clip_g, args.t5xxl) if p)
    return ModelFiles(path(args.pretrained_model_name_or_path), encoders, path(args.vae) if args.vae else None,
                      bool(args.fp8_base))


def outputs(args: argparse.Namespace) -> Outputs:
    """The save options of the arguments."""
    if not args.output_dir:
        raise CliError("--output_dir is required: the folder the LoRA and its files are written to")
    return Outputs(os.path.abspath(os.path.expanduser(args.output_dir)), args.output_name, args.save_precision,
                   args.diffusers_export, args.save_every_n_steps, args.save_every_n_epochs, args.save_last_n_steps,
                   args.save_last_n_epochs, args.save_state)


def sampling(args: argparse.Namespace) -> Optional[Sampling]:
    """The sample options (None without --sample_prompts); the prompt file is read here."""
    if not args.sample_prompts:
        return None
    path = os.path.expanduser(args.sample_prompts)
    if not os.path.isfile(path):
        raise CliError(f"--sample_prompts {path}: no such file; pass a text file with one prompt a line")
    if path.lower().endswith((".toml", ".json")):
        raise CliError(f"--sample_prompts {path}: only .txt prompt files are read here (one prompt a line with "
                       f"--w --h --s --l --d --n)")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return Sampling(text, args.sample_every_n_steps, args.sample_every_n_epochs, args.sample_at_first)


@dataclass(frozen=True)
class Plan:
    """Everything a run needs from the command line, read and checked once."""

    config: TrainConfig
    dataset: DatasetSpec
    models: ModelFiles
    outputs: Outputs
    sampling: Optional[Sampling]
    max_train_epochs: Optional[int] = None
    steps: Optional[int] = None
    resume: Optional[str] = None
    log: Dict[str, object] = field(default_factory=dict)  # logging_dir, log_with, log_prefix
    sdpa: bool = False


def plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Plan:
    """Read every argument into a Plan (CliError for the first bad one)."""
    if args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk:
        if not args.network_train_unet_only:
            raise CliError("--cache_text_encoder_outputs needs --network_train_unet_only: without it the text "
                           "encoders are trained (as in sd-scripts), so their outputs change every step")
    for name in ("max_train_epochs", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise CliError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if args.network_weights and not os.path.isfile(os.path.expanduser(args.network_weights)):
        raise CliError(f"--network_weights {args.network_weights}: no such file; pass a LoRA .safetensors file "
                       f"to start from")
    if args.log_with and not args.logging_dir:
        raise CliError("--log_with tensorboard needs --logging_dir DIR (where the event files go)")
    return Plan(train_config(args), dataset_spec(args, parser), model_files(args), outputs(args), sampling(args),
                args.max_train_epochs, args.steps, args.resume,
                {"logging_dir": args.logging_dir, "log_with": args.log_with, "log_prefix": args.log_prefix or ""},
                args.sdpa)


def encoder_args(paths: List[str]) -> Dict[str, str]:
    """Text-encoder files as --clip_l / --clip_g / --t5xxl, in the order the stock loaders list them."""
    return dict(zip(("clip_l", "clip_g", "t5xxl"), paths))
