"""Encoded training data and how batches are drawn from it."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .captions import fixed_caption, process_caption
from .data import ImageCaption


@dataclass(frozen=True)
class Share:
    """Which rows of a batch this process trains on. A multi-GPU run draws each batch for all
    processes and splits it (trainer/distributed.py); one process trains the whole batch.

    offset, rows: this process's rows of the batch of ``total``. weight: its part of the batch
    mean, rows / total (0 for a process that only pads a batch too short to split).
    """

    offset: int
    rows: int
    total: int
    weight: float = 1.0

    @classmethod
    def whole(cls, size: int) -> "Share":
        return cls(0, size, size, 1.0)

    def take(self, drawn: torch.Tensor) -> torch.Tensor:
        """This process's rows of ``drawn``, a tensor drawn for the whole batch ([total, ...])."""
        return drawn[self.offset:self.offset + self.rows]


@dataclass
class Batch:
    """One step's inputs. latents [B, 16, h, w] (in the model's latent space); context [B, L, D]
    and pooled [B, P] text-encoder outputs, or None with ``captions`` when the text is encoded per
    step; loss_weight [B] per-sample loss factors; mask [B, 1, h, w] or None (masked loss);
    share: which rows of the (multi-GPU) batch these are (all of it by default)."""

    latents: torch.Tensor
    context: Optional[torch.Tensor]
    pooled: Optional[torch.Tensor]
    loss_weight: torch.Tensor
    mask: Optional[torch.Tensor] = None
    captions: Optional[List[str]] = None
    share: Optional[Share] = None

    def __post_init__(self):
        if self.share is None:
            self.share = Share.whole(self.latents.shape[0])


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


def pad_and_stack(contexts: List[torch.Tensor]) -> torch.Tensor:
    """Stack [L_i, D] text contexts into [B, L, D], zero-padding the shorter ones (long captions
    give more T5 tokens)."""
    longest = max(c.shape[0] for c in contexts)
    return torch.stack([torch.nn.functional.pad(c, (0, 0, 0, longest - c.shape[0])) for c in contexts])


@dataclass
class Record:
    """One image as a batch source holds it. ``views[flip]`` holds the cached "latents" [16, h, w]
    (and "mask" [1, h, w]) of the unflipped / flipped image, or is empty when the image is encoded
    every step; ``context`` [L, D] and ``pooled`` [P] are None when its caption is encoded every step."""

    sample: ImageCaption
    bucket: Tuple[int, int, int]  # (dataset index, width, height): batches never mix buckets
    repeats: int                  # times per epoch
    loss_weight: float            # prior_loss_weight for regularisation images, else 1
    views: Dict[bool, Dict[str, torch.Tensor]] = field(default_factory=dict)
    context: Optional[torch.Tensor] = None
    pooled: Optional[torch.Tensor] = None


ViewEncoder = Callable[[ImageCaption, Optional[random.Random], bool], Dict[str, torch.Tensor]]


class BucketedData:
    """A batch source over images of several sizes, as sd-scripts draws them: each epoch every
    image appears ``repeats`` times, each batch holds images of one bucket, and the batches come in
    a seeded random order. Captions that change per step (shuffle, dropout, wildcards) and images
    that change per step (random crop, colour augmentation) are processed in ``collate``.

    Args:
        records: the images.
        batch_sizes: {dataset index: batch size or None (the loop's train_batch_size)}.
        device: where batches go.
        encode_view: ``(sample, rng, flip) -> {"latents", "mask"?}`` for images without cached views.
    """

    def __init__(self, records: List[Record], batch_sizes: Dict[int, Optional[int]], device="cpu",
                 encode_view: Optional[ViewEncoder] = None):
        self.records, self.batch_sizes, self.device, self.encode_view = records, batch_sizes, device, encode_view
        self.epoch = 0                   # 1-based once training starts, as sd-scripts' current_epoch
        self.rng = random.Random(0)      # per-step caption and augmentation choices, reseeded each epoch
        self.validation: Optional["BucketedData"] = None  # held-out images, when there are any

    def __len__(self) -> int:
        return sum(r.repeats for r in self.records)

    def _bucket_lists(self) -> Dict[tuple, List[int]]:
        lists: Dict[tuple, List[int]] = {}
        for i, r in enumerate(self.records):
            lists.setdefault(r.bucket, []).extend([i] * r.repeats)
        return lists

    def num_batches(self, batch_size: int) -> int:
        """Batches per epoch (without drawing anything)."""
        return sum(-(-len(v) // (self.batch_sizes.get(k[0]) or batch_size)) for k, v in self._bucket_lists().items())

    def epoch_batches(self, generator: torch.Generator, batch_size: int) -> List[List[int]]:
        """One epoch: each bucket's list shuffled and cut into batches, then all batches shuffled."""
        self.epoch += 1
        self.rng = random.Random(int(torch.randint(0, 2 ** 62, (1,), generator=generator)))
        batches = []
        for key, idx in sorted(self._bucket_lists().items()):
            perm = torch.randperm(len(idx), generator=generator).tolist()
            idx = [idx[j] for j in perm]
            size = self.batch_sizes.get(key[0]) or batch_size
            batches += [idx[k:k + size] for k in range(0, len(idx), size)]
        return [batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()]

    def fixed_batches(self, batch_size: int) -> List[List[int]]:
        """Every image once, in order, batched within buckets: for validation."""
        lists: Dict[tuple, List[int]] = {}
        for i, r in enumerate(self.records):
            lists.setdefault(r.bucket, []).append(i)
        return [v[k:k + batch_size] for _, v in sorted(lists.items()) for k in range(0, len(v), batch_size)]

    def _view(self, r: Record, fixed: bool) -> Dict[str, torch.Tensor]:
        flip = r.sample.subset.flip_aug and not fixed and self.rng.random() < 0.5
        if r.views:
            return r.views[flip]
        return self.encode_view(r.sample, None if fixed else self.rng, flip)

    def collate(self, indices: List[int], fixed: bool = False) -> Batch:
        """The batch of the given records; ``fixed`` turns off random flips, crops and caption changes."""
        recs = [self.records[i] for i in indices]
        views = [self._view(r, fixed) for r in recs]
        latents = torch.stack([v["latents"] for v in views]).to(self.device)
        mask = None
        if any("mask" in v for v in views):
            mask = torch.stack([v.get("mask", torch.ones_like(v["latents"][:1])) for v in views]).to(self.device)
        weight = torch.tensor([r.loss_weight for r in recs], device=self.device)
        if all(r.context is not None for r in recs):
            return Batch(latents, pad_and_stack([r.context for r in recs]).to(self.device),
                         torch.stack([r.pooled for r in recs]).to(self.device), weight, mask)
        opts = [r.sample.subset.captions for r in recs]
        captions = [fixed_caption(r.sample.caption, o) if fixed else
                    process_caption(r.sample.caption, o, self.rng, max(self.epoch, 1)) for r, o in zip(recs, opts)]
        return Batch(latents, None, None, weight, mask, captions)
