"""API-format training prompts for a real server, written node by node: every widget starts at the
default the server's /object_info gives it (as a node freshly placed in the editor), links are
``(node id, output slot)``. Used by the server-driven bad-input and kill tests."""
import copy
import json
import urllib.request

from headless.convert import map_widget_values

# Tiny and fast: 64 px, rank 4, a high learning rate that shows learning in few steps.
TINY_SETTINGS = dict(network_dim=4, network_alpha=4.0, learning_rate=1e-3, mixed_precision="no", seed=42)


class Prompt(dict):
    """``{node id: {"class_type", "inputs"}}``; :meth:`node` adds one and returns the prompt."""

    def __init__(self, object_info: dict):
        super().__init__()
        self.info = object_info

    def node(self, node_id: str, class_type: str, **inputs) -> "Prompt":
        values = map_widget_values({"widgets_values": []}, self.info[class_type])
        values.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in inputs.items()})
        self[node_id] = {"class_type": class_type, "inputs": values}
        return self

    def set(self, node_id: str, **inputs) -> "Prompt":
        """Change inputs of an existing node (a copy of the prompt is usually what a case wants)."""
        self[node_id]["inputs"].update({k: (list(v) if isinstance(v, tuple) else v) for k, v in inputs.items()})
        return self

    def copy(self) -> "Prompt":
        twin = Prompt(self.info)
        twin.update(copy.deepcopy(dict(self)))
        return twin


def train_prompt(object_info: dict, ckpt: str, output_name: str, steps: int = 2, folder: str = "tiny_dataset",
                 prefix: str = "", **settings) -> Prompt:
    """Checkpoint -> image folder (64 px) -> settings -> train -> save (float). Node ids are
    ``prefix`` + ckpt, data, settings, train, save; a different prefix is a different session."""
    ids = {k: f"{prefix}{k}" for k in ("ckpt", "data", "settings", "train", "save")}
    return (Prompt(object_info)
            .node(ids["ckpt"], "CheckpointLoaderSimple", ckpt_name=ckpt)
            .node(ids["data"], "SD3LoraImageFolder", folder=folder, resolution=64, caption_extension=".txt")
            .node(ids["settings"], "SD3LoraSettings", **dict(TINY_SETTINGS, **settings))
            .node(ids["train"], "SD3LoraTrain", model=(ids["ckpt"], 0), clip=(ids["ckpt"], 1), vae=(ids["ckpt"], 2),
                  dataset=(ids["data"], 0), settings=(ids["settings"], 0), steps=steps)
            .node(ids["save"], "SD3LoraSave", lora=(ids["train"], 1), output_name=output_name, save_precision="float"))


def answers(url: str) -> bool:
    """Whether the server answers GET /system_stats with its ComfyUI version."""
    with urllib.request.urlopen(url.rstrip("/") + "/system_stats", timeout=30) as response:
        return "comfyui_version" in json.load(response).get("system", {})
