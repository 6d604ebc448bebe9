"""Dataset nodes: an image folder (kohya repeat folders), an sd-scripts dataset TOML, images from the graph."""
from __future__ import annotations

import os

from ..trainer.captions import CaptionOptions
from ..trainer.data import DEFAULT_MAX_PIXELS, DatasetError, Subset, caption_suffix, check_folder, list_images
from ..trainer.dataset import (CACHE_MODES, DatasetOptions, build_group, empty_caption_warning, folder_subsets,
                               graph_samples)
from ..trainer.dataset_toml import parse_dataset_toml
from ..trainer.training_data import CacheOptions, TrainingData
from . import checks, live
from .common import CATEGORY, DATASET

_D = DatasetOptions()  # defaults come from the trainer, defined once

BUCKET_INPUTS = {
    "enable_bucket": ("BOOLEAN", {"default": _D.enable_bucket, "tooltip": "Aspect-ratio buckets (--enable_bucket): "
                      "each image is trained at the bucket nearest its aspect ratio, area <= resolution²."}),
    "min_bucket_reso": ("INT", {"default": _D.min_bucket_reso, "min": 64, "max": 4096, "step": 16,
                                "tooltip": "Smallest bucket side (--min_bucket_reso)."}),
    "max_bucket_reso": ("INT", {"default": _D.max_bucket_reso, "min": 64, "max": 8192, "step": 16,
                                "tooltip": "Largest bucket side (--max_bucket_reso)."}),
    "bucket_reso_steps": ("INT", {"default": _D.bucket_reso_steps, "min": 16, "max": 256, "step": 16,
                                  "tooltip": "Bucket sides are multiples of this (--bucket_reso_steps; 16 or a "
                                             "multiple of it for SD3)."}),
    "bucket_no_upscale": ("BOOLEAN", {"default": _D.bucket_no_upscale, "tooltip": "Never enlarge images; buckets "
                          "follow their own sizes (--bucket_no_upscale)."}),
}
CACHE_INPUTS = {
    "cache_latents": (list(CACHE_MODES), {"default": "memory", "tooltip": "Keep VAE latents: in memory, or also as "
                      "safetensors files on disk (reused by later runs); 'none' encodes every step (needed by "
                      "random_crop / color_aug)."}),
    "cache_text_encoder_outputs": (list(CACHE_MODES), {"default": "memory", "tooltip": "Keep text-encoder outputs; "
                                   "'none' encodes every step (needed by caption shuffle / dropout / wildcards)."}),
    "cache_dir": ("STRING", {"default": "", "tooltip": "Folder of the disk cache; empty = a .sd3_lora_cache folder "
                             "inside each image folder."}),
    "prior_loss_weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01,
                                    "tooltip": "Loss weight of regularisation images (--prior_loss_weight)."}),
    "validate_every_n_steps": ("INT", {"default": 0, "min": 0, "max": 1_000_000, "tooltip": "Validation loss on "
                               "the held-out images every N steps (--validate_every_n_steps); 0 = off."}),
    "max_megapixels": ("INT", {"default": DEFAULT_MAX_PIXELS // 2 ** 20, "min": 1, "max": 1024, "tooltip":
                       "Images larger than this are skipped with a warning (no decompression bombs)."}),
}
VALIDATION_INPUTS = {
    "validation_split": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.9, "step": 0.01,
                                   "tooltip": "Fraction of the (non-reg) images held out for validation."}),
    "validation_seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1, "tooltip": "Which images are held out."}),
}


class _DatasetNode:
    """What every dataset node returns."""

    RETURN_TYPES = (DATASET, "STRING")
    RETURN_NAMES = ("dataset", "summary")
    OUTPUT_TOOLTIPS = ("Images and settings for the train node.", "Image counts, the bucket table and any skipped files.")
    FUNCTION = "load"
    CATEGORY = CATEGORY


def resolve_folder(folder: str) -> str:
    """An absolute path as given, or one relative to the host's input directory."""
    folder = os.path.expanduser(folder.strip())
    if folder and not os.path.isabs(folder):
        import folder_paths

        folder = os.path.join(folder_paths.get_input_directory(), folder)
    return folder


def is_toml(path: str) -> bool:
    """Whether a folder input names an sd-scripts dataset config file instead."""
    return path.strip().lower().endswith(".toml") and os.path.isfile(resolve_folder(path))


def _options(resolution, kw) -> DatasetOptions:
    keys = set(BUCKET_INPUTS) | set(VALIDATION_INPUTS)
    return DatasetOptions(resolution=(resolution, resolution),
                          **{k: v for k, v in kw.items() if k in keys and v is not None})


def _cache_options(kw) -> CacheOptions:
    return CacheOptions(kw.get("cache_latents") or "memory", kw.get("cache_text_encoder_outputs") or "memory",
                        resolve_folder(kw.get("cache_dir") or "")).validate()


def _check_options(where: str, resolution, **kw) -> None:
    """Queue-time check of the dataset and cache widgets a node has (None: linked or absent)."""
    if resolution is not None:
        _options(resolution, kw).validate(where)
    _cache_options(kw)


def _check_toml(path: str) -> None:
    """Queue-time check of a dataset config: it parses, and every image_dir is a readable folder."""
    for _, subsets in parse_dataset_toml(resolve_folder(path)):
        for sub in subsets:
            check_folder(sub.image_dir, "image_dir")


HIDDEN = {"unique_id": "UNIQUE_ID"}  # the node's id, to show its summary on it in the editor


def _finish(groups, source: str, warnings: list, kw: dict):
    """The node's outputs: the TrainingData and its summary (counts, bucket table, warnings).

    A plain tuple, not {"ui": ...}: callers (and tests) index the result like every other node's."""
    data = TrainingData(groups, source, _cache_options(kw), kw.get("prior_loss_weight", 1.0),
                        kw.get("validate_every_n_steps", 0), warnings)
    summary = data.summary()
    if kw.get("unique_id") is not None:
        # Shown on the node by web/dataset_summary.js (image counts and the bucket table).
        live.dataset_summary(kw["unique_id"], summary)
    return data, summary


def _mtime(path) -> int:
    """Modification time in ns; 0 for a file that went away or a link to nothing (skipped when loading)."""
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _stamps(folders) -> str:
    """Names and modification times of every image and caption below ``folders``."""
    stamps = []
    for folder in folders:
        for p in list_images(folder):
            stamps += [(str(p), _mtime(p))] + [(str(c), _mtime(c)) for c in p.parent.glob(p.stem + ".*") if c != p]
    return str(stamps)


class SD3LoraImageFolder(_DatasetNode):
    """A folder of captioned images, or a kohya folder of ``N_name`` repeat subfolders."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "folder": ("STRING", {"default": "", "tooltip": "Folder of training images (png/jpg/webp/bmp, searched "
                                  "recursively) with same-name caption files, or of kohya 'N_name' subfolders (N "
                                  "repeats, 'name' = caption for images without one), or an sd-scripts dataset "
                                  ".toml file. Absolute, or relative to ComfyUI's input folder."}),
            "resolution": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 16,
                                   "tooltip": "Training size: images are resized and cropped to resolution² (or to "
                                              "buckets of that area). A multiple of 16."}),
            "caption_extension": ("STRING", {"default": ".txt", "tooltip": "Extension of the caption files."}),
        }, "optional": {
            **BUCKET_INPUTS,
            "alpha_mask": ("BOOLEAN", {"default": False, "tooltip": "Use transparency as the loss mask instead of "
                           "compositing on white (--alpha_mask)."}),
            "flip_aug": ("BOOLEAN", {"default": False, "tooltip": "Random horizontal flips (--flip_aug)."}),
            "reg_folder": ("STRING", {"default": "", "tooltip": "Optional folder of regularisation images (same "
                           "layout; --reg_data_dir)."}),
            **VALIDATION_INPUTS, **CACHE_INPUTS,
        }, "hidden": dict(HIDDEN)}

    DESCRIPTION = "A training dataset from a folder of captioned images (kohya repeat folders supported)."

    @classmethod
    def VALIDATE_INPUTS(cls, folder, resolution, caption_extension, reg_folder=None, cache_dir=None,
                        enable_bucket=None, min_bucket_reso=None, max_bucket_reso=None, bucket_reso_steps=None,
                        validation_split=None, prior_loss_weight=None):
        # At queue time: a missing folder, a TOML mistake or a bad setting costs no model loading.
        buckets = dict(enable_bucket=enable_bucket, min_bucket_reso=min_bucket_reso, max_bucket_reso=max_bucket_reso,
                       bucket_reso_steps=bucket_reso_steps, validation_split=validation_split)
        return checks.report(
            cls, locals(),
            checks.given(folder, lambda f: _check_toml(f) if is_toml(f) else list_images(resolve_folder(f))),
            checks.given(reg_folder, lambda f: f.strip() and list_images(resolve_folder(f))),
            checks.given(caption_extension, caption_suffix),
            lambda: _check_options("SD3LoraImageFolder", None if folder and is_toml(folder) else resolution,
                                   cache_dir=cache_dir, **buckets))

    @classmethod
    def IS_CHANGED(cls, folder, resolution, caption_extension, reg_folder="", **kw):
        # Re-run when files are added, removed or edited, not only when the inputs change.
        if is_toml(folder):
            return SD3LoraDatasetConfig.IS_CHANGED(folder)
        try:
            return _stamps([resolve_folder(f) for f in (folder, reg_folder) if f.strip()])
        except ValueError:
            return float("nan")

    def load(self, folder, resolution, caption_extension, reg_folder="", alpha_mask=False, flip_aug=False, **kw):
        if is_toml(folder):  # a dataset config in the folder box: its keys win, the node's are defaults
            defaults = {"resolution": (resolution, resolution), "caption_extension": caption_extension}
            return SD3LoraDatasetConfig().load(folder, defaults=defaults, **kw)
        options = _options(resolution, kw).validate("SD3LoraImageFolder")
        base = Subset(caption_extension=caption_extension, alpha_mask=alpha_mask, flip_aug=flip_aug)
        subsets, warnings = folder_subsets(resolve_folder(folder), base)
        if reg_folder.strip():
            reg, more = folder_subsets(resolve_folder(reg_folder), Subset(caption_extension=caption_extension,
                                                                         alpha_mask=alpha_mask, is_reg=True))
            subsets, warnings = subsets + reg, warnings + more
        max_pixels = kw.get("max_megapixels", DEFAULT_MAX_PIXELS // 2 ** 20) * 2 ** 20
        group = build_group(options, subsets, warnings, max_pixels)
        return _finish([group], resolve_folder(folder), warnings, kw)


class SD3LoraDatasetConfig(_DatasetNode):
    """An sd-scripts dataset config (.toml) with [general], [[datasets]] and [[datasets.subsets]]."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "toml_path": ("STRING", {"default": "", "tooltip": "sd-scripts dataset config file (--dataset_config). "
                                     "Absolute, or relative to ComfyUI's input folder; relative image_dir entries "
                                     "are relative to the file's folder."}),
        }, "optional": dict(CACHE_INPUTS), "hidden": dict(HIDDEN)}

    DESCRIPTION = "Datasets from an sd-scripts dataset TOML file (repeats, reg images, buckets, caption options)."

    @classmethod
    def VALIDATE_INPUTS(cls, toml_path, cache_dir=None, prior_loss_weight=None):
        return checks.report(cls, locals(), checks.given(toml_path, _check_toml),
                             lambda: _check_options("SD3LoraDatasetConfig", None, cache_dir=cache_dir))

    @classmethod
    def IS_CHANGED(cls, toml_path, **kw):
        try:
            path = resolve_folder(toml_path)
            dirs = [s.image_dir for _, subs in parse_dataset_toml(path) for s in subs]
            return f"{os.stat(path).st_mtime_ns}:{_stamps(dirs)}"
        except (ValueError, OSError):
            return float("nan")

    def load(self, toml_path, defaults=None, **kw):
        path = resolve_folder(toml_path)
        warnings: list = []
        max_pixels = kw.get("max_megapixels", DEFAULT_MAX_PIXELS // 2 ** 20) * 2 ** 20
        groups = []
        for opts, subsets in parse_dataset_toml(path, defaults):
            try:
                groups.append(build_group(opts, subsets, warnings, max_pixels))
            except DatasetError as e:  # e.g. an image_dir that does not exist: say which file names it
                raise DatasetError(f"{path}: {e}") from None
        return _finish(groups, path, warnings, kw)


def _caption_lines(captions: str) -> list:
    """One caption per line (a UTF-8 byte-order mark pasted in is dropped; trailing empty lines too)."""
    lines = [c.strip() for c in captions.lstrip("\ufeff").replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise DatasetError("captions is empty: write one caption per line (or one line for all images)")
    return lines


class SD3LoraImagesFromGraph(_DatasetNode):
    """Training images from other nodes: an IMAGE batch and one caption per line."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The training images (e.g. from Load Image or a batch node)."}),
            "captions": ("STRING", {"default": "", "multiline": True, "tooltip": "One caption per line, in image "
                                    "order; a single line is used for every image."}),
            "resolution": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 16,
                                   "tooltip": "Training size (a multiple of 16)."}),
            "num_repeats": ("INT", {"default": 1, "min": 1, "max": 10000, "tooltip": "Times each image is seen per "
                                    "epoch (num_repeats)."}),
        }, "optional": {
            "loss_mask": ("MASK", {"tooltip": "Optional loss mask per image (1 = train, 0 = ignore)."}),
            **BUCKET_INPUTS, **CACHE_INPUTS,
        }, "hidden": dict(HIDDEN)}

    DESCRIPTION = "A training dataset from an IMAGE batch and captions written on the node."

    @classmethod
    def VALIDATE_INPUTS(cls, captions, resolution, cache_dir=None, enable_bucket=None, min_bucket_reso=None,
                        max_bucket_reso=None, bucket_reso_steps=None, prior_loss_weight=None):
        return checks.report(cls, locals(), checks.given(captions, _caption_lines), lambda: _check_options(
            "SD3LoraImagesFromGraph", resolution, cache_dir=cache_dir, enable_bucket=enable_bucket,
            min_bucket_reso=min_bucket_reso, max_bucket_reso=max_bucket_reso, bucket_reso_steps=bucket_reso_steps))

    def load(self, images, captions, resolution, num_repeats, loss_mask=None, **kw):
        lines = _caption_lines(captions)
        subset = Subset(num_repeats=num_repeats, captions=CaptionOptions())
        samples = graph_samples(images, lines, subset, loss_mask)
        options = _options(resolution, kw).validate("SD3LoraImagesFromGraph")
        warnings: list = []
        empty = [s.path for s in samples if not s.caption]
        if empty:
            warnings.append(empty_caption_warning(empty, "have an empty line in captions"))
        group = build_group(options, [subset], warnings, collect=lambda _: samples)
        return _finish([group], "graph", warnings, kw)
