"""Image files and captions: finding them, checking them cheaply, and decoding them at a bucket size.

Files are checked from their headers when a dataset is built and decoded only when they are
encoded, so a dataset of thousands of images costs no memory until its latents are cached.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .captions import CaptionOptions

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024  # larger images are skipped: no decompression bombs
MIN_IMAGE_SIDE = 16  # smaller images are skipped: not one SD3 latent patch (2x2 latents = 16 px) of their own
_SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit greyscale PNGs open in these modes
_READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class DatasetError(ValueError):
    """Bad dataset input; the message names the file, folder or key and the fix."""


@dataclass(frozen=True)
class Subset:
    """Images that share settings: sd-scripts' ``[[datasets.subsets]]`` (defaults as there, except
    ``caption_extension``, ``.txt`` here)."""

    image_dir: str = ""
    num_repeats: int = 1         # each image counts this many times per epoch
    caption_extension: str = ".txt"
    is_reg: bool = False         # regularisation images: weighted by prior_loss_weight
    flip_aug: bool = False       # random horizontal flips (both flips are cached)
    random_crop: bool = False    # random instead of center crop (no latent cache)
    color_aug: bool = False      # random hue/gamma changes (no latent cache)
    alpha_mask: bool = False     # the alpha channel becomes the loss mask (else composited on white)
    captions: CaptionOptions = field(default_factory=CaptionOptions)

    def __post_init__(self):
        object.__setattr__(self, "caption_extension", caption_suffix(self.caption_extension))


def caption_suffix(extension: str) -> str:
    """``caption_extension`` as a file suffix: ``txt`` means ``.txt`` (what anyone writing it means).

    Example:
        >>> caption_suffix("caption")
        '.caption'
    """
    ext = extension.strip()
    if not ext.strip("."):
        raise DatasetError(f"caption_extension {extension!r} is empty: use the captions' file ending, e.g. .txt")
    if "/" in ext or "\\" in ext or " " in ext:
        raise DatasetError(f"caption_extension {extension!r} is not a file ending: use e.g. .txt or .caption")
    return ext if ext.startswith(".") else "." + ext


@dataclass
class ImageCaption:
    """One training image before encoding.

    ``content`` is a digest of the file's bytes (or of the pixels for images from the graph):
    caches are keyed by it. ``bucket`` is the training size and ``resized`` the size the image
    is scaled to before cropping to it, both (width, height).
    """

    path: str
    caption: str
    subset: Subset
    size: Tuple[int, int]
    content: str
    bucket: Tuple[int, int] = (0, 0)
    resized: Tuple[int, int] = (0, 0)
    pixels: Optional[torch.Tensor] = None  # [H, W, 3] 0..1, for images from the graph
    mask: Optional[torch.Tensor] = None    # [H, W] 0..1 loss mask, for images from the graph

    @property
    def image(self) -> torch.Tensor:
        """The image at its bucket size, [h, w, 3] float32 in 0..1 (decoded now)."""
        return load_pixels(self)[0]


def parse_repeat_folder(name: str) -> Optional[Tuple[int, str]]:
    """kohya's ``N_name`` folder: (N repeats, class tokens "name"), or None for other names.

    Example:
        >>> parse_repeat_folder("10_sks dog")
        (10, 'sks dog')
    """
    m = re.fullmatch(r"(\d+)_(.*)", name)
    return (int(m.group(1)), m.group(2).strip()) if m else None


def check_folder(folder: str | os.PathLike, what: str = "image folder") -> Path:
    """``folder`` as a Path if it is a readable directory, else a DatasetError saying what is wrong."""
    if not str(folder).strip():
        raise DatasetError(f"no {what} given: set it to a directory of images with caption files")
    root = Path(folder).expanduser()
    if not root.exists():
        raise DatasetError(f"{what} not found: {root}. Set it to an existing directory of images")
    if not root.is_dir():
        raise DatasetError(f"{root} is a file, not a folder. Set the {what} to the directory that holds the images")
    if not os.access(root, os.R_OK | os.X_OK):
        raise DatasetError(f"{what} {root} is not readable by this process; fix its permissions or copy the images")
    return root


def list_images(folder: str | os.PathLike, recursive: bool = True) -> List[Path]:
    """Image files in ``folder`` (and below it, skipping hidden folders), sorted; a DatasetError
    when the folder is missing or holds none."""
    root = check_folder(folder)
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith(".")) if recursive else []
        files.extend(Path(d) / n for n in names)
    files = sorted(p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {root}. Put the training images there")
    return files


def read_caption(image_path: Path, caption_extension: str = ".txt") -> Optional[str]:
    """The caption beside an image (same name, ``caption_extension``), or None if there is none.
    A UTF-8 byte-order mark (Windows editors write one) is not part of the caption."""
    cap = image_path.with_suffix(caption_suffix(caption_extension))
    if not cap.is_file():
        return None
    try:
        return cap.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise DatasetError(f"caption {cap} is not UTF-8 text ({e}); re-save it as UTF-8") from e
    except OSError as e:
        raise DatasetError(f"caption {cap} cannot be read ({e.strerror or e}); fix its permissions or remove it") from e


def _mpx(pixels: int) -> str:
    """Pixels in megapixels as max_megapixels counts them (2^20 px), e.g. "64" or "8.6"."""
    return f"{pixels / 2 ** 20:.1f}".removesuffix(".0")


def _check_decodes(path: Path) -> None:
    """Decode enough of the image to find a file cut short (the header alone reads fine): a JPEG
    at 1/8 scale (its decoder still reads every block), a PNG's chunks and checksums, others whole."""
    with Image.open(path) as im:
        if im.format == "JPEG":
            im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
            im.load()
        elif im.format == "PNG":
            im.verify()
        else:
            im.load()


def scan_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Tuple[Tuple[int, int], str]:
    """(size after EXIF orientation, sha256 of the file); DatasetError for an empty, unreadable
    (a broken link too), truncated, non-image, over-large or tiny file."""
    try:
        data = path.read_bytes()
    except OSError as e:
        what = "a link to a file that does not exist" if path.is_symlink() else (e.strerror or str(e))
        raise DatasetError(f"cannot read {path}: {what}") from e
    if not data:
        raise DatasetError(f"{path} is empty (0 bytes)")
    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated 90/270 degrees
                w, h = h, w
    except _READ_ERRORS as e:
        raise _unreadable(path, e) from e
    if w * h > max_pixels:
        raise DatasetError(f"{path} is {w}x{h} = {_mpx(w * h)} Mpx, above the {_mpx(max_pixels)} Mpx limit "
                           f"(max_megapixels); downscale it or raise max_megapixels")
    if min(w, h) < MIN_IMAGE_SIDE:
        raise DatasetError(f"{path} is {w}x{h} px, under {MIN_IMAGE_SIDE} px on a side: it would train as a blur; "
                           f"use a larger image")
    try:
        _check_decodes(path)
    except _READ_ERRORS as e:
        raise _unreadable(path, e) from e
    return (w, h), hashlib.sha256(data).hexdigest()


def _unreadable(path: Path, error: BaseException) -> DatasetError:
    return DatasetError(f"cannot read image {path}: {error} ({type(error).__name__}: not an image, or damaged or "
                        f"cut short); replace or remove the file")


def _open_rgb(sample: ImageCaption) -> Tuple[Image.Image, Optional[Image.Image]]:
    """The sample as an RGB PIL image, and its loss mask ("L") when the subset keeps one."""
    if sample.pixels is not None:
        arr = (sample.pixels.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        mask = sample.mask
        return Image.fromarray(arr), (Image.fromarray((mask.clamp(0, 1) * 255).round().to(torch.uint8).numpy())
                                      if mask is not None else None)
    with Image.open(sample.path) as im:
        im = ImageOps.exif_transpose(im)
        im.load()
    if im.mode in _SIXTEEN_BIT_GREY:
        im = _grey_to_8bit(im)
    has_alpha = im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info)
    if sample.subset.alpha_mask:
        # Keep the colours under transparent pixels (sd-scripts does) and train only where alpha > 0.
        rgba = im.convert("RGBA")
        return rgba.convert("RGB"), rgba.getchannel("A")
    if has_alpha:  # composite on white instead of a black fringe
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return im.convert("RGB"), None


def _grey_to_8bit(im: Image.Image) -> Image.Image:
    """A 16-bit greyscale image as 8-bit "L", scaled (Pillow's convert clips 0..65535 at 255: white)."""
    values = np.asarray(im, dtype=np.float64)
    if im.mode.startswith("I;16") or values.max(initial=0) > 255:
        values = values / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))  # 2-D uint8: mode "L"


def _color_aug(img: Image.Image, rng: random.Random) -> Image.Image:
    """sd-scripts' color_aug: a third of the time, a hue shift of up to ±8/180 or a gamma of 0.95-1.05."""
    if rng.random() > 0.33:
        return img
    if rng.random() > 0.5:
        h, s, v = img.convert("HSV").split()
        shift = int(round(rng.uniform(-8, 8) * 256 / 180))
        h = h.point(lambda x: (x + shift) % 256)
        return Image.merge("HSV", (h, s, v)).convert("RGB")
    gamma = rng.uniform(0.95, 1.05)
    return img.point(lambda x: int(min(255, 255 * (x / 255) ** gamma)))


def load_pixels(sample: ImageCaption, rng: Optional[random.Random] = None,
                flip: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Decode, resize to ``sample.resized`` and crop to ``sample.bucket`` (center, or random with
    ``random_crop`` and an ``rng``); returns (image [h, w, 3], mask [h, w] or None), float32 in 0..1."""
    try:
        img, mask = _open_rgb(sample)
    except _READ_ERRORS as e:
        raise DatasetError(f"cannot read image {sample.path}: {e}. Remove or replace the file") from e
    (bw, bh), (rw, rh) = sample.bucket, sample.resized
    left, top = (rw - bw) // 2, (rh - bh) // 2
    if sample.subset.random_crop and rng is not None:
        left, top = rng.randint(0, rw - bw), rng.randint(0, rh - bh)
    box = (left, top, left + bw, top + bh)
    img = img.resize((rw, rh), Image.Resampling.LANCZOS).crop(box)
    if sample.subset.color_aug and rng is not None:
        img = _color_aug(img, rng)
    if flip:
        img = ImageOps.mirror(img)
    image = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    if mask is None:
        return image, None
    mask = mask.resize((rw, rh), Image.Resampling.BILINEAR).crop(box)
    if flip:
        mask = ImageOps.mirror(mask)
    return image, torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)
