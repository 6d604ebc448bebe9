"""Image-folder datasets: images with same-name ``.txt`` captions, resized and center-cropped."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


class DatasetError(ValueError):
    """Bad dataset input; the message names the file or folder and the fix."""


@dataclass
class ImageCaption:
    """One training sample before encoding. image: [H, W, 3] float32 in 0..1."""

    path: str
    caption: str
    image: torch.Tensor


def list_images(folder: str | os.PathLike) -> List[Path]:
    """Image files directly in ``folder`` (sorted), or a DatasetError saying what is wrong."""
    root = Path(folder).expanduser()
    if not str(folder).strip():
        raise DatasetError("no image folder given: set folder to a directory of images with .txt captions")
    if not root.exists():
        raise DatasetError(f"image folder not found: {root}. Set folder to an existing directory of images")
    if not root.is_dir():
        raise DatasetError(f"{root} is a file, not a folder. Set folder to the directory that holds the images")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {root}. Put the training images there")
    return files


def read_caption(image_path: Path, caption_extension: str = ".txt") -> str:
    """The caption beside an image (same name, ``caption_extension``); empty if there is none."""
    cap = image_path.with_suffix(caption_extension)
    if not cap.exists():
        return ""
    try:
        return cap.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as e:
        raise DatasetError(f"caption {cap} is not UTF-8 text ({e}); re-save it as UTF-8") from e


def resize_center_crop(img: Image.Image, width: int, height: int) -> Image.Image:
    """Scale ``img`` to cover width x height, then crop the center; keeps the aspect ratio."""
    scale = max(width / img.width, height / img.height)
    new_size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    img = img.resize(new_size, Image.Resampling.LANCZOS)
    left = (img.width - width) // 2
    top = (img.height - height) // 2
    return img.crop((left, top, left + width, top + height))


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """Open, EXIF-orient, make RGB and resize/crop ``path`` to a [res, res, 3] float tensor in 0..1."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                # Composite transparency on white, as most trainers do, instead of a black fringe.
                rgba = im.convert("RGBA")
                bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, rgba)
            im = im.convert("RGB")
            im = resize_center_crop(im, resolution, resolution)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"cannot read image {path}: {e}. Remove or replace the file") from e
    return torch.from_numpy(arr.copy())


def load_folder(folder: str | os.PathLike, resolution: int, caption_extension: str = ".txt") -> List[ImageCaption]:
    """Every image of ``folder`` with its caption, at ``resolution`` x ``resolution``."""
    if resolution < 64 or resolution % 16:
        raise DatasetError(f"resolution must be a multiple of 16 and at least 64 (got {resolution})")
    return [ImageCaption(str(p), read_caption(p, caption_extension), load_image(p, resolution))
            for p in list_images(folder)]


def fingerprint(samples: List[ImageCaption]) -> str:
    """A digest of the images' pixels and captions: equal data gives an equal fingerprint."""
    h = hashlib.sha256()
    for s in samples:
        h.update(s.caption.encode("utf-8"))
        h.update(str(tuple(s.image.shape)).encode())
        h.update(s.image.numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class FolderDataset:
    """A loaded image folder: what the dataset node hands to the training node."""

    folder: str
    resolution: int
    samples: List[ImageCaption]

    @property
    def fingerprint(self) -> str:
        return f"{self.resolution}:{fingerprint(self.samples)}"

    def tag_frequency(self) -> dict:
        """sd-scripts' ``ss_tag_frequency``: {folder name: {comma-separated tag: count}}."""
        counts: dict = {}
        for s in self.samples:
            for tag in (t.strip() for t in s.caption.split(",")):
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1
        return {Path(self.folder).name: counts}
