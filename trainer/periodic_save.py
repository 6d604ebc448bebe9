"""sd-scripts' ``save_every_n_steps`` / ``save_last_n_steps``: LoRA files written during training."""
from __future__ import annotations

import re
from pathlib import Path
from typing import List


def step_file_name(output_name: str, step: int) -> str:
    """sd-scripts' name of a mid-training save.

    Example:
        >>> step_file_name("my_lora", 500)
        'my_lora-step00000500.safetensors'
    """
    return f"{output_name}-step{step:08d}.safetensors"


def is_due(step: int, every: int) -> bool:
    """Whether ``step`` is a save step (every > 0 and step a multiple of it)."""
    return every > 0 and step % every == 0


def prune_step_files(folder: str | Path, output_name: str, current_step: int, keep_last_n_steps: int) -> List[Path]:
    """Delete the step saves of ``output_name`` older than ``keep_last_n_steps`` steps before
    ``current_step`` (sd-scripts' save_last_n_steps; 0 keeps all). Returns the removed paths.

    Example:
        >>> prune_step_files("loras", "my_lora", 1000, 300)  # removes -step00000600 and older
    """
    if keep_last_n_steps <= 0:
        return []
    pattern = re.compile(re.escape(output_name) + r"-step(\d{8})\.safetensors$")
    removed = []
    for path in Path(folder).glob(f"{output_name}-step*.safetensors"):
        match = pattern.match(path.name)
        if match and int(match.group(1)) <= current_step - keep_last_n_steps:
            path.unlink()
            removed.append(path)
    return sorted(removed)
