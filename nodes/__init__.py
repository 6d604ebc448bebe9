"""ComfyUI node classes of this pack: thin adapters over ``trainer/``."""
from .dataset import SD3LoraImageFolder
from .save import SD3LoraSave
from .settings import SD3LoraAdvanced, SD3LoraNetworkArgs, SD3LoraOptimizer, SD3LoraSettings
from .train import SD3LoraTrain

NODE_CLASS_MAPPINGS = {
    "SD3LoraImageFolder": SD3LoraImageFolder,
    "SD3LoraSettings": SD3LoraSettings,
    "SD3LoraNetworkArgs": SD3LoraNetworkArgs,
    "SD3LoraOptimizer": SD3LoraOptimizer,
    "SD3LoraAdvanced": SD3LoraAdvanced,
    "SD3LoraTrain": SD3LoraTrain,
    "SD3LoraSave": SD3LoraSave,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SD3LoraImageFolder": "SD3 LoRA Dataset (image folder)",
    "SD3LoraSettings": "SD3 LoRA Settings",
    "SD3LoraNetworkArgs": "SD3 LoRA Network Args",
    "SD3LoraOptimizer": "SD3 LoRA Optimizer",
    "SD3LoraAdvanced": "SD3 LoRA Advanced",
    "SD3LoraTrain": "SD3 LoRA Train",
    "SD3LoraSave": "SD3 LoRA Save",
}
