"""Which ComfyUI source tree the scripts and tests run against, and the venv that goes with it.

``COMFYUI_DIR`` (an environment variable) names a ComfyUI checkout; unset, the tree that
``scripts/setup.sh`` unpacks from the package index (ComfyUI 0.3.75) is used. Each host gets a
venv of its own, keyed by its version: ``.venv/`` for the default, ``.venv-<version>/`` for a
``COMFYUI_DIR`` host (its torch and requirements differ).

Standard library only: ``scripts/*.sh`` run this file with any ``python3`` before a venv exists::

    python3 headless/hosts.py        # prints four lines: host folder, version, venv folder,
                                     # and "default" or "custom"
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_HOST_DIR = REPO_ROOT / ".host" / "ComfyUI"
DEFAULT_HOST_VERSION = "0.3.75"
ENV_VAR = "COMFYUI_DIR"


def host_dir() -> Path:
    """The ComfyUI tree in use: ``$COMFYUI_DIR`` when set, else the default tree under ``.host/``."""
    chosen = os.environ.get(ENV_VAR)
    return Path(chosen).expanduser().resolve() if chosen else DEFAULT_HOST_DIR


def is_default(path: Path) -> bool:
    """True for the tree that set-up unpacks itself (``.host/ComfyUI``)."""
    return Path(path).resolve() == DEFAULT_HOST_DIR.resolve()


def host_version(path: Path) -> str:
    """The version in the tree's ``comfyui_version.py`` (``"unknown"`` when it has none)."""
    try:
        text = (Path(path) / "comfyui_version.py").read_text()
    except OSError:
        return DEFAULT_HOST_VERSION if is_default(path) else "unknown"
    found = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", text)
    return found.group(1) if found else "unknown"


def venv_dir(path: Path) -> Path:
    """The venv for that tree: ``.venv`` for the default host, ``.venv-<version>`` otherwise."""
    return REPO_ROOT / ".venv" if is_default(path) else REPO_ROOT / f".venv-{host_version(path)}"


def host_python(path: Path) -> Path:
    """The interpreter of that tree's venv when set-up has built it, else this interpreter."""
    python = venv_dir(path) / "bin" / "python"
    return python if python.exists() else Path(sys.executable)


def check_host_dir(path: Path) -> None:
    """Raise SystemExit with the fix when ``path`` is not a ComfyUI tree."""
    if not (Path(path) / "main.py").is_file():
        where = f"{ENV_VAR}={os.environ[ENV_VAR]}" if os.environ.get(ENV_VAR) else str(path)
        fix = ("point COMFYUI_DIR at a ComfyUI checkout (the folder with main.py)" if os.environ.get(ENV_VAR)
               else "run `bash scripts/setup.sh` first")
        raise SystemExit(f"no ComfyUI main.py in {where}: {fix}")


if __name__ == "__main__":
    chosen = host_dir()
    print(chosen, host_version(chosen), venv_dir(chosen), "default" if is_default(chosen) else "custom", sep="\n")
