"""The real ComfyUI host in this process, and this pack as the package ``sd3_lora_trainer``.

For scripts and benchmarks that use the host's Python API without a server (the command-line
trainer, ``benchmarks/``); ``tests/conftest.py`` does the same for the tests. The host tree is
``$COMFYUI_DIR`` or the one ``scripts/setup.sh`` unpacks (``headless/hosts.py``). Standard library
only until :func:`setup_host` imports the host's argument module.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

from . import hosts

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "sd3_lora_trainer"


def register_pack() -> None:
    """Make ``sd3_lora_trainer.<module>`` importable: the repository folder is the package.

    The package's own ``__init__`` (the node registration) does not run: the trainer and the CLI
    are usable without importing ComfyUI; ``sd3_lora_trainer.nodes`` imports it when asked for.
    """
    if PACK_NAME in sys.modules:
        return
    pkg = types.ModuleType(PACK_NAME)
    pkg.__path__ = [str(REPO_ROOT)]
    sys.modules[PACK_NAME] = pkg


def add_host_to_path() -> Path:
    """Put the host tree first on sys.path (its nodes.py must win over the pack's nodes/ folder)."""
    host = hosts.host_dir()
    hosts.check_host_dir(host)
    if str(host) not in sys.path:
        sys.path.insert(0, str(host))
    return host


def setup_host(cpu: bool, pytorch_attention: bool = False) -> None:
    """Set the host's launch options that must precede ``comfy.model_management``'s import:
    ``cpu`` (a CPU-only torch asserts otherwise) and PyTorch attention (``--use-pytorch-cross-attention``)."""
    add_host_to_path()
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
    if pytorch_attention:
        comfy.cli_args.args.use_pytorch_cross_attention = True
