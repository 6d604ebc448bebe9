"""sd-scripts' ``save_every_n_steps`` / ``save_last_n_steps``: LoRA files written during training."""
from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

STATE_SUFFIXES = (".safetensors", ".json")  # a training state's two files


def step_stem(output_name: str, step: int) -> str:
    """sd-scripts' name of a mid-training save, without its ending (``my_lora-step00000500``)."""
    return f"{output_name}-step{step:08d}"


def step_file_name(output_name: str, step: int) -> str:
    """sd-scripts' name of a mid-training save.

    Example:
        >>> step_file_name("my_lora", 500)
        'my_lora-step00000500.safetensors'
    """
    return step_stem(output_name, step) + ".safetensors"


def _step_files(folder: str | Path, output_name: str, suffixes: Sequence[str]) -> List[Tuple[int, Path]]:
    """(step, path) of every ``<output_name>-stepNNNNNNNN<suffix>`` file in ``folder`` (read, not
    globbed: a name may hold glob characters)."""
    pattern = re.compile(re.escape(output_name) + r"-step(\d{8})(" + "|".join(map(re.escape, suffixes)) + r")$")
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [(int(m.group(1)), p) for p in folder.iterdir() if (m := pattern.match(p.name))]


def is_due(step: int, every: int) -> bool:
    """Whether ``step`` is a save step (every > 0 and step a multiple of it)."""
    return every > 0 and step % every == 0


def prune_step_files(folder: str | Path, output_name: str, current_step: int, keep_last_n_steps: int,
                     suffixes: Sequence[str] = (".safetensors",)) -> List[Path]:
    """Delete the step saves of ``output_name`` older than ``keep_last_n_steps`` steps before
    ``current_step`` (sd-scripts' save_last_n_steps; 0 keeps all). Returns the removed paths.
    ``suffixes``: the endings of one save (a training state has STATE_SUFFIXES).

    Example:
        >>> prune_step_files("loras", "my_lora", 1000, 300)  # removes -step00000600 and older
    """
    if keep_last_n_steps <= 0:
        return []
    removed = sorted(p for step, p in _step_files(folder, output_name, suffixes)
                     if step <= current_step - keep_last_n_steps)
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def newest_step_state(folder: str | Path, output_name: str) -> Optional[Tuple[int, Path]]:
    """(step, stem) of the newest complete periodic state of ``output_name`` in ``folder`` (both
    files present), or None.

    Example:
        >>> newest_step_state("output/sd3_lora_states", "my_lora")
        (1500, PosixPath('output/sd3_lora_states/my_lora-step00001500'))
    """
    complete = [(step, p.with_suffix("")) for step, p in _step_files(folder, output_name, (".json",))
                if p.with_suffix(".safetensors").is_file()]
    return max(complete, default=None)
