#!/usr/bin/env bash
# DINO evidence: pre-train a ViT on the JSRT train split on the CPU, then judge its frozen features
# against a random-init ViT of the same shape on the test split (docs/results/dino.json).
#   bash scripts/run_dino.sh          (WORK=runs/dino by default; ~25 min on 2 CPU cores)
# ViT-Tiny with 8-pixel patches at 64 pixels: the size the generator's images have in docs/results.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${WORK:-runs/dino}
MODEL=${MODEL:-vit_tiny_patch16_224}
KWARGS=${KWARGS:-"{'patch_size': 8}"}
SIZE=${SIZE:-64}
mkdir -p "$WORK"
$PY scripts/jsrt_datalist.py --split train --out "$WORK/train.csv"
SECONDS=0
$PY -m monai.bundle run training --config_file configs/train_dino.json --dataset_dir "$WORK/train.csv" \
    --work_dir "$WORK" --dino_model "$MODEL" --dino_kwargs "$KWARGS" --dino_input_size "$SIZE" \
    --dino_epochs "${EPOCHS:-100}" --dino_batch_size 32 --dino_lr 2e-3 --dino_koleo_weight 0.1 \
    > "$WORK/train_dino.log" 2>&1
echo "train_dino $SECONDS" > "$WORK/stage_seconds.txt"
$PY scripts/evaluate_dino.py --weights "$WORK/models/dino/teacher.safetensors" --model "$MODEL" \
    --kwargs "$(echo "$KWARGS" | tr "'" '"')" --input_size "$SIZE" --out docs/results/dino.json
