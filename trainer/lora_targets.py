"""Which MMDiT layers get a LoRA and at which rank: sd-scripts' ``lora_sd3`` network_args."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

from torch import nn

# Linear layers wrapped inside every joint block half (context_block and x_block) by default.
JOINT_BLOCK_TARGETS = ("attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj", "mlp.fc1", "mlp.fc2",
                       "adaLN_modulation.1")
# emb_dims order, as sd-scripts: context_embedder, t_embedder, x_embedder, y_embedder,
# final layer modulation, final layer linear.
EMB_TARGETS = (
    ("context_embedder",),
    ("t_embedder.mlp.0", "t_embedder.mlp.2"),
    ("x_embedder.proj",),
    ("y_embedder.mlp.0", "y_embedder.mlp.2"),
    ("final_layer.adaLN_modulation.1",),
    ("final_layer.linear",),
)
TYPE_DIM_NAMES = ("context_attn_dim", "context_mlp_dim", "context_mod_dim", "x_attn_dim", "x_mlp_dim", "x_mod_dim")


@dataclass(frozen=True)
class TargetSpec:
    """One layer to adapt: its module path, LoRA rank, and how many fused parts (3 for split qkv)."""

    path: str
    rank: int
    splits: int = 1


def parse_block_selection(selection: str, num_blocks: int) -> List[bool]:
    """sd-scripts' ``train_block_indices``: "all", "none", or indices and ranges like "0,1,4-5".

    Example:
        >>> parse_block_selection("0,2-3", 5)
        [True, False, True, True, False]
    """
    text = (selection or "all").strip().lower()
    if text == "all":
        return [True] * num_blocks
    if text in ("none", ""):
        return [False] * num_blocks
    chosen = [False] * num_blocks
    for part in text.split(","):
        part = part.strip()
        try:
            lo, hi = (int(x) for x in part.split("-")) if "-" in part else (int(part), int(part))
        except ValueError:
            raise ValueError(f"train_block_indices: cannot read {part!r}; use 'all', 'none' or indices like "
                             f"'0,1,4-5'") from None
        if not (0 <= lo <= hi < num_blocks):
            raise ValueError(f"train_block_indices: {part!r} is outside the model's blocks 0-{num_blocks - 1}")
        for i in range(lo, hi + 1):
            chosen[i] = True
    return chosen


def parse_emb_dims(value) -> Optional[List[int]]:
    """``emb_dims``: six ranks (context, t, x, y, final_mod, final_linear), e.g. "[4,0,0,4,0,0]"."""
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        text = value.strip().strip("[]")
        try:
            value = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"emb_dims: {text!r} is not a list of integers; use e.g. [4,0,0,4,0,0]") from None
    dims = [int(v) for v in value]
    if len(dims) != 6 or any(d < 0 for d in dims):
        raise ValueError(f"emb_dims needs six ranks >= 0 (context_embedder, t_embedder, x_embedder, y_embedder, "
                         f"final_mod, final_linear), got {dims}")
    return dims


def _type_index(path: str) -> Optional[int]:
    """Index into TYPE_DIM_NAMES for a joint-block layer path (attn covers attn2, as in sd-scripts)."""
    half = 0 if ".context_block." in path else 3 if ".x_block." in path else None
    if half is None:
        return None
    for offset, word in enumerate(("attn", "mlp", "adaLN_modulation")):
        if f".{word}" in path:
            return half + offset
    return None


def select_targets(mmdit: nn.Module, network_dim: int, type_dims: Sequence[Optional[int]] = (None,) * 6,
                   train_block_indices: str = "all", emb_dims=None, split_qkv: bool = False) -> List[TargetSpec]:
    """The layers of ``mmdit`` to adapt, as sd-scripts' lora_sd3 chooses them, with their ranks.

    A type dim of 0 skips that layer type; None uses ``network_dim``.
    """
    num_blocks = len(getattr(mmdit, "joint_blocks", []))
    blocks = parse_block_selection(train_block_indices, num_blocks)
    targets = []
    for name, module in mmdit.named_modules():
        parts = name.split(".")
        if len(parts) < 4 or parts[0] != "joint_blocks" or parts[2] not in ("context_block", "x_block"):
            continue
        if ".".join(parts[3:]) not in JOINT_BLOCK_TARGETS or not isinstance(module, nn.Linear):
            continue
        idx = _type_index(name)
        rank = type_dims[idx] if idx is not None and type_dims[idx] is not None else network_dim
        if rank and blocks[int(parts[1])]:
            splits = 3 if split_qkv and name.endswith("qkv") else 1
            targets.append(TargetSpec(name, int(rank), splits))
    for rank, paths in zip(parse_emb_dims(emb_dims) or [0] * 6, EMB_TARGETS):
        for path in paths:
            if rank and isinstance(_find(mmdit, path), (nn.Linear, nn.Conv2d)):
                targets.append(TargetSpec(path, rank))
    return targets


# Module classes whose Linear layers sd-scripts' lora_sd3 trains in the text encoders.
TEXT_TARGET_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP", "T5Attention", "T5DenseGatedActDense")


def select_text_targets(encoder: nn.Module, rank: int) -> List[TargetSpec]:
    """Every Linear inside the attention and MLP modules of a CLIP or T5 encoder, at ``rank``."""
    targets = []
    for name, module in encoder.named_modules():
        if type(module).__name__ in TEXT_TARGET_CLASSES:
            for child, layer in module.named_children():
                if isinstance(layer, nn.Linear):
                    targets.append(TargetSpec(f"{name}.{child}", rank))
    return targets


def _find(root: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def type_dims_from(config) -> List[Optional[int]]:
    """The six per-type ranks of a config (None = network_dim)."""
    return [getattr(config, n, None) for n in TYPE_DIM_NAMES]


