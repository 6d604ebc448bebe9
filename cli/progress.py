"""What the command line shows and logs: a terminal progress bar (loss, it/s, ETA), the host's
progress (caching) on a bar of its own, and TensorBoard event files with --log_with tensorboard."""
from __future__ import annotations

import os
import time
from typing import Optional

from tqdm import tqdm


class StepBar:
    """The training steps' bar: step/total, it/s and ETA (tqdm's), the loss and learning rate."""

    def __init__(self, first_step: int, total_steps: int, enabled: bool = True):
        self.bar = tqdm(total=total_steps, initial=first_step, desc="steps", unit="step", dynamic_ncols=True,
                        disable=not enabled)

    def update(self, loss: float, lr: float) -> None:
        self.bar.set_postfix_str(f"loss {loss:.4f}, lr {lr:.3g}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class HostProgress:
    """A hook for the host's ``comfy.utils.ProgressBar`` (the caching pass uses it): one tqdm bar
    per pass, closed when it reaches its total."""

    def __init__(self, label: str = "caching"):
        self.label, self.bar = label, None

    def __call__(self, value, total, preview=None, node_id=None) -> None:
        if self.bar is None or self.bar.total != total or value < self.bar.n:
            self.close()
            self.bar = tqdm(total=total, desc=self.label, unit="item", dynamic_ncols=True, leave=False)
        self.bar.update(value - self.bar.n)
        if value >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TensorBoardLog:
    """sd-scripts' TensorBoard layout: ``<logging_dir>/<log_prefix><YYYYmmddHHMMSS>/network_train``
    with ``loss/current``, ``loss/average`` and ``lr/unet`` per step."""

    def __init__(self, logging_dir: str, log_prefix: str = ""):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("--log_with tensorboard needs the tensorboard package: pip install tensorboard") from e
        self.folder = os.path.join(logging_dir, log_prefix + time.strftime("%Y%m%d%H%M%S", time.localtime()),
                                   "network_train")
        self.writer = SummaryWriter(self.folder)
        self.total, self.count = 0.0, 0

    def step(self, step: int, loss: float, lr: float) -> None:
        self.total, self.count = self.total + loss, self.count + 1
        self.writer.add_scalar("loss/current", loss, step)
        self.writer.add_scalar("loss/average", self.total / self.count, step)
        self.writer.add_scalar("lr/unet", lr, step)

    def close(self) -> None:
        self.writer.close()


def open_log(logging_dir: Optional[str], log_with: Optional[str], log_prefix: str) -> Optional[TensorBoardLog]:
    """The TensorBoard log the arguments ask for, or None."""
    return TensorBoardLog(logging_dir, log_prefix) if log_with == "tensorboard" and logging_dir else None
