#!/usr/bin/env bash
# DINO evidence: pre-train a ViT on the JSRT train split on the CPU, then judge its frozen features
# against a random-init ViT of the same shape on the test split (docs/results/dino.json).
#   bash evidence/run_dino.sh          (WORK=runs/dino by default; ~25 min on 2 CPU cores)
# The DINO of the CPU profile (configs/profiles/cpu64.json): ViT-Tiny with 8-pixel patches at 64 pixels.
{ # the whole script is read before it runs: editing it while a long run is under way cannot change that run
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${WORK:-runs/dino}
mkdir -p "$WORK"
$PY -m scripts.jsrt_datalist --split train --out "$WORK/train.csv"
SECONDS=0
$PY -m monai.bundle run train_dino --config_file "['configs/train.json','configs/profiles/cpu64.json']" \
    --dataset_dir "$WORK/train.csv" --work_dir "$WORK" --dino_epochs "${EPOCHS:-100}" > "$WORK/train_dino.log" 2>&1
echo "train_dino $SECONDS" > "$WORK/stage_seconds.txt"
$PY -m evidence.evaluate_dino --weights "$WORK/models/dino/teacher.safetensors" --out docs/results/dino.json
exit
}
