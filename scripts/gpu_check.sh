#!/usr/bin/env bash
# GPU check (one CUDA GPU, nothing from the internet, < 8 min on an H200): SD3.5-Large- and
# SD3.5-Medium-shaped random models at 1024 px, ours vs the host's TrainLoraNode mechanism,
# with and without blocks_to_swap, and capped at 24 GB. `--dry-run` checks it on the CPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/host_env.sh"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$VENV/bin/python" benchmarks/gpu_check.py "$@"
