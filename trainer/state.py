"""Everything that lives across queue runs of one training session."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch

from .config import TrainConfig
from .lora import LoRANetwork


@dataclass
class TrainState:
    """LoRA weights, optimiser, RNG and progress: what a continued run picks up."""

    config: TrainConfig
    network: LoRANetwork
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    step: int = 0
    losses: List[float] = field(default_factory=list)
    order: List[List[int]] = field(default_factory=list)  # the current epoch's batches (sample indices)
    cursor: int = 0                                       # next batch in ``order``
    epoch: int = 0


def new_train_state(config: TrainConfig, network: LoRANetwork) -> TrainState:
    """A fresh state: AdamW over the LoRA parameters and a generator seeded with ``config.seed``."""
    params = [p for p in network.get_adapter_params().values()]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.adam_weight_decay)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(config.seed)
    return TrainState(config=config, network=network, optimizer=optimizer, generator=generator)


def next_batch(state: TrainState, data, batch_size: int):
    """The next batch from ``data`` (an EncodedData or any source with ``epoch_batches`` and
    ``collate``); a new epoch draws a new seeded order when the current one is used up."""
    if state.cursor >= len(state.order):
        state.order = data.epoch_batches(state.generator, batch_size)
        state.cursor = 0
        state.epoch += 1
    indices = state.order[state.cursor]
    state.cursor += 1
    return data.collate(indices)


def build_network(mmdit: torch.nn.Module, config: TrainConfig, seed: Optional[int] = None) -> LoRANetwork:
    """The default sd-scripts lora_sd3 network for ``mmdit``, with a seeded init."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed if seed is None else seed)
        return LoRANetwork.for_model(mmdit, config.network_dim, config.network_alpha)
