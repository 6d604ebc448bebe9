"""LoRA modules for the SD3 MMDiT, named and targeted as sd-scripts' ``networks/lora_sd3.py``."""
from __future__ import annotations

import math
from typing import Dict, Iterator, List, Tuple

import torch
from torch import nn

# Linear layers that sd-scripts' lora_sd3 wraps inside every joint block half
# (context_block and x_block). attn2.* only exists on SD3.5 Medium's first blocks.
JOINT_BLOCK_TARGETS = (
    "attn.qkv",
    "attn.proj",
    "attn2.qkv",
    "attn2.proj",
    "mlp.fc1",
    "mlp.fc2",
    "adaLN_modulation.1",
)
UNET_PREFIX = "lora_unet_"


def _init_down(weight: torch.Tensor) -> None:
    """Kaiming-uniform init of the down (A) matrix, as nn.Linear and sd-scripts do."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def _init_up(weight: torch.Tensor) -> None:
    """Zero init of the up (B) matrix, so a fresh LoRA leaves the model unchanged."""
    nn.init.zeros_(weight)


def new_lora_pair(in_features: int, out_features: int, rank: int, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> Tuple[nn.Parameter, nn.Parameter]:
    """Fresh (down [rank, in], up [out, rank]) parameters: down kaiming-uniform, up zeros."""
    down = torch.empty(rank, in_features, dtype=dtype, device=device)
    up = torch.empty(out_features, rank, dtype=dtype, device=device)
    _init_down(down)
    _init_up(up)
    return nn.Parameter(down), nn.Parameter(up)


class LoRALinear(nn.Module):
    """Wraps a frozen linear layer with a low-rank update.

    ``y = base(x) + (x @ down.T @ up.T) * multiplier * alpha / rank``

    The base layer is held, not copied (it may be a host Linear that casts its weights
    per call); the LoRA matrices keep their own dtype (float32 by default) and the
    activations are cast to it and back at the boundary.

    Args:
        base_layer: the frozen ``nn.Linear`` (or subclass) to wrap.
        down: [rank, in_features] parameter. up: [out_features, rank] parameter.
        alpha: scale numerator (``network_alpha``); the update is scaled by alpha / rank.
        multiplier: extra strength factor (1.0 while training).

    Raises:
        ValueError: if the parameter shapes do not fit the base layer.
    """

    def __init__(self, base_layer: nn.Linear, down: nn.Parameter, up: nn.Parameter, alpha: float,
                 multiplier: float = 1.0):
        super().__init__()
        rank = down.shape[0]
        if down.shape != (rank, base_layer.in_features) or up.shape != (base_layer.out_features, rank):
            raise ValueError(
                f"LoRA shapes down {tuple(down.shape)} / up {tuple(up.shape)} do not fit a Linear "
                f"{base_layer.in_features}->{base_layer.out_features}")
        self.base_layer = base_layer
        self.lora_down = down
        self.lora_up = up
        self.scale = float(alpha) / rank
        self.multiplier = multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] -> [..., out_features], in the base layer's output dtype."""
        out = self.base_layer(x)
        lx = x.to(self.lora_down.dtype)
        delta = nn.functional.linear(nn.functional.linear(lx, self.lora_down), self.lora_up)
        return out + (delta * (self.multiplier * self.scale)).to(out.dtype)


def _get_parent(root: nn.Module, path: str) -> Tuple[nn.Module, str]:
    """Return (parent module, attribute name) for a dotted module path."""
    parts = path.split(".")
    parent = root
    for p in parts[:-1]:
        parent = getattr(parent, p)
    return parent, parts[-1]


def find_lora_targets(mmdit: nn.Module) -> List[str]:
    """Module paths of the Linear layers sd-scripts' lora_sd3 trains by default.

    Example:
        >>> find_lora_targets(mmdit)[:2]
        ['joint_blocks.0.context_block.attn.qkv', 'joint_blocks.0.context_block.attn.proj']
    """
    targets = []
    for name, module in mmdit.named_modules():
        if not name.startswith("joint_blocks."):
            continue
        parts = name.split(".")
        if len(parts) < 4 or parts[2] not in ("context_block", "x_block"):
            continue
        suffix = ".".join(parts[3:])
        if suffix in JOINT_BLOCK_TARGETS and isinstance(module, nn.Linear):
            targets.append(name)
    return targets


def kohya_name(module_path: str, prefix: str = UNET_PREFIX) -> str:
    """sd-scripts' LoRA module name: ``lora_unet_`` + path with dots as underscores."""
    return prefix + module_path.replace(".", "_")


class LoRANetwork(nn.Module):
    """The set of LoRA modules for one MMDiT, independent of any particular model object.

    The network owns the trainable matrices. ``attach(mmdit)`` swaps the target Linears
    of a model for :class:`LoRALinear` wrappers around them; ``detach()`` puts the
    originals back, so the host's shared model is left as it was after training.

    Args:
        target_shapes: module path -> (in_features, out_features) of each target.
        rank: network_dim. alpha: network_alpha.
    """

    def __init__(self, target_shapes: Dict[str, Tuple[int, int]], rank: int, alpha: float,
                 lora_dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__()
        if rank < 1:
            raise ValueError(f"network_dim must be at least 1, got {rank}. Set network_dim to the LoRA rank, e.g. 16.")
        self.rank, self.alpha = int(rank), float(alpha)
        self.paths = list(target_shapes)
        self.downs = nn.ParameterDict()
        self.ups = nn.ParameterDict()
        for path, (fin, fout) in target_shapes.items():
            key = kohya_name(path)
            self.downs[key], self.ups[key] = new_lora_pair(fin, fout, rank, lora_dtype, device)
        self._attached: List[Tuple[nn.Module, str, nn.Module]] = []

    @classmethod
    def for_model(cls, mmdit: nn.Module, rank: int, alpha: float, lora_dtype: torch.dtype = torch.float32):
        """Build a network for every default target of ``mmdit``."""
        shapes = {}
        for path in find_lora_targets(mmdit):
            lin = mmdit.get_submodule(path)
            shapes[path] = (lin.in_features, lin.out_features)
        if not shapes:
            raise ValueError("the model has no MMDiT joint blocks to put a LoRA on: is it an SD3/SD3.5 model?")
        return cls(shapes, rank, alpha, lora_dtype=lora_dtype, device=next(mmdit.parameters()).device)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def attach(self, mmdit: nn.Module) -> None:
        """Wrap each target Linear of ``mmdit`` with a LoRALinear sharing this network's parameters."""
        if self._attached:
            raise RuntimeError("LoRA network is already attached to a model; detach() it first")
        try:
            for path in self.paths:
                parent, attr = _get_parent(mmdit, path)
                base = getattr(parent, attr)
                key = kohya_name(path)
                wrapper = LoRALinear(base, self.downs[key], self.ups[key], self.alpha)
                setattr(parent, attr, wrapper)
                self._attached.append((parent, attr, base))
        except Exception:
            self.detach()
            raise

    def detach(self) -> None:
        """Restore the original Linears that :meth:`attach` wrapped."""
        while self._attached:
            parent, attr, base = self._attached.pop()
            setattr(parent, attr, base)

    def get_adapter_params(self) -> Dict[str, nn.Parameter]:
        """Trainable parameters by their kohya tensor name."""
        params = {}
        for key in self.downs:
            params[f"{key}.lora_down.weight"] = self.downs[key]
            params[f"{key}.lora_up.weight"] = self.ups[key]
        return params

    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> Dict[str, torch.Tensor]:
        """Tensors in sd-scripts' file layout: lora_down, lora_up and a scalar alpha per module."""
        sd = {}
        for key in self.downs:
            down, up = self.downs[key].detach(), self.ups[key].detach()
            if dtype is not None:
                down, up = down.to(dtype), up.to(dtype)
            sd[f"{key}.lora_down.weight"] = down.contiguous().cpu()
            sd[f"{key}.lora_up.weight"] = up.contiguous().cpu()
            sd[f"{key}.alpha"] = torch.tensor(self.alpha, dtype=dtype or torch.float32)
        return sd
