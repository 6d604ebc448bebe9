"""Everything that lives across queue runs of one training session."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from .config import TrainConfig
from .lora import LoRANetwork
from .lora_targets import select_targets, select_text_targets, type_dims_from
from .optim import build_optimizer, param_groups
from .schedules import build_scheduler

log = logging.getLogger(__name__)
TEXT_ENCODERS = ("clip_l", "clip_g", "t5xxl")


@dataclass
class TrainState:
    """LoRA weights, optimiser, schedule, RNG and progress: what a continued run picks up."""

    config: TrainConfig
    network: LoRANetwork
    optimizer: torch.optim.Optimizer
    scheduler: object
    generator: torch.Generator
    scaler: Optional[torch.amp.GradScaler] = None  # fp16 only: scales the loss so small grads survive
    text_networks: Dict[str, LoRANetwork] = field(default_factory=dict)  # "clip_l"/"clip_g"/"t5xxl" LoRAs
    step: int = 0                                  # optimiser steps done
    losses: List[float] = field(default_factory=list)
    order: List[List[int]] = field(default_factory=list)  # the current epoch's batches (sample indices)
    cursor: int = 0                                       # next batch in ``order``
    epoch: int = 0


def new_train_state(config: TrainConfig, network: LoRANetwork,
                    text_networks: Optional[Dict[str, LoRANetwork]] = None) -> TrainState:
    """A fresh state: the configured optimiser and schedule over the LoRA parameters (text-encoder
    LoRAs at their own learning rates), a generator seeded with ``config.seed`` (data order,
    noise, timesteps and dropouts draw from it)."""
    text_networks = text_networks or {}
    groups = param_groups(network.named_parameters(), config.learning_rate, config.loraplus_lr_ratio)
    lrs = dict(zip(TEXT_ENCODERS, config.text_encoder_lrs()))
    for name, net in text_networks.items():
        groups += param_groups(net.named_parameters(), lrs[name], config.loraplus_lr_ratio)
    optimizer = build_optimizer(config.optimizer_type, groups, config.learning_rate, config.optimizer_args)
    scheduler = build_scheduler(config.lr_scheduler, optimizer, config.lr_warmup_steps, config.max_train_steps,
                                config.lr_scheduler_num_cycles, config.lr_scheduler_power)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(config.seed)
    for net in [network, *text_networks.values()]:
        net.set_generator(generator)
    scaler = torch.amp.GradScaler("cpu" if _device(network) == "cpu" else "cuda") \
        if config.mixed_precision == "fp16" else None
    return TrainState(config=config, network=network, optimizer=optimizer, scheduler=scheduler,
                      generator=generator, scaler=scaler, text_networks=text_networks)


def kohya_tensors(state: TrainState, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """Every LoRA of the state (MMDiT and text encoders) in one kohya-layout dict."""
    tensors = state.network.kohya_state_dict(dtype)
    for net in state.text_networks.values():
        tensors.update(net.kohya_state_dict(dtype))
    return tensors


def build_text_networks(encoders: Dict[str, torch.nn.Module], config: TrainConfig) -> Dict[str, LoRANetwork]:
    """LoRAs for the text encoders present in ``encoders`` ("clip_l", "clip_g", "t5xxl" -> module),
    named lora_te1_/lora_te2_/lora_te3_ as sd-scripts names them; T5 only with train_t5xxl."""
    if config.network_train_unet_only:
        return {}
    nets = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 1)
        for index, name in enumerate(TEXT_ENCODERS):
            module = encoders.get(name)
            if module is None or (name == "t5xxl" and not config.train_t5xxl):
                continue
            nets[name] = LoRANetwork(module, select_text_targets(module, config.network_dim), config.network_alpha,
                                     prefix=f"lora_te{index + 1}_")
    return nets


def _device(network: LoRANetwork) -> str:
    return next(network.parameters()).device.type


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
    """The lora_sd3 network the config describes, seeded; starts from ``network_weights`` if set."""
    targets = select_targets(mmdit, config.network_dim, type_dims_from(config), config.train_block_indices,
                             config.emb_dims, config.split_qkv)
    dtype = torch.bfloat16 if config.full_bf16 else torch.float32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed if seed is None else seed)
        network = LoRANetwork(mmdit, targets, config.network_alpha, dtype, config.network_dropout,
                              config.rank_dropout, config.module_dropout)
    if config.network_weights:
        from .lora_io import read_lora_tensors

        tensors = read_lora_tensors(config.network_weights)
        try:
            missing = network.load_kohya_state_dict(tensors)
        except ValueError as e:
            raise ValueError(f"network_weights {config.network_weights}: {e}") from None
        if missing:
            log.warning("network_weights %s has no weights for %d of %d modules (they start fresh): %s",
                        config.network_weights, len(missing), len(network.loras), ", ".join(missing[:5]))
    return network
