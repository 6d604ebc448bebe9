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
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import safetensors.torch
import torch

from . import tensor_tree
from .atomic_files import staged
from .config import TrainConfig
from .lora_targets import TYPE_DIM_NAMES
from .state import TrainState, build_network, build_text_networks, new_train_state

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: every optimizer's whole state_dict (nested tensors, tuples); 1 is still read
# Top-level keys of a state dict.
LORA = "lora"            # the network's parameters by name, in their training dtype
OPTIMIZER = "optimizer"  # {"state_dict": the optimizer's own state_dict(), "scheduler", "scaler"}
RNG = "rng"              # the session generator's state (uint8 tensor): data order, noise, dropouts
PROGRESS = "progress"    # Progress.state_dict()
CONFIG = "config"        # TrainConfig.to_dict()
NETWORK = "network"      # {"targets": [module paths]}, for reading; the layout comes from CONFIG
INFO = "info"            # session facts for the LoRA metadata (variant, dataset dirs, session id...)
VERSION = "format_version"
PAIR = "pair"            # the same random id in both files of one save: a mixed pair is refused
# Config values that define the network (which layers, ranks, scale, dtype): on resume the saved ones win.
ARCHITECTURE_KEYS = ("network_dim", "network_alpha") + TYPE_DIM_NAMES + (
    "emb_dims", "train_block_indices", "split_qkv", "full_bf16", "network_train_unet_only", "train_t5xxl")


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


def _copy_tensors(tree):
    """``tree`` with every tensor replaced by a detached CPU copy (the optimizer keeps updating its own)."""
    return tensor_tree.join(*tensor_tree.split(tree))


def state_dict(state: TrainState, info: dict) -> dict:
    """A detached copy of everything needed to continue ``state`` bit for bit."""
    network = state.network
    scheduler, scaler = getattr(state, "scheduler", None), getattr(state, "scaler", None)
    return {
        VERSION: FORMAT_VERSION,
        LORA: {k: v.detach().cpu().clone() for k, v in _all_params(network, state.text_networks).items()},
        OPTIMIZER: _copy_tensors({"state_dict": state.optimizer.state_dict(),
                                  "scheduler": scheduler.state_dict() if scheduler is not None else None,
                                  "scaler": scaler.state_dict() if scaler is not None else None}),
        RNG: state.generator.get_state().clone(),
        PROGRESS: Progress.of(state).state_dict(),
        CONFIG: state.config.to_dict(),
        NETWORK: {"targets": list(network.paths)},
        INFO: json.loads(json.dumps(info, default=str)),
    }


def state_paths(stem: str | os.PathLike) -> Tuple[Path, Path]:
    """(tensor file, json file) of the state at ``stem``."""
    stem = Path(stem)
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_state(stem: str | os.PathLike, ckpt: dict) -> Path:
    """Write ``<stem>.safetensors`` (every tensor) and ``<stem>.json`` (the rest); returns the json path.

    Both are written whole before either replaces an older state (:mod:`atomic_files`), the json
    last; the two carry the same pair id, so a pair mixed by a crash between the renames is refused
    on loading instead of resuming wrongly.

    Raises:
        OSError: naming the file and the fix when the disk is full or the folder not writable.
    """
    tree, tensors = tensor_tree.split({k: v for k, v in ckpt.items() if k != VERSION})
    pair = secrets.token_hex(8)
    text = json.dumps(dict(tree, **{VERSION: FORMAT_VERSION, PAIR: pair}))  # before any file is touched
    tensor_path, json_path = state_paths(stem)
    with staged([tensor_path, json_path]) as (tensor_temp, json_temp):
        safetensors.torch.save_file(tensors, str(tensor_temp), metadata={PAIR: pair, VERSION: str(FORMAT_VERSION)})
        json_temp.write_text(text, encoding="utf-8")
    return json_path


def state_stem(path: str | os.PathLike) -> Path:
    """The common stem of a state's two files, given either file or the stem itself."""
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".json", ".safetensors") else path


def _damaged(path: Path, error: BaseException) -> ValueError:
    return ValueError(f"training state file {path} is damaged ({error}); it was cut short or changed after it "
                      f"was saved. Resume from another state (e.g. an earlier periodic one) or start a new run")


def read_state_json(path: str | os.PathLike) -> dict:
    """The json half of a state, checked for its format version.

    Raises:
        FileNotFoundError: naming both files when one is missing.
        ValueError: naming the file when it is damaged or of an unknown format version.
    """
    tensor_path, json_path = state_paths(state_stem(path))
    for p in (json_path, tensor_path):
        if not p.is_file():
            raise FileNotFoundError(f"training state file {p} not found: a state is the pair {json_path.name} + "
                                    f"{tensor_path.name} written by 'SD3 LoRA Save State' (or Save Every's save_state)")
    try:
        ckpt = json.loads(json_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise _damaged(json_path, e) from e
    if not isinstance(ckpt, dict) or ckpt.get(VERSION) not in (1, FORMAT_VERSION):
        version = ckpt.get(VERSION) if isinstance(ckpt, dict) else None
        raise ValueError(f"{json_path} has state format {version!r}; this version reads 1 and {FORMAT_VERSION}")
    return ckpt


def check_state_files(path: str | os.PathLike) -> None:
    """Cheap checks of a saved state, for queue time: the json parses and the tensor file is whole
    (its header read, its length checked; no tensor data loaded). Raises as :func:`read_state_json`."""
    ckpt = read_state_json(path)
    tensor_path = state_paths(state_stem(path))[0]
    try:
        with safetensors.safe_open(str(tensor_path), "pt") as f:
            pair = (f.metadata() or {}).get(PAIR)
    except Exception as e:  # safetensors raises its own error type for a damaged file
        raise _damaged(tensor_path, e) from e
    _check_pair(ckpt, pair, tensor_path)


def _check_pair(ckpt: dict, pair: Optional[str], tensor_path: Path) -> None:
    if ckpt.get(VERSION, 1) >= 2 and pair != ckpt.get(PAIR):
        raise ValueError(f"{tensor_path} and its .json are from different saves (a save was interrupted between "
                         f"the two files): resume from another state, e.g. an earlier periodic one")


def load_state(path: str | os.PathLike) -> dict:
    """Read a state written by :func:`save_state` (``path``: either file, or their common stem).

    Raises:
        FileNotFoundError: naming both files when one is missing.
        ValueError: naming the file when it is damaged, mixed with another save's, or of an
            unknown format version.
    """
    ckpt = read_state_json(path)
    tensor_path = state_paths(state_stem(path))[0]
    try:
        with safetensors.safe_open(str(tensor_path), "pt") as f:
            pair = (f.metadata() or {}).get(PAIR)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise _damaged(tensor_path, e) from e
    _check_pair(ckpt, pair, tensor_path)
    if ckpt[VERSION] == 1:
        return _from_version_1(ckpt, tensors)
    try:
        return dict(tensor_tree.join(ckpt, tensors), **{VERSION: FORMAT_VERSION})
    except KeyError as e:
        raise _damaged(tensor_path, f"no tensor {e}") from e


def _from_version_1(ckpt: dict, tensors: Dict[str, torch.Tensor]) -> dict:
    """A format-1 state (flat optimizer tensors and scalars) in the current layout."""
    ckpt[LORA] = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(LORA + "/")}
    flat = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(OPTIMIZER + "/")}
    saved = ckpt[OPTIMIZER]
    state: Dict[int, dict] = {}
    for entries in (flat, saved["scalars"]):
        for key, value in entries.items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
    # JSON has no tuples; torch's optimizers document betas as a tuple.
    groups = [dict(g, betas=tuple(g["betas"])) if isinstance(g.get("betas"), list) else dict(g)
              for g in saved["param_groups"]]
    ckpt[OPTIMIZER] = {"state_dict": {"state": state, "param_groups": groups},
                       "scheduler": saved.get("scheduler"), "scaler": saved.get("scaler")}
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
    # Copies: tensors read under the host's inference mode cannot be updated in place later.
    state.optimizer.load_state_dict(_copy_tensors(opt["state_dict"]))
    if opt.get("scheduler") is not None and getattr(state, "scheduler", None) is not None:
        state.scheduler.load_state_dict(opt["scheduler"])
    if opt.get("scaler") and getattr(state, "scaler", None) is not None:
        state.scaler.load_state_dict(opt["scaler"])
    state.generator.set_state(ckpt[RNG])
    progress = Progress(**ckpt[PROGRESS])
    state.step, state.losses, state.order = progress.step, list(progress.losses), progress.order
    state.cursor, state.epoch = progress.cursor, progress.epoch
    return state, warnings
