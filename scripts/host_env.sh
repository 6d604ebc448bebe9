# Sourced by the other scripts: which ComfyUI they run against and the venv that goes with it.
# Sets HOST_DIR, HOST_VERSION, VENV and HOST_IS_DEFAULT (1 for the .host/ tree set-up unpacks), and
# exports COMFYUI_DIR=HOST_DIR so the Python side (tests, benchmarks, run_workflow.py) uses the same
# host. The mapping itself lives in headless/hosts.py (standard library; any python3 runs it).
ROOT="${ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
{ read -r HOST_DIR; read -r HOST_VERSION; read -r VENV; read -r kind; } < <(python3 "$ROOT/headless/hosts.py")
HOST_IS_DEFAULT=0
[ "$kind" = default ] && HOST_IS_DEFAULT=1
# The default tree may not be there yet (set-up fetches it; the scripts export COMFYUI_DIR to it
# before they call set-up); any other must be a ComfyUI checkout already.
if [ "$HOST_IS_DEFAULT" = 0 ] && [ ! -f "$HOST_DIR/main.py" ]; then
  echo "COMFYUI_DIR=$COMFYUI_DIR has no main.py: point it at a ComfyUI checkout (the folder with main.py)" >&2
  exit 2
fi
export COMFYUI_DIR="$HOST_DIR"
