#!/usr/bin/env bash
# The generator at scale on the CPU profile (configs/profiles/cpu64.json, bf16 where the CPU has bf16 instructions):
# in-domain DINO, autoencoder, latent cache and diffusion UNet on the unlabelled cxr_corpus train split + JSRT train,
# with a model snapshot every few epochs, then scripts/evaluate_quality.py (curves over the snapshots and the
# targets on the corpus and JSRT test splits). Every stage resumes from its last epoch checkpoint: after an
# interruption, run the same command again and it goes on where it stopped (a finished stage is skipped).
#   bash scripts/run_quality_cpu.sh        (WORK=runs/corpus_cpu64; about 3 h on two CPU cores)
#   DATA=folder with train.csv, test_corpus.csv, test_jsrt.csv  (default: written from ../shared/data)
# Settings chosen by the pilots of docs/results/quality.md; override with the environment variables below.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${WORK:-runs/corpus_cpu64}
DATA=${DATA:-$WORK/lists}
AMP=${AMP:-bf16}
mkdir -p "$WORK"
[ -f "$DATA/train.csv" ] || $PY scripts/cxr_corpus_datalist.py --lists "$DATA"
DINO="$WORK/models/dino/teacher.safetensors"
COMMON=(--config_file configs/train.json --profile cpu64 --work_dir "$WORK" --dataset_dir "$DATA/train.csv" --amp "$AMP"
        --latent_channels "${LATENT_CHANNELS:-4}" --ae_lr "${AE_LR:-0.0005}" "$@")
stage() {  # stage NAME RUN_ID [overrides...]
  local name=$1 run_id=$2; shift 2
  SECONDS=0
  $PY -m monai.bundle run "$run_id" "${COMMON[@]}" "$@" >> "$WORK/$name.log" 2>&1 || { tail -30 "$WORK/$name.log"; exit 1; }
  echo "$name $SECONDS" | tee -a "$WORK/stage_seconds.txt"
}
stage train_dino train_dino --dino_epochs "${DINO_EPOCHS:-16}"
stage train_autoencoder train_autoencoder --ae_epochs "${AE_EPOCHS:-40}" --snapshot_every "${AE_SNAPSHOT_EVERY:-5}"
stage cache cache --dino_weights "$DINO"
stage train_diffusion train_diffusion --dino_weights "$DINO" --diffusion_epochs "${DIFFUSION_EPOCHS:-150}" \
  --snapshot_every "${DIFFUSION_SNAPSHOT_EVERY:-15}"
SECONDS=0
$PY scripts/evaluate_quality.py --work_dir "$WORK" --train "$DATA/train.csv" --test "jsrt=$DATA/test_jsrt.csv" \
  --test "corpus=$DATA/test_corpus.csv" --out "${OUT:-docs/results/quality_cpu64}" > "$WORK/evaluate_quality.log" 2>&1
echo "evaluate_quality $SECONDS" | tee -a "$WORK/stage_seconds.txt"
