"""What the command line writes, with sd-scripts' names: ``<name>-stepNNNNNNNN.safetensors`` every
N steps, ``<name>-NNNNNN.safetensors`` every N epochs (not after the last), the state folders of
--save_state beside them, and at the end ``<name>.safetensors`` through the Save node (LoRA,
metadata, ``.loss.json``, ``.workflow.json``) and ``<name>.toml``, the run as a --config_file.

Only the process that writes files (rank 0) calls these.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..nodes.save import SD3LoraSave
from ..nodes.save_every import save_if_due
from ..trainer import checkpoint
from ..trainer import session as sessions
from ..trainer.lora_file import SAVE_DTYPES, build_metadata, save_lora
from ..trainer.periodic_save import is_due
from ..trainer.state import kohya_tensors
from .translate import Outputs

STATE_FILE = "state"  # the state pair inside a state folder: state.safetensors + state.json


def epoch_file_name(output_name: str, epoch: int) -> str:
    """sd-scripts' name of an epoch save.

    Example:
        >>> epoch_file_name("my_lora", 3)
        'my_lora-000003.safetensors'
    """
    return f"{output_name}-{epoch:06d}.safetensors"


def state_folder(output_dir: str, stem: str) -> Path:
    """The --save_state folder for a save named ``stem`` (e.g. my_lora-step00000500 -> ...-state)."""
    return Path(output_dir) / f"{stem}-state"


def resume_stem(path: str) -> Path:
    """The state to continue from: a --save_state folder, or the Save State node's files."""
    p = Path(path).expanduser()
    return p / STATE_FILE if p.is_dir() else checkpoint.state_stem(p)


class Saver:
    """Writes the run's files when they are due (:meth:`after_step`) and at the end (:meth:`final`).

    Args:
        outputs: the --save_* options. session: the trainer Session. steps_per_epoch, total_steps:
        where epochs end and the run stops. extra_pnginfo: {"workflow": ...} for the .workflow.json.
    """

    def __init__(self, outputs: Outputs, session: sessions.Session, steps_per_epoch: int, total_steps: int,
                 extra_pnginfo: Optional[dict] = None):
        self.o, self.session, self.per_epoch, self.total = outputs, session, steps_per_epoch, total_steps
        self.extra_pnginfo = extra_pnginfo
        os.makedirs(outputs.output_dir, exist_ok=True)

    def _state(self, stem: str) -> None:
        if self.o.save_state:
            folder = state_folder(self.o.output_dir, stem)
            checkpoint.save_state(folder / STATE_FILE, checkpoint.state_dict(self.session.state, self.session.info))

    def after_step(self, step: int) -> None:
        """Step and epoch files (and their states) due after ``step``."""
        o = self.o
        if is_due(step, o.every_n_steps):
            save_if_due({"save_every_n_steps": o.every_n_steps, "save_last_n_steps": o.last_n_steps,
                         "save_to": "output", "save_precision": o.save_precision, "output_name": o.output_name},
                        self.session, step)
            self._state(f"{o.output_name}-step{step:08d}")
        epoch, ended = divmod(step, self.per_epoch)
        if not ended and o.every_n_epochs and epoch % o.every_n_epochs == 0 and step < self.total:
            self._epoch_file(epoch, step)
            self._state(f"{o.output_name}-{epoch:06d}")

    def _epoch_file(self, epoch: int, step: int) -> None:
        o, state = self.o, self.session.state
        metadata = build_metadata(state.config, self.session.info, step, o.output_name)
        save_lora(os.path.join(o.output_dir, epoch_file_name(o.output_name, epoch)), kohya_tensors(state),
                  metadata, SAVE_DTYPES[o.save_precision])
        if o.last_n_epochs:
            old = epoch - o.every_n_epochs * o.last_n_epochs
            if old > 0:
                Path(o.output_dir, epoch_file_name(o.output_name, old)).unlink(missing_ok=True)

    def final(self) -> str:
        """The finished LoRA through the Save node (same files as a workflow's), and the last state."""
        snap = sessions.snapshot(self.session)
        path = SD3LoraSave().save(snap, self.o.output_name, "output", self.o.save_precision, self.o.diffusers_export,
                                  extra_pnginfo=self.extra_pnginfo)["result"][0]
        self._state(self.o.output_name)
        return path
