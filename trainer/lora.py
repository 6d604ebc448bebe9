"""LoRA modules for the SD3 MMDiT, named and computed as sd-scripts' ``networks/lora_sd3.py``."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from . import cpu_linear
from .lora_targets import TargetSpec, select_targets
from .precision import Saved, cast_frozen_layers, restore_layers

UNET_PREFIX = "lora_unet_"


def _init_down(weight: torch.Tensor) -> None:
    """Kaiming-uniform init of the down (A) matrix, as nn.Linear and sd-scripts do."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def _init_up(weight: torch.Tensor) -> None:
    """Zero init of the up (B) matrix, so a fresh LoRA leaves the model unchanged."""
    nn.init.zeros_(weight)


def kohya_name(module_path: str, prefix: str = UNET_PREFIX) -> str:
    """sd-scripts' LoRA module name: ``lora_unet_`` + path with dots as underscores."""
    return prefix + module_path.replace(".", "_")


def find_lora_targets(mmdit: nn.Module) -> List[str]:
    """Module paths of the layers sd-scripts' lora_sd3 trains by default (every joint-block Linear).

    Example:
        >>> find_lora_targets(mmdit)[:2]
        ['joint_blocks.0.context_block.attn.qkv', 'joint_blocks.0.context_block.attn.proj']
    """
    return [t.path for t in select_targets(mmdit, network_dim=1)]


class LoRAModule(nn.Module):
    """The trainable half of one adapted layer: ``delta(x) = up(down(x)) · alpha / rank``.

    ``down`` is [rank, in] (or a conv with the base conv's kernel and stride) and ``up`` is
    [out, rank] (1x1 for a conv). With ``splits`` = 3 (sd-scripts' ``split_qkv``) the fused qkv
    output gets three independent (down, up) pairs, one per q, k and v.

    Dropouts (sd-scripts' network_dropout, rank_dropout, module_dropout) apply only in
    training mode and draw from ``generator`` so runs are reproducible and resumable.

    Args:
        base: the frozen nn.Linear or nn.Conv2d it adapts (read for shapes only).
        rank: LoRA rank (>= 1). alpha: scale numerator. splits: 1, or 3 for split qkv.

    Raises:
        ValueError: rank < 1, or an output that cannot be split evenly.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, splits: int = 1, dtype=torch.float32,
                 dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"network_dim (LoRA rank) must be at least 1, got {rank}")
        self.conv = isinstance(base, nn.Conv2d)
        fin = base.in_channels if self.conv else base.in_features
        fout = base.out_channels if self.conv else base.out_features
        if fout % splits:
            raise ValueError(f"cannot split an output of {fout} features into {splits} parts")
        kernel = tuple(base.kernel_size) if self.conv else ()
        self.stride = tuple(base.stride) if self.conv else None
        self.padding = base.padding if self.conv else None
        device = base.weight.device
        self.downs = nn.ParameterList()
        self.ups = nn.ParameterList()
        for _ in range(splits):
            down = torch.empty(rank, fin, *kernel, dtype=dtype, device=device)
            up = torch.empty(fout // splits, rank, *((1, 1) if self.conv else ()), dtype=dtype, device=device)
            _init_down(down)
            _init_up(up)
            self.downs.append(nn.Parameter(down))
            self.ups.append(nn.Parameter(up))
        self.rank, self.alpha, self.splits = rank, float(alpha), splits
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.generator: Optional[torch.Generator] = None
        # False: never the fused fp32 CPU path of trainer/cpu_linear.py (the benchmark's ablation).
        self.fused_cpu = True

    @property
    def scale(self) -> float:
        """alpha / rank, the factor the host's LoRA loader applies too."""
        return self.alpha / self.rank

    def _project(self, x: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """The rank activation of x after the dropouts (not yet scaled)."""
        lx = F.conv2d(x, down, stride=self.stride, padding=self.padding) if self.conv else F.linear(x, down)
        return self._drop(lx)

    def _up(self, lx: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The up projection of a rank activation (a 1x1 conv for a conv module)."""
        return F.conv2d(lx, up) if self.conv else F.linear(lx, up)

    def _rand(self, shape, device) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator).to(device)

    def _drop(self, lx: torch.Tensor) -> torch.Tensor:
        """network_dropout on the rank activations, then rank_dropout (whole rank channels)."""
        if not self.training:
            return lx
        if self.dropout:
            lx = lx * (self._rand(lx.shape, lx.device) >= self.dropout) / (1 - self.dropout)
        if self.rank_dropout:
            mask = self._rand((lx.shape[0],) + (1,) * (lx.dim() - 2) + (self.rank,), lx.device) >= self.rank_dropout
            lx = lx * mask / (1 - self.rank_dropout)
        return lx

    def delta(self, x: torch.Tensor, base_out: Optional[torch.Tensor] = None,
              multiplier: float = 1.0) -> Optional[torch.Tensor]:
        """The LoRA update for input x times ``multiplier``; with ``base_out``, ``base_out`` plus the
        update. When module_dropout skips this module this step: None, or ``base_out`` as it is.

        For a Linear the scale and the sum with ``base_out`` happen inside the up matmul
        (``addmm``'s alpha and beta), so the update never exists as a separate full-size tensor;
        otherwise the scale multiplies the rank-sized activation (16 values per token).
        """
        if self.training and self.module_dropout and self._rand((1,), "cpu").item() < self.module_dropout:
            return base_out
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.downs[0].dtype)  # autocast casts both operands itself; a manual cast would copy x
        scale = self.scale * multiplier
        parts = [(self._project(x, d), u) for d, u in zip(self.downs, self.ups)]
        if self.splits == 1 and not self.conv and base_out is not None and self._fusable(parts[0][0], base_out):
            lx, up = parts[0]
            flat = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), lx.reshape(-1, lx.shape[-1]), up.t(),
                               alpha=scale)
            return flat.view(base_out.shape)
        outs = [self._up(lx * scale, u) for lx, u in parts]
        out = outs[0] if self.splits == 1 else torch.cat(outs, dim=1 if self.conv else -1)
        return out if base_out is None else base_out + out.to(base_out.dtype)

    @staticmethod
    def _fusable(lx: torch.Tensor, base_out: torch.Tensor) -> bool:
        """addmm needs one dtype for all operands: autocast provides it, or the dtypes already agree."""
        return torch.is_autocast_enabled(lx.device.type) or lx.dtype == base_out.dtype

    def kohya_tensors(self, name: str, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
        """This module in sd-scripts' file layout. A split module is saved fused (down stacked,
        up block-diagonal) with alpha × splits, so the host loads it at full strength
        (alpha / (rank × splits) × splits = alpha / rank)."""
        downs = [d.detach() for d in self.downs]
        ups = [u.detach() for u in self.ups]
        if self.splits == 1:
            down, up = downs[0], ups[0]
        else:
            down = torch.cat(downs, dim=0)
            up = torch.block_diag(*[u.flatten(1) for u in ups])
        dtype = dtype or down.dtype
        return {f"{name}.lora_down.weight": down.to(dtype).contiguous().cpu(),
                f"{name}.lora_up.weight": up.to(dtype).contiguous().cpu(),
                f"{name}.alpha": torch.tensor(self.alpha * self.splits, dtype=dtype)}

    def load_kohya(self, tensors: Dict[str, torch.Tensor], name: str) -> None:
        """Copy weights saved by :meth:`kohya_tensors` (or sd-scripts) into this module."""
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        alpha = float(tensors.get(f"{name}.alpha", torch.tensor(float(down.shape[0]))))
        with torch.no_grad():
            if self.splits == 1:
                self.downs[0].copy_(down.view_as(self.downs[0]))
                self.ups[0].copy_(up.view_as(self.ups[0]))
            else:
                r, part = self.rank, self.ups[0].shape[0]
                for i in range(self.splits):
                    self.downs[i].copy_(down[i * r:(i + 1) * r])
                    self.ups[i].copy_(up[i * part:(i + 1) * part, i * r:(i + 1) * r].view_as(self.ups[i]))
        self.alpha = alpha / self.splits


class LoRAWrapper(nn.Module):
    """Stands in for a frozen layer: ``base(x) + lora.delta(x) · multiplier``, in base's dtype."""

    def __init__(self, base_layer: nn.Module, lora: LoRAModule, multiplier: float = 1.0):
        super().__init__()
        self.base_layer = base_layer
        self.lora = lora
        self.multiplier = multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] (or [B, C, H, W] for a conv) -> the base layer's output plus the update.

        A plain fp32 Linear on an x86 CPU runs as one node with its frozen matmuls in the faster
        library for the CPU (``trainer/cpu_linear.py``, the same function, faster there).
        """
        if cpu_linear.applies(self.base_layer, self.lora, x):
            return cpu_linear.linear_with_lora(self.base_layer, self.lora, x, self.multiplier)
        return self.lora.delta(x, self.base_layer(x), self.multiplier)


def _get_parent(root: nn.Module, path: str) -> Tuple[nn.Module, str]:
    """Return (parent module, attribute name) for a dotted module path."""
    parent_path, _, attr = path.rpartition(".")
    return (root.get_submodule(parent_path) if parent_path else root), attr


class LoRANetwork(nn.Module):
    """All LoRA modules for one MMDiT, independent of any particular model object.

    ``attach(mmdit)`` swaps each target layer for a :class:`LoRAWrapper` around it; ``detach()``
    puts the originals back, so the host's shared model is left as it was after training.
    """

    def __init__(self, mmdit: nn.Module, targets: List[TargetSpec], alpha: float, dtype=torch.float32,
                 dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                 prefix: str = UNET_PREFIX):
        super().__init__()
        if not targets:
            raise ValueError("no layer selected for the LoRA: check network_dim, the *_dim settings, "
                             "train_block_indices and emb_dims (is the model an SD3/SD3.5 MMDiT?)")
        self.prefix = prefix
        self.paths = [t.path for t in targets]
        self.loras = nn.ModuleDict()
        for t in targets:
            self.loras[kohya_name(t.path, prefix)] = LoRAModule(
                mmdit.get_submodule(t.path), t.rank, alpha, t.splits, dtype, dropout, rank_dropout, module_dropout)
        self._attached: List[Tuple[nn.Module, str, nn.Module]] = []
        # Set by the training loop for a run under autocast: while attached, the model's frozen
        # layers hold their weights in this dtype (trainer/precision.py).
        self.frozen_dtype: Optional[torch.dtype] = None
        self._cast: Saved = []

    @classmethod
    def for_model(cls, mmdit: nn.Module, rank: int, alpha: float, lora_dtype: torch.dtype = torch.float32,
                  **kwargs) -> "LoRANetwork":
        """A network over sd-scripts' default targets (every joint-block Linear) at one rank."""
        if rank < 1:
            raise ValueError(f"network_dim must be at least 1, got {rank}. Set network_dim to the LoRA rank, e.g. 16.")
        return cls(mmdit, select_targets(mmdit, rank), alpha, lora_dtype, **kwargs)

    def set_generator(self, generator: Optional[torch.Generator]) -> None:
        """The generator the dropouts draw from (the training state's)."""
        for m in self.loras.values():
            m.generator = generator

    def attach(self, mmdit: nn.Module) -> None:
        """Wrap each target layer of ``mmdit`` with a LoRAWrapper sharing this network's parameters
        (and cast the frozen layers' weights to ``frozen_dtype`` when it is set)."""
        if self._attached:
            raise RuntimeError("LoRA network is already attached to a model; detach() it first")
        try:
            for path in self.paths:
                parent, attr = _get_parent(mmdit, path)
                base = getattr(parent, attr)
                setattr(parent, attr, LoRAWrapper(base, self.loras[kohya_name(path, self.prefix)]))
                self._attached.append((parent, attr, base))
            self._cast = cast_frozen_layers(mmdit, self.frozen_dtype)
        except Exception:
            self.detach()
            raise

    def detach(self) -> None:
        """Restore the original layers (and weights) that :meth:`attach` wrapped (and cast)."""
        self.uncast()
        while self._attached:
            parent, attr, base = self._attached.pop()
            setattr(parent, attr, base)

    @property
    def stored_weights(self) -> List[torch.Tensor]:
        """The frozen weights as the model stored them, while :meth:`attach` has cast copies in their place."""
        return [p for _, _, p in self._cast]

    def uncast(self) -> None:
        """Put the stored weights back while staying attached (autocast then casts them per call)."""
        restore_layers(self._cast)

    def set_fused_cpu_linear(self, on: bool) -> None:
        """Allow (default) or forbid the fused fp32 CPU Linear of ``trainer/cpu_linear.py``."""
        for m in self.loras.values():
            m.fused_cpu = on

    def get_adapter_params(self) -> Dict[str, nn.Parameter]:
        """Trainable parameters by name (``<module>.downs.0`` ...)."""
        return dict(self.named_parameters())

    def kohya_state_dict(self, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
        """Tensors in sd-scripts' file layout: lora_down, lora_up and a scalar alpha per module."""
        sd: Dict[str, torch.Tensor] = {}
        for name, module in self.loras.items():
            sd.update(module.kohya_tensors(name, dtype))
        return sd

    def load_kohya_state_dict(self, tensors: Dict[str, torch.Tensor]) -> List[str]:
        """Load weights from a kohya-layout dict; returns the module names it had no weights for.

        Raises:
            ValueError: before loading anything, naming the first module whose weights have
                another rank or layer size than this network's (shapes [rank, in] and [out, rank]).
        """
        present = [name for name in self.loras if f"{name}.lora_down.weight" in tensors]
        for name in present:
            expected = self.loras[name].kohya_tensors(name)
            for part in ("lora_down", "lora_up"):
                key = f"{name}.{part}.weight"
                got, want = tuple(tensors[key].shape), tuple(expected[key].shape)
                if got != want:
                    raise ValueError(_shape_message(name, part, got, want))
        for name in present:
            self.loras[name].load_kohya(tensors, name)
        return [name for name in self.loras if name not in present]


def _shape_message(name: str, part: str, got: tuple, want: tuple) -> str:
    """Why a file's weights do not fit a module: another rank (fix the settings) or another layer
    size (another model)."""
    rank_axis = 0 if part == "lora_down" else 1
    if len(got) == len(want) and all(g == w for i, (g, w) in enumerate(zip(got, want)) if i != rank_axis):
        return (f"{name} has rank {got[rank_axis]} in the file, but these settings give it rank {want[rank_axis]}: "
                f"set network_dim (and the per-layer dims) to the file's rank (its ss_network_dim), or clear "
                f"network_weights")
    return (f"{name}.{part} is {list(got)} in the file, but this model's layer needs {list(want)}: the file was "
            f"trained on another model (see its ss_base_model_version); choose a LoRA for this model or clear "
            f"network_weights")
