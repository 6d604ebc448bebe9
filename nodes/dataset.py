"""Dataset node: a folder of images with same-name .txt captions."""
from __future__ import annotations

import os

from ..trainer.data import FolderDataset, list_images, load_folder
from .common import CATEGORY, DATASET


class SD3LoraImageFolder:
    """Load every image of a folder, resized and center-cropped to ``resolution``."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "folder": ("STRING", {"default": "", "tooltip": "Folder of training images (png/jpg/webp), "
                                  "each with a same-name .txt caption. Absolute, or relative to ComfyUI's input folder."}),
            "resolution": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 16,
                                   "tooltip": "Training size in pixels; images are resized and center-cropped "
                                              "to resolution x resolution (a multiple of 16)."}),
            "caption_extension": ("STRING", {"default": ".txt", "tooltip": "Extension of the caption files."}),
        }}

    RETURN_TYPES = (DATASET,)
    RETURN_NAMES = ("dataset",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "A training dataset from a folder of captioned images."

    @classmethod
    def IS_CHANGED(cls, folder, resolution, caption_extension):
        # Re-run when files are added, removed or edited, not only when the inputs change.
        try:
            files = list_images(resolve_folder(folder))
        except ValueError:
            return float("nan")
        stamps = []
        for p in files:
            cap = p.with_suffix(caption_extension)
            stamps.append((p.name, p.stat().st_mtime_ns, cap.stat().st_mtime_ns if cap.exists() else 0))
        return str(stamps)

    def load(self, folder, resolution, caption_extension):
        path = resolve_folder(folder)
        return (FolderDataset(str(path), resolution, load_folder(path, resolution, caption_extension)),)


def resolve_folder(folder: str) -> str:
    """An absolute folder as given, or one relative to the host's input directory."""
    folder = os.path.expanduser(folder.strip())
    if folder and not os.path.isabs(folder):
        import folder_paths

        folder = os.path.join(folder_paths.get_input_directory(), folder)
    return folder
