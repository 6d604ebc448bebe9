"""Import the real ComfyUI host (CPU mode) and this pack as the package ``sd3_lora_trainer``.

Call :func:`setup` before importing anything from ``comfy`` or the pack. It mirrors what
``tests/conftest.py`` does: the host tree from ``scripts/setup.sh`` goes on ``sys.path`` (``$COMFYUI_DIR`` when
set, see ``headless/hosts.py``) and a symlink under ``.cache/pkg`` gives the repository a stable
package name.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO_ROOT))  # appended: the pack's nodes/ must not shadow the host's nodes.py
from headless import hosts  # noqa: E402

HOST_DIR = hosts.host_dir()
PACK_NAME = "sd3_lora_trainer"


def setup(cpu: bool = True) -> None:
    """Put the host and the pack on sys.path; ``cpu`` forces the host's CPU mode (needed with a CPU torch)."""
    hosts.check_host_dir(HOST_DIR)
    pkg_dir = REPO_ROOT / ".cache" / "pkg"
    pkg_dir.mkdir(parents=True, exist_ok=True)
    if not (pkg_dir / PACK_NAME).exists():
        (pkg_dir / PACK_NAME).symlink_to(REPO_ROOT, target_is_directory=True)
    for p in (str(HOST_DIR), str(pkg_dir)):
        if p not in sys.path:
            sys.path.insert(0, p)
    import comfy.cli_args

    # Must be set before comfy.model_management is imported: a CPU torch asserts otherwise.
    comfy.cli_args.args.cpu = cpu
    _register_pack_without_nodes()


def _register_pack_without_nodes() -> None:
    """Make ``sd3_lora_trainer.trainer`` importable without running the pack's ``__init__``.

    The benchmarks only need the trainer (pure PyTorch); skipping the node registration keeps
    them independent of the node layer. The package is the real repository folder, not a stand-in.
    """
    if PACK_NAME in sys.modules:
        return
    pkg = types.ModuleType(PACK_NAME)
    pkg.__path__ = [str(REPO_ROOT)]
    sys.modules[PACK_NAME] = pkg
