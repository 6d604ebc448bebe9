"""What a dataset node hands to the train node: datasets, cache settings, and the facts that the
node shows (bucket table, warnings) and that sd-scripts writes into the LoRA's metadata."""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List

from .buckets import bucket_counts, format_bucket_table
from .dataset import CACHE_MODES, DatasetGroup, reg_repeats, samples_digest
from .data import DatasetError, ImageCaption


@dataclass(frozen=True)
class CacheOptions:
    """sd-scripts' --cache_latents(_to_disk) / --cache_text_encoder_outputs(_to_disk)."""

    latents: str = "memory"  # memory | disk | none (encode every step: needed by random_crop / color_aug)
    text: str = "memory"     # memory | disk | none (encode every step: needed by shuffle / dropout / wildcards)
    folder: str = ""         # disk cache folder; "" = a ".sd3_lora_cache" folder inside each image folder

    def validate(self) -> "CacheOptions":
        for key, value in (("cache_latents", self.latents), ("cache_text_encoder_outputs", self.text)):
            if value not in CACHE_MODES:
                raise DatasetError(f"{key} must be one of {', '.join(CACHE_MODES)} (got {value!r})")
        if self.folder and os.path.exists(self.folder) and not os.path.isdir(self.folder):
            raise DatasetError(f"cache_dir {self.folder} is a file: name a folder (it is created when missing), or "
                               f"leave cache_dir empty for a .sd3_lora_cache folder beside the images")
        return self


@dataclass
class TrainingData:
    """Datasets ready to encode. ``groups`` in order; ``source`` the folder or TOML file."""

    groups: List[DatasetGroup]
    source: str
    cache: CacheOptions = field(default_factory=CacheOptions)
    prior_loss_weight: float = 1.0
    validate_every_n_steps: int = 0
    warnings: List[str] = field(default_factory=list)

    def __post_init__(self):
        if not (math.isfinite(self.prior_loss_weight) and self.prior_loss_weight >= 0):
            raise DatasetError(f"prior_loss_weight must be a finite number >= 0 (got {self.prior_loss_weight}); "
                               f"1.0 weighs regularisation images like the others")
        self.skipped = [f for g in self.groups for f in g.skipped]  # also of datasets left with no images
        self.groups = [g for g in self.groups if g.samples]
        if not self.groups:
            detail = ("; " + "; ".join(self.warnings[:5])) if self.warnings else ""
            raise DatasetError(f"no readable training images in {self.source}{detail}")
        self.check_cache_allowed()

    def check_cache_allowed(self) -> None:
        """Refuse caching where sd-scripts refuses it, naming the subset setting and the fix."""
        for g in self.groups:
            for sub in g.subsets:
                name = sub.image_dir or "graph images"
                if self.cache.latents != "none" and (sub.random_crop or sub.color_aug):
                    key = "random_crop" if sub.random_crop else "color_aug"
                    raise DatasetError(f"{key} (subset {name}) changes the image every step, so latents cannot be "
                                       f"cached: set cache_latents to none, or turn {key} off")
                if self.cache.text != "none" and sub.captions.varies_per_step():
                    raise DatasetError(f"subset {name} changes its captions every step (shuffle_caption, caption "
                                       f"dropout or wildcards), so text-encoder outputs cannot be cached: set "
                                       f"cache_text_encoder_outputs to none, or turn those off")

    @property
    def samples(self) -> List[ImageCaption]:
        """Every training image (reg included, validation excluded), in dataset order."""
        return [s for g in self.groups for s in g.samples]

    @property
    def resolution(self) -> int:
        """The first dataset's resolution (its longer side): what ss_resolution reports."""
        return max(self.groups[0].options.resolution)

    @property
    def max_side(self) -> int:
        """The longest side of any bucket: what the model's position embedding must cover."""
        return max(max(s.bucket) for g in self.groups for s in g.samples + g.validation)

    @property
    def folder(self) -> str:
        return self.source

    @property
    def fingerprint(self) -> str:
        """Equal for equal images, captions, sizes and settings: the session continues on it."""
        opts = json.dumps([asdict(g.options) for g in self.groups] + [self.prior_loss_weight], default=str)
        digest = samples_digest([s for g in self.groups for s in g.samples + g.validation])
        return hashlib.sha256((opts + digest).encode()).hexdigest()[:16]

    def repeats(self, group: DatasetGroup) -> List[int]:
        """Per-epoch repeats of each training image of ``group`` (reg images balanced as sd-scripts does)."""
        num_train = sum(s.subset.num_repeats for s in group.samples if not s.subset.is_reg)
        reg = [i for i, s in enumerate(group.samples) if s.subset.is_reg]
        out = [s.subset.num_repeats for s in group.samples]
        for i, r in zip(reg, reg_repeats(num_train, [group.samples[i].subset.num_repeats for i in reg])):
            out[i] = r
        return out

    def bucket_rows(self) -> List[tuple]:
        """(dataset label, bucket, images × repeats) rows, as sd-scripts' bucket_info counts them."""
        rows = []
        for k, g in enumerate(self.groups):
            label = f"[{k}] " if len(self.groups) > 1 else ""
            weighted = [b for s, r in zip(g.samples, self.repeats(g)) for b in [s.bucket] * r]
            rows += [(label, b, n) for b, n in bucket_counts(weighted)]
        return rows

    def bucket_table(self) -> str:
        return format_bucket_table(self.bucket_rows())

    def summary(self) -> str:
        """What the dataset node shows: counts, buckets, and every warning."""
        info = self.metadata_info()
        val = sum(len(g.validation) for g in self.groups)
        skipped = f"; {len(self.skipped)} file(s) skipped (listed below)" if self.skipped else ""
        lines = [f"{len(self.samples)} images ({info['num_images']} per epoch with repeats, "
                 f"{info['num_reg_images']} reg, {val} validation) from {self.source}{skipped}", self.bucket_table()]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def tag_frequency(self) -> Dict[str, Dict[str, int]]:
        """sd-scripts' ``ss_tag_frequency``: {image folder name: {lower-cased tag: images}}."""
        out: Dict[str, Dict[str, int]] = {}
        for s in self.samples:
            counts = out.setdefault(os.path.basename(s.subset.image_dir) or "graph", {})
            for tag in (t.strip().lower() for t in s.caption.split(",")):
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1
        return out

    def _dataset_entry(self, g: DatasetGroup, reps: List[int], dirs: dict) -> dict:
        """One ``ss_datasets`` entry as sd-scripts writes it; records non-reg dirs into ``dirs``."""
        o = g.options
        subsets = []
        for sub in g.subsets:
            count = sum(1 for s in g.samples if s.subset is sub)
            name = os.path.basename(sub.image_dir) or "graph"
            c = sub.captions
            subsets.append({"img_count": count, "num_repeats": sub.num_repeats, "color_aug": sub.color_aug,
                            "flip_aug": sub.flip_aug, "random_crop": sub.random_crop,
                            "shuffle_caption": c.shuffle_caption, "keep_tokens": c.keep_tokens,
                            "keep_tokens_separator": c.keep_tokens_separator, "enable_wildcard": c.enable_wildcard,
                            "caption_prefix": c.caption_prefix, "caption_suffix": c.caption_suffix,
                            "image_dir": name, "class_tokens": c.class_tokens, "is_reg": sub.is_reg,
                            "alpha_mask": sub.alpha_mask})
            if not sub.is_reg:
                key, i = name, 2
                while key in dirs:  # sd-scripts numbers repeated folder names
                    key, i = f"{name} ({i})", i + 1
                dirs[key] = {"n_repeats": sub.num_repeats, "img_count": count}
        rows = bucket_counts([b for s, r in zip(g.samples, reps) for b in [s.bucket] * r])
        return {"is_dreambooth": True, "batch_size_per_device": o.batch_size,
                "num_train_images": sum(r for s, r in zip(g.samples, reps) if not s.subset.is_reg),
                "num_reg_images": sum(r for s, r in zip(g.samples, reps) if s.subset.is_reg),
                "resolution": list(o.resolution), "enable_bucket": o.enable_bucket,
                "min_bucket_reso": o.min_bucket_reso, "max_bucket_reso": o.max_bucket_reso,
                "bucket_info": bucket_info(rows), "subsets": subsets}

    def metadata_info(self) -> dict:
        """The session facts ``build_metadata`` reads: counts, dirs, datasets, buckets, tags."""
        dirs: dict = {}
        datasets = [self._dataset_entry(g, self.repeats(g), dirs) for g in self.groups]
        o = self.groups[0].options
        return {"resolution": self.resolution, "num_images": sum(d["num_train_images"] for d in datasets),
                "num_reg_images": sum(d["num_reg_images"] for d in datasets), "dataset_dirs": dirs,
                "datasets": datasets, "tag_frequency": self.tag_frequency(),
                "bucket_info": datasets[0]["bucket_info"] if len(datasets) == 1 else [d["bucket_info"] for d in datasets],
                "enable_bucket": o.enable_bucket, "min_bucket_reso": o.min_bucket_reso,
                "max_bucket_reso": o.max_bucket_reso, "bucket_no_upscale": o.bucket_no_upscale,
                "num_skipped_images": len(self.skipped),
                "prior_loss_weight": self.prior_loss_weight, "cache_latents": self.cache.latents != "none",
                "cache_text_encoder_outputs": self.cache.text != "none"}


def bucket_info(rows: List[tuple]) -> dict:
    """sd-scripts' ``bucket_info``: {"buckets": {i: {"resolution": [w, h], "count": n}}}."""
    return {"buckets": {str(i): {"resolution": list(b), "count": n} for i, (b, n) in enumerate(rows)}}
