"""Everything that lives across queue runs of one training session."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch

from .config import TrainConfig
from .lora import LoRANetwork


@dataclass
class EncodedData:
    """Inputs computed once per session: VAE latents (already scaled/shifted into the model's
    space) and text-encoder outputs. latents [N, 16, h, w]; context [N, L, 4096]; pooled [N, 2048]."""

    latents: torch.Tensor
    context: torch.Tensor
    pooled: torch.Tensor

    def __post_init__(self):
        n = self.latents.shape[0]
        if self.context.shape[0] != n or self.pooled.shape[0] != n:
            raise ValueError(f"latents ({n}), context ({self.context.shape[0]}) and pooled "
                             f"({self.pooled.shape[0]}) must hold one entry per image")

    def __len__(self) -> int:
        return self.latents.shape[0]


@dataclass
class TrainState:
    """LoRA weights, optimiser, RNG and progress: what a continued run picks up."""

    config: TrainConfig
    network: LoRANetwork
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    step: int = 0
    losses: List[float] = field(default_factory=list)
    order: List[int] = field(default_factory=list)   # sample order of the current epoch
    cursor: int = 0                                  # position in ``order``
    epoch: int = 0


def new_train_state(config: TrainConfig, network: LoRANetwork) -> TrainState:
    """A fresh state: AdamW over the LoRA parameters and a generator seeded with ``config.seed``."""
    params = [p for p in network.get_adapter_params().values()]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.adam_weight_decay)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(config.seed)
    return TrainState(config=config, network=network, optimizer=optimizer, generator=generator)


def next_batch(state: TrainState, num_samples: int, batch_size: int) -> torch.Tensor:
    """Indices of the next batch: a fresh seeded permutation each epoch, drawn without replacement."""
    picked: List[int] = []
    while len(picked) < batch_size:
        if state.cursor >= len(state.order):
            state.order = torch.randperm(num_samples, generator=state.generator).tolist()
            state.cursor = 0
            state.epoch += 1
        take = min(batch_size - len(picked), len(state.order) - state.cursor)
        picked.extend(state.order[state.cursor:state.cursor + take])
        state.cursor += take
    return torch.tensor(picked, dtype=torch.long)


def build_network(mmdit: torch.nn.Module, config: TrainConfig, seed: Optional[int] = None) -> LoRANetwork:
    """The default sd-scripts lora_sd3 network for ``mmdit``, with a seeded init."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed if seed is None else seed)
        return LoRANetwork.for_model(mmdit, config.network_dim, config.network_alpha)
