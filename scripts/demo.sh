#!/usr/bin/env bash
# Train an SD3 LoRA end to end in a real, headless ComfyUI and preview it.
#
#   bash scripts/demo.sh                      # tiny generated SD3.5-Medium-shaped model + sample images
#   bash scripts/demo.sh --checkpoint PATH --dataset DIR [--steps N] [--resolution PX] [--out DIR]
#
# PATH: an SD3 / SD3.5 single-file checkpoint that includes its text encoders (e.g.
# sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors). DIR: a folder of images with same-name
# .txt captions (or kohya N_name repeat folders), or an sd-scripts dataset .toml file. Writes
# the LoRA, its loss history and a preview PNG made with the trained LoRA into the output folder
# it prints (default: demo_out/). COMFYUI_DIR=/path/to/ComfyUI runs it on that checkout (scripts/setup.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHECKPOINT="" DATASET="" STEPS="" RESOLUTION="" OUT="$ROOT/demo_out" EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --checkpoint) CHECKPOINT="$2"; shift 2 ;;
    --dataset) DATASET="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --resolution) RESOLUTION="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --set) EXTRA+=(--set "$2"); shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "demo.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

source "$ROOT/scripts/host_env.sh"
bash "$ROOT/scripts/setup.sh"
PY="$VENV/bin/python"
BASE="$ROOT/.cache/demo_base"
mkdir -p "$BASE/models/checkpoints" "$BASE/models/loras" "$BASE/input" "$BASE/output" "$BASE/custom_nodes" "$OUT"

if [ -z "$CHECKPOINT" ]; then
  # No model given: a tiny random SD3.5-Medium-shaped checkpoint and generated captioned images.
  ASSETS="$ROOT/.cache/demo_assets"
  "$PY" "$ROOT/scripts/make_demo_assets.py" --checkpoint "$ASSETS/sd3_demo_tiny.safetensors" --dataset "$ASSETS/dataset"
  CHECKPOINT="$ASSETS/sd3_demo_tiny.safetensors"
  [ -n "$DATASET" ] || DATASET="$ASSETS/dataset"
  # A random tiny model shows learning within 100 steps at a higher rate than real SD3 weights want.
  EXTRA=(--set "SD3LoraSettings.learning_rate=0.001" "${EXTRA[@]}")
fi
[ -f "$CHECKPOINT" ] || { echo "demo.sh: checkpoint not found: $CHECKPOINT" >&2; exit 2; }
if [ -f "$DATASET" ] && [[ "$DATASET" == *.toml ]]; then
  DATASET="$(cd "$(dirname "$DATASET")" && pwd)/$(basename "$DATASET")"  # the folder input takes a TOML too
elif [ -n "$DATASET" ] && [ -d "$DATASET" ]; then
  DATASET="$(cd "$DATASET" && pwd)"
else
  echo "demo.sh: --dataset must be a folder of images with .txt captions or a dataset .toml file" >&2; exit 2
fi
CKPT_NAME="$(basename "$CHECKPOINT")"
ln -sfn "$(cd "$(dirname "$CHECKPOINT")" && pwd)/$CKPT_NAME" "$BASE/models/checkpoints/$CKPT_NAME"
[ -z "$STEPS" ] || EXTRA+=(--set "SD3LoraTrain.steps=$STEPS")
[ -z "$RESOLUTION" ] || EXTRA+=(--set "SD3LoraImageFolder.resolution=$RESOLUTION" \
  --set "EmptySD3LatentImage.width=$RESOLUTION" --set "EmptySD3LatentImage.height=$RESOLUTION")

STAMP="$(date +%Y%m%d-%H%M%S)"
NAME="demo_lora_$STAMP"
"$PY" "$ROOT/scripts/run_workflow.py" "$ROOT/example_workflows/train_and_preview.json" --base-dir "$BASE" \
  --set "CheckpointLoaderSimple.ckpt_name=$CKPT_NAME" --set "SD3LoraImageFolder.folder=$DATASET" \
  --set "SD3LoraSave.output_name=$NAME" --set "SaveImage.filename_prefix=$NAME" "${EXTRA[@]}"

cp "$BASE/models/loras/$NAME.safetensors" "$BASE/models/loras/$NAME.loss.json" "$OUT/"
cp "$BASE/output/$NAME"_*.png "$OUT/"
echo
echo "demo output in $OUT:"
ls -1 "$OUT" | grep "$NAME" | sed 's/^/  /'
