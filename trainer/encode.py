"""The caching pass: turn a TrainingData into batch sources, encoding each image and caption at
most once per content (see latent_cache). The host supplies the encoders as plain callables."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .batches import BucketedData, Record
from .captions import fixed_caption
from .data import DatasetError, ImageCaption, load_pixels
from .latent_cache import CACHE_FOLDER_NAME, EncoderCache, cache_key
from .training_data import TrainingData

log = logging.getLogger(__name__)


@dataclass
class Encoders:
    """The frozen encoders, as callables, and identities that key their cached outputs.

    encode_image: [1, H, W, 3] in 0..1 -> latents [1, 16, H/8, W/8] in the model's latent space.
    encode_text: caption -> (context [1, L, D], pooled [1, P]).
    image_id / text_id: change whenever the encoder or its settings change (weights, dtype,
    latent scaling, token lengths...), so their cache entries are rebuilt.
    """

    encode_image: Callable[[torch.Tensor], torch.Tensor]
    encode_text: Callable[[str], Tuple[torch.Tensor, torch.Tensor]]
    image_id: str
    text_id: str


@dataclass
class EncodeStats:
    """What the caching pass did: encoder calls made, entries found, images skipped."""

    image_calls: int = 0
    text_calls: int = 0
    hits: int = 0
    skipped: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"cache: {self.hits} entries reused, {self.image_calls} images and {self.text_calls} captions "
                f"encoded{f', {len(self.skipped)} images skipped' if self.skipped else ''}")


def latent_key(sample: ImageCaption, image_id: str, flip: bool) -> str:
    """Key of an image's latents: its content, size, crop, flip, alpha handling and the VAE."""
    return cache_key("latents", content=sample.content, bucket=sample.bucket, resized=sample.resized, flip=flip,
                     alpha_mask=sample.subset.alpha_mask, vae=image_id)


def text_key(caption: str, text_id: str) -> str:
    """Key of a caption's text-encoder outputs: the caption text and the encoders."""
    return cache_key("text", caption=caption, encoders=text_id)


def _mask_to_latent(mask: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """[h, w] pixel mask -> [1, h/8, w/8] by area averaging (as sd-scripts resizes masks)."""
    return torch.nn.functional.interpolate(mask[None, None].float(), size=size, mode="area")[0]


def encode_view(sample: ImageCaption, enc: Encoders, rng: Optional[random.Random], flip: bool,
                stats: Optional[EncodeStats] = None) -> Dict[str, torch.Tensor]:
    """Decode, augment and VAE-encode one image: {"latents" [16, h, w], "mask" [1, h, w] if any}."""
    image, mask = load_pixels(sample, rng, flip)
    latents = enc.encode_image(image[None])[0].float()
    if stats is not None:
        stats.image_calls += 1
    out = {"latents": latents}
    if mask is not None:
        out["mask"] = _mask_to_latent(mask, tuple(latents.shape[-2:]))
    return out


class _Pass:
    """State of one caching pass: caches, stats, and the progress callback."""

    def __init__(self, data: TrainingData, enc: Encoders, progress: Optional[Callable[[], None]]):
        self.data, self.enc, self.progress = data, enc, progress
        self.latents = EncoderCache(data.cache.latents)
        self.text = EncoderCache(data.cache.text)
        self.stats = EncodeStats()

    def folder(self, sample: ImageCaption) -> Optional[Path]:
        if self.data.cache.folder:
            return Path(self.data.cache.folder)
        if sample.pixels is None:
            return Path(sample.path).parent / CACHE_FOLDER_NAME
        return None  # images from the graph have no folder: memory only unless a cache folder is set

    def views(self, s: ImageCaption) -> Dict[bool, Dict[str, torch.Tensor]]:
        if self.data.cache.latents == "none":
            return {}
        out = {}
        for flip in ((False, True) if s.subset.flip_aug else (False,)):
            key, folder = latent_key(s, self.enc.image_id, flip), self.folder(s)
            entry = self.latents.get(key, folder)
            if entry is None:
                entry = self.latents.put(key, encode_view(s, self.enc, None, flip, self.stats), folder)
            out[flip] = entry
        return out

    def text_outputs(self, s: ImageCaption) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        if self.data.cache.text == "none":
            return None, None
        caption = fixed_caption(s.caption, s.subset.captions)
        key, folder = text_key(caption, self.enc.text_id), self.folder(s)
        entry = self.text.get(key, folder)
        if entry is None:
            context, pooled = self.enc.encode_text(caption)
            self.stats.text_calls += 1
            entry = self.text.put(key, {"context": context[0].float(), "pooled": pooled[0].float()}, folder)
        return entry["context"], entry["pooled"]

    def record(self, s: ImageCaption, bucket: tuple, repeats: int, weight: float) -> Optional[Record]:
        """The sample's record, or None (named in stats.skipped) when its file cannot be decoded."""
        try:
            views = self.views(s)
        except DatasetError as e:
            self.stats.skipped.append(str(e))
            log.warning("%s", e)
            return None
        context, pooled = self.text_outputs(s)
        if self.progress is not None:
            self.progress()  # may raise to cancel: what is cached so far stays cached
        return Record(s, bucket, repeats, weight, views, context, pooled)


def encode_training_data(data: TrainingData, enc: Encoders, device="cpu",
                         progress: Optional[Callable[[], None]] = None) -> Tuple[BucketedData, EncodeStats]:
    """Batch sources for ``data``: the training one, with ``.validation`` set when images are held
    out. ``progress()`` is called after each image (it may raise to cancel)."""
    p = _Pass(data, enc, progress)
    train, val = [], []
    for k, g in enumerate(data.groups):
        for s, reps in zip(g.samples, data.repeats(g)):
            weight = data.prior_loss_weight if s.subset.is_reg else 1.0
            if reps > 0:
                train.append(p.record(s, (k, *s.bucket), reps, weight))
        val += [p.record(s, (k, *s.bucket), 1, 1.0) for s in g.validation]
    train, val = [r for r in train if r], [r for r in val if r]
    if not train:
        raise DatasetError(f"no image of {data.source} could be decoded: " + "; ".join(p.stats.skipped[:5]))
    view_fn = lambda s, rng, flip: encode_view(s, enc, rng, flip)  # noqa: E731  (per-step encoding)
    source = BucketedData(train, {k: g.options.batch_size for k, g in enumerate(data.groups)}, device, view_fn)
    if val:
        source.validation = BucketedData(val, {}, device, view_fn)
    p.stats.hits = p.latents.hits + p.text.hits
    return source, p.stats


def total_items(data: TrainingData) -> int:
    """How many images the caching pass visits (for a progress bar)."""
    return sum(sum(1 for r in data.repeats(g) if r > 0) + len(g.validation) for g in data.groups)
