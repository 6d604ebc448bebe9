"""Import the real ComfyUI host (CPU mode) and this pack as the package ``sd3_lora_trainer``.

Call :func:`setup` before importing anything from ``comfy`` or the pack. It mirrors what
``tests/conftest.py`` does; the work is done by ``headless/in_process.py`` (shared with the
command-line trainer).
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO_ROOT))  # appended: the pack's nodes/ must not shadow the host's nodes.py
from headless import hosts, in_process  # noqa: E402

HOST_DIR = hosts.host_dir()
PACK_NAME = in_process.PACK_NAME


def setup(cpu: bool = True) -> None:
    """Put the host and the pack on sys.path; ``cpu`` forces the host's CPU mode (needed with a CPU torch)."""
    in_process.setup_host(cpu)
    in_process.register_pack()
