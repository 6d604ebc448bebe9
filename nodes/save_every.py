"""Save-every node: LoRA files written during training (sd-scripts' save_every_n_steps)."""
from __future__ import annotations

import os

from ..trainer.lora_file import SAVE_DTYPES, build_metadata, save_lora
from ..trainer.periodic_save import is_due, prune_step_files, step_file_name
from ..trainer.state import kohya_tensors
from . import checks
from .common import CATEGORY, SAVE_EVERY
from .names import SAVE_TO, check_output, plain_name, save_folder


class SD3LoraSaveEvery:
    """Options for saving ``<output_name>-stepNNNNNNNN.safetensors`` while the train node runs."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "output_name": ("STRING", {"default": "sd3_lora", "tooltip": "Name stem of the step files, no folders "
                                       "(--output_name)."}),
            "save_every_n_steps": ("INT", {"default": 500, "min": 1, "max": 1_000_000, "tooltip":
                                   "Write the LoRA every N steps (--save_every_n_steps)."}),
            "save_last_n_steps": ("INT", {"default": 0, "min": 0, "max": 10_000_000, "tooltip": "Delete step files "
                                  "older than this many steps; 0 keeps all (--save_last_n_steps)."}),
            "save_to": (list(SAVE_TO), {"default": "loras", "tooltip": "Folder of the step files."}),
            "save_precision": (list(SAVE_DTYPES), {"default": "fp16", "tooltip": "--save_precision"}),
        }}

    RETURN_TYPES = (SAVE_EVERY,)
    RETURN_NAMES = ("save_every",)
    FUNCTION = "build"
    CATEGORY = CATEGORY
    DESCRIPTION = "Connect to the train node's save_every input to keep LoRA files from the middle of a run."

    @classmethod
    def VALIDATE_INPUTS(cls, output_name, save_to):
        return checks.report(cls, locals(), lambda: check_output(output_name, save_to))

    def build(self, output_name, save_to, **kwargs):
        save_folder(save_to)  # refuses an unknown folder
        return (dict(kwargs, output_name=plain_name(output_name, "output_name", "my_sd3_lora"), save_to=save_to),)


def save_if_due(options, session, step: int) -> None:
    """Called after each step: write the step file when due and prune the old ones."""
    if not options or not is_due(step, options["save_every_n_steps"]):
        return
    folder = save_folder(options["save_to"])
    name = options["output_name"]
    tensors = kohya_tensors(session.state)
    metadata = build_metadata(session.state.config, session.info, step, name)
    save_lora(os.path.join(folder, step_file_name(name, step)), tensors, metadata, SAVE_DTYPES[options["save_precision"]])
    prune_step_files(folder, name, step, options["save_last_n_steps"])
