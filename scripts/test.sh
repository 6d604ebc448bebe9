#!/usr/bin/env bash
# Install what the tests need (first run: a few minutes), then run the whole suite on the CPU.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k lora -x`.
# COMFYUI_DIR=/path/to/ComfyUI runs it against that checkout, in its own venv (scripts/setup.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/host_env.sh"
bash "$ROOT/scripts/setup.sh"
# Chromium for the browser test (tests/test_browser.py); a no-op once installed.
bash "$ROOT/scripts/setup_browser.sh"
# Run from tests/ (its pytest.ini makes it the rootdir): the repository root is the ComfyUI pack
# package itself, and pytest must not try to import its __init__.py as a test package.
cd "$ROOT/tests"
exec "$VENV/bin/python" -m pytest "$@"
