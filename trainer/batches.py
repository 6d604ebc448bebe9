"""Encoded training data and how batches are drawn from it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch


@dataclass
class Batch:
    """One step's inputs. latents [B, 16, h, w] (in the model's latent space); context [B, L, D]
    and pooled [B, P] text-encoder outputs, or None with ``captions`` when the text is encoded per
    step; loss_weight [B] per-sample loss factors; mask [B, 1, h, w] or None (masked loss)."""

    latents: torch.Tensor
    context: Optional[torch.Tensor]
    pooled: Optional[torch.Tensor]
    loss_weight: torch.Tensor
    mask: Optional[torch.Tensor] = None
    captions: Optional[List[str]] = None


@dataclass
class EncodedData:
    """Inputs computed once per session, all images at one size: VAE latents [N, 16, h, w] and
    text-encoder outputs context [N, L, D], pooled [N, P]."""

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

    def epoch_batches(self, generator: torch.Generator, batch_size: int) -> List[List[int]]:
        """One epoch's batches: a seeded permutation cut into ``batch_size`` chunks (the last may be short)."""
        order = torch.randperm(len(self), generator=generator).tolist()
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

    def collate(self, indices: List[int]) -> Batch:
        """The batch of the given sample indices."""
        idx = torch.tensor(indices, dtype=torch.long)
        latents = self.latents[idx]
        return Batch(latents=latents, context=self.context[idx], pooled=self.pooled[idx],
                     loss_weight=torch.ones(len(indices), device=latents.device))
