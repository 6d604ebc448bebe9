"""Validation loss on held-out images: fixed σ values and fixed noise, so successive values compare."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

from . import flow
from .batches import BucketedData
from .precision import autocast

# The timesteps sd-scripts' train_network.py validates at, as σ = t / 1000.
VALIDATION_SIGMAS = (0.01, 0.35, 0.5, 0.65, 0.99)
TextEncoder = Callable[[List[str]], Tuple[torch.Tensor, torch.Tensor]]


def validation_loss(mmdit: torch.nn.Module, data: BucketedData, compute_dtype: torch.dtype = torch.float32,
                    encode_text: Optional[TextEncoder] = None, sigmas: Sequence[float] = VALIDATION_SIGMAS,
                    seed: int = 0, batch_size: int = 1, mixed_precision: str = "no") -> float:
    """Mean rectified-flow loss (uniform weighting, masks applied) of every image in ``data`` at each σ.

    The noise comes from a generator seeded with ``seed`` on every call, and captions and crops
    are the fixed ones (no shuffle, dropout, flip or random crop): the same LoRA gives the same
    value. ``mmdit`` must carry the LoRA being validated; nothing is trained (no grad). The model
    runs under the training's autocast (``mixed_precision``), as sd-scripts validates.
    """
    g = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    # Eager even under torch_compile: a no-grad graph would be compiled for a handful of calls.
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        for indices in data.fixed_batches(batch_size):
            batch = data.collate(indices, fixed=True)
            if batch.context is None:
                batch.context, batch.pooled = encode_text(batch.captions)
            x0 = batch.latents.float()
            for s in sigmas:
                noise = torch.randn(x0.shape, generator=g).to(x0.device)
                sig = torch.full((x0.shape[0],), float(s), device=x0.device)
                x_sigma = flow.add_noise(x0, noise, sig)
                with autocast(mixed_precision, x0.device):
                    velocity = mmdit(x_sigma.to(compute_dtype), (sig * 1000).to(compute_dtype),
                                     context=batch.context.to(x0.device, compute_dtype),
                                     y=batch.pooled.to(x0.device, compute_dtype))
                loss = flow.flow_loss(velocity, x_sigma, x0, sig, "uniform", mask=batch.mask)
                total += loss.item() * x0.shape[0]
                count += x0.shape[0]
    return total / max(count, 1)
