"""What a training run switches on around its steps (``attached``), and undoes afterwards:
the LoRA, gradient checkpointing, position-embedding options, blocks_to_swap, torch_compile."""
from __future__ import annotations

import contextlib
from typing import List

import torch

from .grad_checkpoint import checkpointed
from .offload import BlockSwapper, Mover
from .pos_embed import PositionEmbedder
from .precision import AUTOCAST_DTYPES
from .state import TrainState


@contextlib.contextmanager
def _host_checkpointing_off(mmdit: torch.nn.Module):
    """The host MMDiT's own per-block checkpointing off for the run: the trainer checkpoints the
    blocks itself (:mod:`trainer.grad_checkpoint`, which says why)."""
    previous = getattr(mmdit, "use_checkpoint", None)
    if previous is not None:
        mmdit.use_checkpoint = False
    try:
        yield
    finally:
        if previous is not None:
            mmdit.use_checkpoint = previous


@contextlib.contextmanager
def _block_swap(mmdit: torch.nn.Module, blocks_to_swap: int):
    """sd-scripts' blocks_to_swap for the run: N joint blocks wait in CPU memory and come to the
    model's device just before they run (trainer/offload.py). Afterwards every block is back on
    the device, so the caller's model is whole again."""
    if blocks_to_swap <= 0:
        yield
        return
    device = next(mmdit.joint_blocks.parameters()).device
    swapper = BlockSwapper(mmdit.joint_blocks, blocks_to_swap, Mover(device)).install()
    try:
        yield
    finally:
        swapper.remove()
        for i, block in enumerate(swapper.blocks):
            if i not in swapper.on_device:
                swapper.mover.to_device(i, block)
                swapper.mover.wait(i, block)


@contextlib.contextmanager
def _block_forwards(mmdit: torch.nn.Module, state: TrainState):
    """Each joint block's forward for the run: compiled (sd-scripts' torch_compile), recomputed in
    backward (gradient_checkpointing), both, or as it is. The blocks' own forwards are back afterwards.

    Compiled, blocks of one shape share the graph (their weights are graph inputs), so a model
    compiles once or twice, on its first step; a new bucket shape compiles again.
    """
    cfg = state.config
    if not (cfg.torch_compile or cfg.gradient_checkpointing):
        yield
        return
    blocks = list(mmdit.joint_blocks)
    for block in blocks:
        forward = torch.compile(block.forward, backend=cfg.dynamo_backend) if cfg.torch_compile else block.forward
        if cfg.gradient_checkpointing:
            forward = checkpointed(forward, state.generator, reentrant=not cfg.torch_compile)
        block.forward = forward
    try:
        yield
    finally:
        for block in blocks:
            del block.forward  # the instance attribute; the class's forward shows through again


def _latent_sizes(data) -> List[int]:
    """Square-root latent sizes of the training images (one per bucket), for scaled position tables."""
    if hasattr(data, "latent_sizes"):
        return list(data.latent_sizes)
    h, w = data.latents.shape[-2:]
    return [round((h * w) ** 0.5)]


def _cast_dtype(mmdit: torch.nn.Module, state: TrainState):
    """The dtype frozen fp32 weights are cast to for the run, or None to leave them to autocast.

    Not with blocks_to_swap (it moves the weights as stored), nor with gradient checkpointing on a
    GPU: there autocast's per-call copies are transient, and a run-long copy could cost the VRAM
    the user turned checkpointing on to save.
    """
    cfg = state.config
    on_gpu = next(mmdit.parameters()).device.type != "cpu"
    if cfg.blocks_to_swap or (cfg.gradient_checkpointing and on_gpu):
        return None
    return AUTOCAST_DTYPES.get(cfg.mixed_precision)


@contextlib.contextmanager
def attached(mmdit: torch.nn.Module, state: TrainState, data):
    """Everything a run switches on around its steps, undone on exit whatever happens.

    The LoRA is attached in training mode; gradient checkpointing, the position-embedding
    options, blocks_to_swap and torch_compile are set up. Under autocast the network also gives
    the frozen layers their weights in the autocast dtype while attached (cast once, not in
    every layer call; see :func:`_cast_dtype` for when not).
    Afterwards the caller's model is exactly as it was.
    """
    cfg = state.config
    positions = PositionEmbedder(mmdit, cfg.pos_emb_random_crop_rate,
                                 _latent_sizes(data) if cfg.enable_scaled_pos_embed else None, state.generator)
    state.network.frozen_dtype = _cast_dtype(mmdit, state)
    state.network.attach(mmdit)
    state.network.train()
    try:
        with _host_checkpointing_off(mmdit), positions.active(), _block_swap(mmdit, cfg.blocks_to_swap), \
                _block_forwards(mmdit, state):
            yield
    finally:
        state.network.detach()
        state.network.frozen_dtype = None
