#!/usr/bin/env bash
# Foundation evidence: train the whole pipeline on the JSRT train split at 64 px on the CPU, timing each
# stage, then evaluate on the test split and write docs/results/foundation.{md,json} and figures.
#   bash evidence/run_foundation.sh            (WORK=runs/foundation by default; ~40 min on 2 CPU cores)
# WORK, OUT (report folder, docs/results by default), AE_EPOCHS and DIFFUSION_EPOCHS can be set in the environment.
# Settings: the CPU profile (configs/profiles/cpu64.json) with a seeded random DINO (no hub weights offline).
{ # the whole script is read before it runs: editing it while a long run is under way cannot change that run
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${WORK:-runs/foundation}
OUT=${OUT:-docs/results}
mkdir -p "$WORK"
$PY -m scripts.jsrt_datalist --split train --out "$WORK/train.csv"
$PY -m scripts.jsrt_datalist --split test --out "$WORK/test.csv"
CONFIG="['configs/train.json','configs/profiles/cpu64.json']"
ARGS=(--dataset_dir "$WORK/train.csv" --work_dir "$WORK" --dino_weights random
      --ae_epochs "${AE_EPOCHS:-40}" --diffusion_epochs "${DIFFUSION_EPOCHS:-300}")
: > "$WORK/stage_seconds.txt"
for stage in train_autoencoder cache train_diffusion; do
  SECONDS=0
  $PY -m monai.bundle run "$stage" --config_file "$CONFIG" "${ARGS[@]}" > "$WORK/$stage.log" 2>&1
  echo "$stage $SECONDS" >> "$WORK/stage_seconds.txt"
done
$PY -m evidence.evaluate_foundation --work_dir "$WORK" --test "$WORK/test.csv" --out "$OUT"
$PY -m evidence.benchmark --profile cpu64 --stages diffusion diffusion_reencode --work_dir "$WORK" --out "$OUT/cache_benchmark" -- "${ARGS[@]}"
exit
}
