#!/usr/bin/env bash
# Install what the tests need (first run: a few minutes), then run the whole suite on the CPU.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k lora -x`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest tests "$@"
