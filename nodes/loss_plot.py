"""Loss chart node: draw a training run's loss history (raw and smoothed) into an IMAGE."""
from __future__ import annotations

from typing import List, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from .common import CATEGORY, LOSS_MAP

RAW_COLOR, SMOOTH_COLOR, AXIS_COLOR, BACKGROUND = (150, 170, 210), (230, 90, 40), (90, 90, 90), (255, 255, 255)


def smooth(values: Sequence[float], weight: float) -> List[float]:
    """Exponential moving average with TensorBoard's bias correction (early points are not pulled
    towards 0); ``weight`` 0 returns the values, 0.99 is very smooth. The editor's chart does the same."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i) if weight > 0 else v)
    return out


def render_loss_chart(losses: Sequence[float], width: int = 768, height: int = 384,
                      smoothing: float = 0.9) -> Image.Image:
    """A line chart of ``losses`` by step (raw thin, smoothed thick) with min/max and step labels."""
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = 56, 12, width - 12, height - 24
    draw.rectangle([left, top, right, bottom], outline=AXIS_COLOR)
    if not losses:
        draw.text((left + 8, top + 8), "no loss recorded yet", fill=AXIS_COLOR)
        return img
    lo, hi = min(losses), max(losses)
    span = (hi - lo) or 1.0

    def point(i: int, v: float):
        x = left + (right - left) * (i / max(1, len(losses) - 1))
        return x, bottom - (bottom - top) * ((v - lo) / span)

    for series, color, w in ((losses, RAW_COLOR, 1), (smooth(losses, smoothing), SMOOTH_COLOR, 2)):
        pts = [point(i, v) for i, v in enumerate(series)]
        if len(pts) == 1:
            draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=color)
        else:
            draw.line(pts, fill=color, width=w)
    draw.text((4, top), f"{hi:.4g}", fill=AXIS_COLOR)
    draw.text((4, bottom - 10), f"{lo:.4g}", fill=AXIS_COLOR)
    draw.text((left, bottom + 6), "step 1", fill=AXIS_COLOR)
    draw.text((right - 70, bottom + 6), f"step {len(losses)}", fill=AXIS_COLOR)
    return img


def pil_to_image(img: Image.Image) -> torch.Tensor:
    """A PIL image as ComfyUI's IMAGE: float [1, H, W, 3] in 0..1."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]


class SD3LoraLossPlot:
    """Render a loss history (the train node's ``loss`` output) as an image, e.g. for SaveImage."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "loss": (LOSS_MAP, {"tooltip": "Loss history from 'SD3 LoRA Train' (or any LOSS_MAP {'loss': [...]})."}),
            "width": ("INT", {"default": 768, "min": 128, "max": 4096, "tooltip": "Image width in pixels."}),
            "height": ("INT", {"default": 384, "min": 96, "max": 4096, "tooltip": "Image height in pixels."}),
            "smoothing": ("FLOAT", {"default": 0.9, "min": 0.0, "max": 0.999, "step": 0.001,
                                    "tooltip": "Exponential smoothing of the thick line; 0 = raw values."}),
        }}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "plot"
    CATEGORY = CATEGORY
    DESCRIPTION = "Draws the loss history (raw and smoothed) into an image."

    def plot(self, loss, width, height, smoothing):
        values = loss.get("loss") if isinstance(loss, dict) else None
        if values is None:
            raise ValueError("the loss input must be a LOSS_MAP {'loss': [floats]}: connect the 'loss' output of "
                             "'SD3 LoRA Train'")
        return (pil_to_image(render_loss_chart([float(v) for v in values], width, height, smoothing)),)
