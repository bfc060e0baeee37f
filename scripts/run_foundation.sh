#!/usr/bin/env bash
# Foundation evidence: train the whole pipeline on the JSRT train split at 64 px on the CPU, timing each
# stage, then evaluate on the test split and write docs/results/foundation.{md,json} and figures.
#   bash scripts/run_foundation.sh            (WORK=runs/foundation by default; ~40 min on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${WORK:-runs/foundation}
mkdir -p "$WORK"
$PY scripts/jsrt_datalist.py --split train --out "$WORK/train.csv"
$PY scripts/jsrt_datalist.py --split test --out "$WORK/test.csv"
ARGS=(--dataset_dir "$WORK/train.csv" --work_dir "$WORK" --image_size 64
      --autoencoder_channels "[32,64,64]" --unet_channels "[64,128,128]" --unet_res_blocks 1 --unet_head_channels 32
      --dino_weights random --ae_epochs "${AE_EPOCHS:-40}" --diffusion_epochs "${DIFFUSION_EPOCHS:-300}"
      --ae_batch_size 16 --diffusion_batch_size 32 --preview_interval 50)
: > "$WORK/stage_seconds.txt"
for stage in train_autoencoder cache train_diffusion; do
  SECONDS=0
  $PY -m monai.bundle run "$stage" --config_file configs/train.json "${ARGS[@]}" > "$WORK/$stage.log" 2>&1
  echo "$stage $SECONDS" >> "$WORK/stage_seconds.txt"
done
$PY scripts/evaluate_foundation.py --work_dir "$WORK" --test "$WORK/test.csv" --out docs/results -- "${ARGS[@]}"
$PY scripts/benchmark_cache.py --out docs/results/cache_benchmark.json -- "${ARGS[@]}"
