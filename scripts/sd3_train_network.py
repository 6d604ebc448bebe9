#!/usr/bin/env python
"""Train an SD3 / SD3.5 LoRA from the command line, with sd-scripts' sd3_train_network.py arguments.

    python scripts/sd3_train_network.py --pretrained_model_name_or_path sd3.5_medium.safetensors \\
        --dataset_config my_sd3_dataset_config.toml --output_dir out --output_name my_sd3_lora ...
    torchrun --nproc_per_node 2 scripts/sd3_train_network.py ...          # several GPUs
    accelerate launch --num_processes 2 scripts/sd3_train_network.py ...  # the same, through accelerate

The models load in this process with the ComfyUI host's own loaders ($COMFYUI_DIR, or the tree
scripts/setup.sh unpacks); the logic is in the pack's cli/ package (see README, "Command line").
"""
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # appended: the host's nodes.py must win
from headless import in_process  # noqa: E402

in_process.add_host_to_path()
in_process.register_pack()
from sd3_lora_trainer.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
