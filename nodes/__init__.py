"""ComfyUI node classes of this pack: thin adapters over ``trainer/``."""
from .dataset import SD3LoraDatasetConfig, SD3LoraImageFolder, SD3LoraImagesFromGraph
from .save import SD3LoraSave
from .save_every import SD3LoraSaveEvery
from .settings import SD3LoraAdvanced, SD3LoraNetworkArgs, SD3LoraOptimizer, SD3LoraSettings
from .train import SD3LoraTrain

NODE_CLASS_MAPPINGS = {
    "SD3LoraImageFolder": SD3LoraImageFolder,
    "SD3LoraDatasetConfig": SD3LoraDatasetConfig,
    "SD3LoraImagesFromGraph": SD3LoraImagesFromGraph,
    "SD3LoraSettings": SD3LoraSettings,
    "SD3LoraNetworkArgs": SD3LoraNetworkArgs,
    "SD3LoraOptimizer": SD3LoraOptimizer,
    "SD3LoraAdvanced": SD3LoraAdvanced,
    "SD3LoraTrain": SD3LoraTrain,
    "SD3LoraSave": SD3LoraSave,
    "SD3LoraSaveEvery": SD3LoraSaveEvery,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SD3LoraImageFolder": "SD3 LoRA Dataset (image folder)",
    "SD3LoraDatasetConfig": "SD3 LoRA Dataset (sd-scripts TOML)",
    "SD3LoraImagesFromGraph": "SD3 LoRA Dataset (images from graph)",
    "SD3LoraSettings": "SD3 LoRA Settings",
    "SD3LoraNetworkArgs": "SD3 LoRA Network Args",
    "SD3LoraOptimizer": "SD3 LoRA Optimizer",
    "SD3LoraAdvanced": "SD3 LoRA Advanced",
    "SD3LoraTrain": "SD3 LoRA Train",
    "SD3LoraSave": "SD3 LoRA Save",
    "SD3LoraSaveEvery": "SD3 LoRA Save Every",
}

# Watch, sample, plot, stop and continue (kept in one block so other node groups merge cleanly).
from . import live  # noqa: E402
from .loss_plot import SD3LoraLossPlot  # noqa: E402
from .samples import SD3LoraSampling  # noqa: E402
from .state_nodes import SD3LoraResume, SD3LoraSaveState  # noqa: E402

NODE_CLASS_MAPPINGS.update({
    "SD3LoraSampling": SD3LoraSampling,
    "SD3LoraLossPlot": SD3LoraLossPlot,
    "SD3LoraSaveState": SD3LoraSaveState,
    "SD3LoraResume": SD3LoraResume,
})
NODE_DISPLAY_NAME_MAPPINGS.update({
    "SD3LoraSampling": "SD3 LoRA Sampling",
    "SD3LoraLossPlot": "SD3 LoRA Loss Plot",
    "SD3LoraSaveState": "SD3 LoRA Save State",
    "SD3LoraResume": "SD3 LoRA Resume",
})
live.register_routes()  # GET /sd3lora/history for the editor's chart; a no-op without a server

# Errors on the node read "ValueError: ..." rather than this pack's module path (nodes/errors.py).
from .errors import install as _plain_errors  # noqa: E402

_plain_errors(NODE_CLASS_MAPPINGS)
