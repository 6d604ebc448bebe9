"""``python -m headless WORKFLOW.json [--set NODE.input=value ...] [--url URL | --base-dir DIR]``
from the repository root: the same command as ``scripts/run_workflow.py`` (one implementation)."""
import runpy
import sys
from pathlib import Path

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "run_workflow.py"

if __name__ == "__main__":
    sys.exit(runpy.run_path(str(_SCRIPT), run_name="run_workflow")["main"]())
