"""Save node: write the LoRA in sd-scripts' layout with its metadata, and the loss history."""
from __future__ import annotations

import json
import os

from ..trainer.atomic_files import write_text
from ..trainer.diffusers_format import kohya_to_diffusers
from ..trainer.lora_file import SAVE_DTYPES, build_metadata, save_lora
from . import checks
from .common import CATEGORY, LORA
from .names import SAVE_TO, check_output, plain_name, save_folder
from .provenance import write_workflow_json
from .run_config import write_run_config


class SD3LoraSave:
    """Write ``<output_name>.safetensors`` (kohya names, ss_* / modelspec.* metadata) and
    ``<output_name>.loss.json`` into ComfyUI's ``models/loras`` or ``output`` folder."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora": (LORA, {"tooltip": "The LoRA from the train node."}),
            "output_name": ("STRING", {"default": "sd3_lora", "tooltip": "File name without extension, no "
                                       "folders (--output_name); an existing file of that name is replaced."}),
            "save_to": (list(SAVE_TO), {"default": "loras", "tooltip": "'loras' puts it where "
                        "'Load LoRA' finds it; 'output' into ComfyUI's output folder."}),
            "save_precision": (list(SAVE_DTYPES), {"default": "fp16", "tooltip": "dtype of the saved weights "
                               "(--save_precision)."}),
            "diffusers_export": ("BOOLEAN", {"default": False, "tooltip": "Also write <output_name>.diffusers"
                                 ".safetensors in diffusers/PEFT naming (to_q/to_k/to_v, alpha baked in) for "
                                 "diffusers' load_lora_weights."}),
        }, "hidden": {"extra_pnginfo": "EXTRA_PNGINFO", "prompt": "PROMPT", "unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = CATEGORY
    DESCRIPTION = "Saves the trained LoRA as a kohya-format .safetensors file."

    @classmethod
    def VALIDATE_INPUTS(cls, output_name, save_to):
        # At queue time: a bad name must not cost the training run before it.
        return checks.report(cls, locals(), lambda: check_output(output_name, save_to))

    def save(self, lora, output_name, save_to, save_precision, diffusers_export=False, extra_pnginfo=None,
             prompt=None, unique_id=None):
        name = plain_name(output_name, "output_name", "my_sd3_lora")
        folder = save_folder(save_to)
        path = os.path.join(folder, name + ".safetensors")
        metadata = build_metadata(lora.config, lora.info, lora.step, name)
        save_lora(path, lora.tensors, metadata, SAVE_DTYPES[save_precision])
        if diffusers_export:
            save_lora(os.path.join(folder, name + ".diffusers.safetensors"), kohya_to_diffusers(lora.tensors),
                      metadata, SAVE_DTYPES[save_precision])
        write_text(os.path.join(folder, name + ".loss.json"), json.dumps({"step": lora.step, "loss": lora.losses}))
        write_workflow_json(os.path.join(folder, name), extra_pnginfo)  # the workflow that trained it
        write_run_config(os.path.join(folder, name), lora, prompt, unique_id,  # the run as a --config_file
                         {"output_name": name, "save_precision": save_precision, "diffusers_export": diffusers_export})
        return {"ui": {"text": [path]}, "result": (path,)}
