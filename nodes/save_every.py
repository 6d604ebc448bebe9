"""Save-every node: LoRA files, and with save_state the training state, written during training
(sd-scripts' save_every_n_steps, save_last_n_steps and save_state)."""
from __future__ import annotations

import os

from ..trainer import checkpoint
from ..trainer.lora_file import SAVE_DTYPES, build_metadata, save_lora
from ..trainer.periodic_save import STATE_SUFFIXES, is_due, prune_step_files, step_file_name, step_stem
from ..trainer.state import kohya_tensors
from . import checks
from .common import CATEGORY, SAVE_EVERY
from .names import SAVE_TO, check_folder_writable, check_output, plain_name, save_folder, states_folder


class SD3LoraSaveEvery:
    """Options for saving ``<output_name>-stepNNNNNNNN.safetensors`` (and with ``save_state`` the
    state ``output/sd3_lora_states/<output_name>-stepNNNNNNNN``) while the train node runs."""

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
        }, "optional": {
            "save_state": ("BOOLEAN", {"default": False, "tooltip": "Also write the whole training state with each "
                           "step file, as output/sd3_lora_states/<output_name>-stepNNNNNNNN: after a crash, 'SD3 "
                           "LoRA Resume' with state_name <output_name> continues from the newest (--save_state)."}),
        }}

    RETURN_TYPES = (SAVE_EVERY,)
    RETURN_NAMES = ("save_every",)
    FUNCTION = "build"
    CATEGORY = CATEGORY
    DESCRIPTION = "Connect to the train node's save_every input to keep LoRA files from the middle of a run."

    @classmethod
    def VALIDATE_INPUTS(cls, output_name, save_to, save_state=False):
        return checks.report(cls, locals(), lambda: check_output(output_name, save_to),
                             lambda: save_state and check_folder_writable(states_folder()))

    def build(self, output_name, save_to, **kwargs):
        save_folder(save_to)  # refuses an unknown folder
        return (dict(kwargs, output_name=plain_name(output_name, "output_name", "my_sd3_lora"), save_to=save_to),)


def save_if_due(options, session, step: int) -> None:
    """Called after each step: write the step file (and state) when due and prune the old ones.

    The state is taken here, inside the step loop, after everything the step did (samples and
    validation included): resuming from it continues exactly as the uninterrupted run.
    """
    if not options or not is_due(step, options["save_every_n_steps"]):
        return
    folder, name, keep = save_folder(options["save_to"]), options["output_name"], options["save_last_n_steps"]
    if options.get("save_state"):
        stem = os.path.join(states_folder(), step_stem(name, step))
        checkpoint.save_state(stem, checkpoint.state_dict(session.state, session.info))
    tensors = kohya_tensors(session.state)
    metadata = build_metadata(session.state.config, session.info, step, name)
    save_lora(os.path.join(folder, step_file_name(name, step)), tensors, metadata, SAVE_DTYPES[options["save_precision"]])
    prune_step_files(folder, name, step, keep)
    if options.get("save_state"):
        prune_step_files(states_folder(), name, step, keep, STATE_SUFFIXES)
