#!/usr/bin/env bash
# Heads evidence: pre-train the image-space denoiser on the JSRT train split without labels, then fine-tune
# landmark and segmentation heads on the first N labelled training images, pre-trained vs from scratch,
# scored on the test split (docs/results/heads.{json,png}).   bash scripts/run_heads.sh   (~40 min, 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${WORK:-runs/heads}
mkdir -p "$WORK"
$PY scripts/jsrt_datalist.py --split train --out "$WORK/train.csv"
$PY scripts/jsrt_datalist.py --split test --out "$WORK/test.csv"
SECONDS=0
$PY -m monai.bundle run training --config_file configs/heads/pretrain.json --dataset_dir "$WORK/train.csv" \
    --work_dir "$WORK" --image_size 64 --denoiser_channels "[16,32,64]" --denoiser_head_channels 16 \
    --denoiser_epochs "${DENOISER_EPOCHS:-60}" > "$WORK/pretrain.log" 2>&1
echo "pretrain_denoiser $SECONDS" > "$WORK/stage_seconds.txt"
SECONDS=0
$PY scripts/run_heads.py --train "$WORK/train.csv" --test "$WORK/test.csv" --work "$WORK" \
    --denoiser "$WORK/models/heads/denoiser.pt" --sizes ${SIZES:-1 5 10 50} --seeds ${SEEDS:-0} \
    --iterations "${ITERATIONS:-400}" --lr 1e-3 --out docs/results -- --image_size 64 --denoiser_channels "[16,32,64]" --denoiser_head_channels 16 > "$WORK/heads.log" 2>&1
echo "heads $SECONDS" >> "$WORK/stage_seconds.txt"
