"""Training state on disk: stop a session and continue it exactly, in another process.

A state is a plain dict under named keys (:data:`LORA`, :data:`OPTIMIZER`, :data:`RNG`,
:data:`PROGRESS`, :data:`CONFIG`, :data:`NETWORK`, :data:`INFO`). On disk it is two files next
to each other: ``<stem>.safetensors`` for every tensor and ``<stem>.json`` for everything else.
No pickle anywhere (``torch.save`` is pickle), so a state file from a stranger cannot run code.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import safetensors.torch
import torch

from .atomic_files import staged
from .config import TrainConfig
from .lora_targets import TYPE_DIM_NAMES
from .state import TrainState, build_network, build_text_networks, new_train_state

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Top-level keys of a state dict.
LORA = "lora"            # the network's parameters by name, in their training dtype
OPTIMIZER = "optimizer"  # {"tensors": {"<param index>.<name>": tensor}, "scalars", "param_groups", "scheduler", "scaler"}
RNG = "rng"              # the session generator's state (uint8 tensor): data order, noise, dropouts
PROGRESS = "progress"    # Progress.state_dict()
CONFIG = "config"        # TrainConfig.to_dict()
NETWORK = "network"      # {"targets": [module paths]}, for reading; the layout comes from CONFIG
INFO = "info"            # session facts for the LoRA metadata (variant, dataset dirs, session id...)
VERSION = "format_version"
# Config values that define the network (which layers, ranks, scale, dtype): on resume the saved ones win.
ARCHITECTURE_KEYS = ("network_dim", "network_alpha") + TYPE_DIM_NAMES + (
    "emb_dims", "train_block_indices", "split_qkv", "full_bf16", "network_train_unet_only", "train_t5xxl")
_TENSOR_SECTIONS = (LORA, OPTIMIZER, RNG)


@dataclass
class Progress:
    """Where a session is: steps done, loss history, and its place in the data order."""

    step: int = 0
    losses: List[float] = field(default_factory=list)
    order: List[List[int]] = field(default_factory=list)
    cursor: int = 0
    epoch: int = 0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def of(cls, state: TrainState) -> "Progress":
        return cls(state.step, list(state.losses), [list(b) for b in state.order], state.cursor, state.epoch)


def state_dict(state: TrainState, info: dict) -> dict:
    """A detached copy of everything needed to continue ``state`` bit for bit."""
    opt = state.optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in opt["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().clone()
            else:
                scalars[f"{index}.{name}"] = value
    network = state.network
    scheduler, scaler = getattr(state, "scheduler", None), getattr(state, "scaler", None)
    return {
        VERSION: FORMAT_VERSION,
        LORA: {k: v.detach().cpu().clone() for k, v in _all_params(network, state.text_networks).items()},
        OPTIMIZER: {"tensors": tensors, "scalars": scalars, "param_groups": opt["param_groups"],
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "scaler": scaler.state_dict() if scaler is not None else None},
        RNG: state.generator.get_state().clone(),
        PROGRESS: Progress.of(state).state_dict(),
        CONFIG: state.config.to_dict(),
        NETWORK: {"targets": list(network.paths)},
        INFO: json.loads(json.dumps(info, default=str)),
    }


def save_state(stem: str | os.PathLike, ckpt: dict) -> Path:
    """Write ``<stem>.safetensors`` (tensors) and ``<stem>.json`` (the rest); returns the json path.

    Both files are written whole before either replaces an older state (:mod:`atomic_files`).
    """
    stem = Path(stem)
    tensors = {f"{LORA}/{k}": v.contiguous() for k, v in ckpt[LORA].items()}
    tensors.update({f"{OPTIMIZER}/{k}": v.contiguous() for k, v in ckpt[OPTIMIZER]["tensors"].items()})
    tensors[RNG] = ckpt[RNG].contiguous()
    rest = {k: v for k, v in ckpt.items() if k not in _TENSOR_SECTIONS}
    rest[OPTIMIZER] = {k: v for k, v in ckpt[OPTIMIZER].items() if k != "tensors"}
    text = json.dumps(rest)  # before any file is touched
    paths = stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")
    with staged(paths) as (tensor_temp, json_temp):
        safetensors.torch.save_file(tensors, str(tensor_temp))
        json_temp.write_text(text, encoding="utf-8")
    return paths[1]


def state_stem(path: str | os.PathLike) -> Path:
    """The common stem of a state's two files, given either file or the stem itself."""
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".json", ".safetensors") else path


def load_state(path: str | os.PathLike) -> dict:
    """Read a state written by :func:`save_state` (``path``: either file, or their common stem).

    Raises:
        FileNotFoundError: naming both files when one is missing.
        ValueError: for a file of another format version.
    """
    stem = state_stem(path)
    json_path, tensor_path = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".safetensors")
    for p in (json_path, tensor_path):
        if not p.is_file():
            raise FileNotFoundError(f"training state file {p} not found: a state is the pair {json_path.name} + "
                                    f"{tensor_path.name} written by 'SD3 LoRA Save State'")
    ckpt = json.loads(json_path.read_text(encoding="utf-8"))
    if ckpt.get(VERSION) != FORMAT_VERSION:
        raise ValueError(f"{json_path} has state format {ckpt.get(VERSION)!r}; this version reads {FORMAT_VERSION}")
    tensors = safetensors.torch.load_file(str(tensor_path))
    ckpt[LORA] = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(LORA + "/")}
    ckpt[OPTIMIZER]["tensors"] = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(OPTIMIZER + "/")}
    ckpt[RNG] = tensors[RNG]
    return ckpt


def reconcile_config(config: TrainConfig, ckpt: dict) -> Tuple[TrainConfig, List[str]]:
    """``config`` with the checkpoint's architecture values (they define the saved tensors' shapes),
    and a warning for each value the config asked differently."""
    saved = ckpt[CONFIG]
    changes, warnings = {}, []
    for key in ARCHITECTURE_KEYS:
        if key in saved and hasattr(config, key) and getattr(config, key) != saved[key]:
            warnings.append(f"{key}: the saved state has {saved[key]!r}, the settings ask {getattr(config, key)!r}; "
                            f"using the saved {saved[key]!r} (a different {key} needs a new run without resume)")
            changes[key] = saved[key]
    return dataclasses.replace(config, **changes), warnings


def _all_params(network, text_networks: dict) -> Dict[str, torch.Tensor]:
    """Every LoRA parameter by name; text-encoder ones as "<encoder>/<name>" (e.g. "clip_l/loras...")."""
    params = dict(network.get_adapter_params())
    for encoder, net in (text_networks or {}).items():
        params.update({f"{encoder}/{k}": v for k, v in net.get_adapter_params().items()})
    return params


def restore(ckpt: dict, mmdit: torch.nn.Module, config: TrainConfig,
            text_encoders: Optional[dict] = None) -> Tuple[TrainState, List[str]]:
    """A TrainState that continues exactly where ``ckpt`` stopped, for ``mmdit`` (and, when the
    state has text-encoder LoRAs, the host's ``text_encoders``: {"clip_l": module, ...}).

    Architecture values (:data:`ARCHITECTURE_KEYS`: ranks, targets, alpha) come from the checkpoint;
    every other setting from ``config``. Returns (state, warnings about settings the checkpoint
    overrode).

    Raises:
        ValueError: when the saved LoRA does not fit ``mmdit`` (another model family or size).
    """
    config, warnings = reconcile_config(config, ckpt)
    for w in warnings:
        log.warning("resume: %s", w)
    # Built fresh, then overwritten: the network's own init is the one place that knows its layout.
    network = build_network(mmdit, dataclasses.replace(config, network_weights="")
                            if hasattr(config, "network_weights") else config)
    text_networks = build_text_networks(text_encoders or {}, config)
    params = _all_params(network, text_networks)
    saved = ckpt[LORA]
    if set(params) != set(saved) or any(params[k].shape != saved[k].shape for k in params):
        raise ValueError(f"the saved state's LoRA does not fit this model ({len(saved)} saved tensors, "
                         f"{len(params)} expected): resume it on the checkpoint it was trained on "
                         f"(variant {ckpt[INFO].get('variant', '?')})")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name])
    state = new_train_state(config, network, text_networks)
    opt = ckpt[OPTIMIZER]
    state.optimizer.load_state_dict(_optimizer_state(opt))
    if opt.get("scheduler") is not None and getattr(state, "scheduler", None) is not None:
        state.scheduler.load_state_dict(opt["scheduler"])
    if opt.get("scaler") and getattr(state, "scaler", None) is not None:
        state.scaler.load_state_dict(opt["scaler"])
    state.generator.set_state(ckpt[RNG])
    progress = Progress(**ckpt[PROGRESS])
    state.step, state.losses, state.order = progress.step, list(progress.losses), progress.order
    state.cursor, state.epoch = progress.cursor, progress.epoch
    return state, warnings


def _optimizer_state(saved: dict) -> dict:
    """The torch optimizer state_dict rebuilt from the flat tensors + scalars of a checkpoint."""
    state: Dict[int, dict] = {}
    for flat in (saved["tensors"], saved["scalars"]):
        for key, value in flat.items():
            index, name = key.split(".", 1)
            # A copy: tensors read under the host's inference mode cannot be updated in place later.
            state.setdefault(int(index), {})[name] = value.clone() if torch.is_tensor(value) else value
    # JSON has no tuples; torch's optimizers document betas as a tuple.
    groups = [dict(g, betas=tuple(g["betas"])) if isinstance(g.get("betas"), list) else dict(g)
              for g in saved["param_groups"]]
    return {"state": state, "param_groups": groups}
