"""Aspect-ratio buckets as sd-scripts makes them (``library/model_util.make_bucket_resolutions`` and
``library/train_util.BucketManager.select_bucket``): every bucket's area is at most the training
area, its sides are multiples of ``bucket_reso_steps``, and each image goes to the bucket whose
aspect ratio is nearest to its own, resized to cover it and cropped."""
from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, List, Optional, Tuple

Size = Tuple[int, int]  # (width, height) in pixels

# SD3 latents are 1/8 of the image and the MMDiT cuts them into 2x2 patches: sides must be multiples of 16.
SD3_PIXEL_STEP = 16


class BucketError(ValueError):
    """A bucket setting that cannot work; the message names the setting and the fix."""


def check_bucket_settings(resolution: Size, min_reso: int, max_reso: int, steps: int) -> None:
    """Refuse what sd-scripts refuses, plus steps that do not suit SD3's 16-pixel patches."""
    if steps < SD3_PIXEL_STEP or steps % SD3_PIXEL_STEP:
        raise BucketError(f"bucket_reso_steps must be a multiple of {SD3_PIXEL_STEP} for SD3 (got {steps}); "
                          f"use 64 (sd-scripts' default) or 16/32/128")
    if min_reso % steps or max_reso % steps:
        raise BucketError(f"min_bucket_reso ({min_reso}) and max_bucket_reso ({max_reso}) must be multiples of "
                          f"bucket_reso_steps ({steps})")
    if min_reso > min(resolution):
        raise BucketError(f"min_bucket_reso ({min_reso}) must be at most the resolution ({min(resolution)}); "
                          f"lower min_bucket_reso")
    if max_reso < max(resolution):
        raise BucketError(f"max_bucket_reso ({max_reso}) must be at least the resolution ({max(resolution)}); "
                          f"raise max_bucket_reso")


def make_bucket_resolutions(resolution: Size, min_size: int = 256, max_size: int = 1024,
                            divisible: int = 64) -> List[Size]:
    """The predefined buckets: the square of the training area, then for each width from
    ``min_size`` to ``max_size`` the tallest height that keeps the area within it (both orientations).

    Example:
        >>> [b for b in make_bucket_resolutions((512, 512), 256, 1024, 64) if b[0] <= 384]
        [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 768), (384, 640)]
    """
    max_area = resolution[0] * resolution[1]
    side = int(math.sqrt(max_area) // divisible) * divisible
    resos = {(side, side)}
    for width in range(min_size, max_size + 1, divisible):
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
    return sorted(resos)


def _round_to_steps(x: float, steps: int) -> int:
    x = int(x + 0.5)
    return x - x % steps


def _shrink_to_area(width: int, height: int, max_area: int, steps: int) -> Size:
    """sd-scripts' no-upscale size for an image larger than the area: keep the aspect ratio and
    round the side whose rounding changes the ratio least to ``steps``."""
    ar = width / height
    w = math.sqrt(max_area * ar)
    h = max_area / w
    bw = _round_to_steps(w, steps)
    bh_for_w = _round_to_steps(bw / ar, steps)
    bh = _round_to_steps(h, steps)
    bw_for_h = _round_to_steps(bh * ar, steps)
    if abs(bw / max(bh_for_w, 1) - ar) < abs(bw_for_h / max(bh, 1) - ar):
        return bw, int(bw / ar + 0.5)
    return int(bh * ar + 0.5), bh


def select_bucket(width: int, height: int, buckets: Optional[List[Size]], resolution: Size,
                  steps: int = 64) -> Tuple[Size, Size]:
    """(bucket, resized size) of one image, as ``BucketManager.select_bucket``.

    With ``buckets`` (upscaling allowed) the image takes the bucket of nearest aspect ratio and is
    scaled to cover it. With ``buckets=None`` (``bucket_no_upscale``) it is only shrunk, to fit the
    training area, and its bucket is its own size rounded down to ``steps``.
    """
    ar = width / height
    if buckets is not None:
        if (width, height) in buckets:
            reso = (width, height)
        else:
            reso = min(buckets, key=lambda b: abs(b[0] / b[1] - ar))
        scale = reso[1] / height if ar > reso[0] / reso[1] else reso[0] / width
        return reso, (int(width * scale + 0.5), int(height * scale + 0.5))
    max_area = resolution[0] * resolution[1]
    resized = _shrink_to_area(width, height, max_area, steps) if width * height > max_area else (width, height)
    reso = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
    if min(reso) < steps:
        raise BucketError(f"an image of {width}x{height} is smaller than bucket_reso_steps ({steps}) on one side "
                          f"with bucket_no_upscale; remove it or turn bucket_no_upscale off")
    return reso, resized


def bucket_counts(buckets: Iterable[Size]) -> List[Tuple[Size, int]]:
    """[(bucket, images)] sorted by bucket, e.g. [((96, 160), 2), ((128, 128), 5)]."""
    return sorted(Counter(buckets).items())


def format_bucket_table(rows: List[Tuple[str, Size, int]]) -> str:
    """A text table of (dataset label, bucket, count) rows for the node's output."""
    lines = ["bucket (w x h)   images (x repeats)"]
    for label, (w, h), n in rows:
        lines.append(f"{label}{w:>5} x {h:<5}   {n}")
    return "\n".join(lines)
