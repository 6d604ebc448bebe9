"""Datasets as sd-scripts groups them: datasets (size, batch, buckets, validation split) made of
subsets (a folder with repeats, caption and augmentation settings), plus regularisation images."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, List, Optional, Tuple

import torch

from . import buckets as bk
from .data import (DEFAULT_MAX_PIXELS, DatasetError, ImageCaption, Subset, check_folder, list_images,
                   parse_repeat_folder, read_caption, scan_image)

log = logging.getLogger(__name__)

CACHE_MODES = ("memory", "disk", "none")


@dataclass(frozen=True)
class DatasetOptions:
    """The keys of an sd-scripts ``[[datasets]]`` entry (defaults as sd-scripts')."""

    resolution: Tuple[int, int] = (512, 512)  # (width, height); buckets keep the area at most w*h
    batch_size: Optional[int] = None          # None: the settings' train_batch_size
    enable_bucket: bool = False               # aspect-ratio buckets instead of one square crop
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64               # bucket sides are multiples of it (of 16 for SD3)
    bucket_no_upscale: bool = False           # never enlarge: buckets from the images' own sizes
    validation_split: float = 0.0             # fraction of each non-reg subset held out for validation
    validation_seed: int = 0                  # which images are held out

    def validate(self, where: str = "dataset") -> "DatasetOptions":
        """Raise DatasetError naming ``where`` and the key for a bad value; return self."""
        w, h = self.resolution
        if min(w, h) < 64 or w % bk.SD3_PIXEL_STEP or h % bk.SD3_PIXEL_STEP:
            raise DatasetError(f"{where}: resolution must be at least 64 and a multiple of {bk.SD3_PIXEL_STEP} "
                               f"for SD3 (got {w}x{h}), e.g. 512 or 1024")
        if self.batch_size is not None and self.batch_size < 1:
            raise DatasetError(f"{where}: batch_size must be at least 1 (got {self.batch_size})")
        if not 0.0 <= self.validation_split < 1.0:
            raise DatasetError(f"{where}: validation_split must be in [0, 1) (got {self.validation_split})")
        if self.enable_bucket:
            try:
                bk.check_bucket_settings(self.resolution, self.min_bucket_reso, self.max_bucket_reso,
                                         self.bucket_reso_steps)
            except bk.BucketError as e:
                raise DatasetError(f"{where}: {e}") from e
        return self


@dataclass
class DatasetGroup:
    """One dataset: its options, subsets, training images (reg included) and held-out images."""

    options: DatasetOptions
    subsets: List[Subset]
    samples: List[ImageCaption]
    validation: List[ImageCaption] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)  # files left out when scanning, with the reason


def folder_subsets(root: str, base: Subset) -> Tuple[List[Subset], List[str]]:
    """The subsets of an image folder: one per kohya ``N_name`` subfolder (N repeats, class tokens
    "name"), or the folder itself when it has none. Returns (subsets, warnings)."""
    path = check_folder(root, "reg_folder" if base.is_reg else "image folder")
    dirs = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    kohya = [(d, parse_repeat_folder(d.name)) for d in dirs if parse_repeat_folder(d.name)]
    if not kohya:
        return [replace(base, image_dir=str(path))], []
    warnings = [f"ignored folder {d} (not an N_name repeat folder)" for d in dirs if not parse_repeat_folder(d.name)]
    subsets = []
    for d, (repeats, tokens) in kohya:
        if repeats < 1:
            warnings.append(f"ignored folder {d}: 0 repeats")
            continue
        subsets.append(replace(base, image_dir=str(d), num_repeats=repeats,
                               captions=replace(base.captions, class_tokens=tokens or base.captions.class_tokens)))
    return subsets, warnings


def collect_subset(subset: Subset, warnings: List[str], max_pixels: int = DEFAULT_MAX_PIXELS,
                   skipped: Optional[List[str]] = None) -> List[ImageCaption]:
    """The readable images of a subset with their captions; unreadable ones are skipped, named in
    ``warnings`` and appended to ``skipped`` (the run goes on, as sd-scripts' goes on without them).
    An empty caption file counts as none: the subset's class_tokens stand in."""
    samples, uncaptioned = [], []
    for p in list_images(subset.image_dir):
        try:
            size, digest = scan_image(p, max_pixels)
        except DatasetError as e:
            warnings.append(f"skipped {e}")
            if skipped is not None:
                skipped.append(str(e))
            log.warning("SD3 LoRA dataset: skipped %s", e)
            continue
        caption = read_caption(p, subset.caption_extension) or subset.captions.class_tokens
        if not caption:
            uncaptioned.append(p.name)
        samples.append(ImageCaption(str(p), caption, subset, size, digest))
    if uncaptioned:
        warnings.append(empty_caption_warning(uncaptioned, f"in {subset.image_dir} have no or an empty "
                                              f"{subset.caption_extension} caption and the subset has no class_tokens"))
    return samples


def empty_caption_warning(names: List[str], what: str) -> str:
    """The warning for images that train with an empty caption (first five named)."""
    return (f"{len(names)} image(s) {what}; they train with an empty caption: "
            f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")


def split_validation(samples: List[ImageCaption], fraction: float, seed: int) -> Tuple[list, list]:
    """sd-scripts' ``split_train_val``: shuffle with ``seed``, keep the first ceil(n·(1−fraction))."""
    if fraction <= 0 or not samples:
        return samples, []
    order = list(samples)
    random.Random(seed).shuffle(order)
    keep = math.ceil(len(order) * (1 - fraction))
    by_path = lambda s: s.path  # noqa: E731  (sorted back, for a readable listing)
    return sorted(order[:keep], key=by_path), sorted(order[keep:], key=by_path)


def assign_buckets(samples: List[ImageCaption], o: DatasetOptions) -> None:
    """Set each sample's bucket and resized size (one square bucket when buckets are off)."""
    if o.enable_bucket:
        table = None if o.bucket_no_upscale else bk.make_bucket_resolutions(
            o.resolution, o.min_bucket_reso, o.max_bucket_reso, o.bucket_reso_steps)
        steps = o.bucket_reso_steps
    else:
        table, steps = [tuple(o.resolution)], bk.SD3_PIXEL_STEP
    for s in samples:
        s.bucket, s.resized = bk.select_bucket(s.size[0], s.size[1], table, o.resolution, steps)


def build_group(options: DatasetOptions, subsets: List[Subset], warnings: List[str],
                max_pixels: int = DEFAULT_MAX_PIXELS,
                collect: Optional[Callable[[Subset], List[ImageCaption]]] = None) -> DatasetGroup:
    """Read every subset, split off validation images and put every image in its bucket."""
    train, val, skipped = [], [], []
    for sub in subsets:
        found = collect(sub) if collect else collect_subset(sub, warnings, max_pixels, skipped)
        if not found:
            warnings.append(f"no readable images in {sub.image_dir or 'the graph input'}: subset ignored")
            continue
        keep, held = (found, []) if sub.is_reg else split_validation(found, options.validation_split,
                                                                      options.validation_seed)
        train += keep
        val += held
    assign_buckets(train + val, options)
    return DatasetGroup(options, subsets, train, val, skipped)


def reg_repeats(num_train: int, repeats: List[int]) -> List[int]:
    """Per-epoch repeats of regularisation images, as sd-scripts registers them: reg images are
    added (each with its repeats, then one more at a time) until they match the training count.

    Example:
        >>> reg_repeats(5, [1, 1])   # 2 reg images, 5 training images (with repeats)
        [3, 2]
    """
    out, n, first = [0] * len(repeats), 0, True
    while repeats and n < num_train:
        for i, r in enumerate(repeats):
            out[i] += r if first else 1
            n += r if first else 1
            if n >= num_train:
                break
        first = False
    return out


def samples_digest(samples: List[ImageCaption]) -> str:
    """Digest of what training sees of the images: content, caption, sizes and subset settings."""
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s.content, s.caption, s.bucket, s.resized, asdict(s.subset)], default=str).encode())
    return h.hexdigest()[:16]


def graph_samples(images: torch.Tensor, captions: List[str], subset: Subset,
                  masks: Optional[torch.Tensor] = None) -> List[ImageCaption]:
    """Samples from an IMAGE batch [B, H, W, 3] and one caption per image (and a MASK batch of
    loss masks [B, H, W], 1 = train); keyed by a digest of the pixels."""
    if images.dim() != 4 or images.shape[-1] < 3:
        raise DatasetError(f"images must be an IMAGE batch [B, H, W, 3] (got shape {tuple(images.shape)})")
    if len(captions) not in (1, images.shape[0]):
        raise DatasetError(f"captions has {len(captions)} lines for {images.shape[0]} images: write one caption "
                           f"per line (or a single line for all images)")
    out = []
    for i in range(images.shape[0]):
        px = images[i, ..., :3].detach().float().cpu().clone().contiguous()
        mask = masks[min(i, masks.shape[0] - 1)].detach().float().cpu().clone() if masks is not None else None
        h = hashlib.sha256(px.numpy().tobytes())
        if mask is not None:
            h.update(mask.numpy().tobytes())
        cap = captions[i] if len(captions) > 1 else captions[0]
        out.append(ImageCaption(f"graph:{i}", cap, subset, (px.shape[1], px.shape[0]), h.hexdigest(), pixels=px,
                                mask=mask))
    return out
