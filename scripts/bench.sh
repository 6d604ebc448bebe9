#!/usr/bin/env bash
# Benchmarks (not part of the test suite; no timed assertions anywhere). Set-up on first run, then:
#   bash scripts/bench.sh              step time, memory and FLOP/s: ours vs the host's TrainLoraNode
#                                      mechanism vs diffusers+PEFT, depth 12, batch 1 and 2, interleaved
#   bash scripts/bench.sh --quick      the same at depth 8 with fewer rounds
#   bash scripts/bench.sh --profile    torch.profiler table of one step of ours (batch 1; --profile-dtype fp32|bf16)
#   bash scripts/bench.sh --memory     SD3.5-Medium-shaped model at 512 px: peak RSS vs its bf16 weights
# Other arguments go to the Python script (see --help). COMFYUI_DIR=/path/to/ComfyUI: that host.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/host_env.sh"
bash "$ROOT/scripts/setup.sh"
PY="$VENV/bin/python"
cd "$ROOT"
for arg in "$@"; do
  if [ "$arg" = "--memory" ]; then
    args=()
    for a in "$@"; do [ "$a" = "--memory" ] || args+=("$a"); done
    exec "$PY" benchmarks/bench_memory.py "${args[@]+"${args[@]}"}"
  fi
done
exec "$PY" benchmarks/bench_step.py "$@"
