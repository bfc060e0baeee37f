#!/usr/bin/env bash
# The generator at scale with a GPU profile (configs/profiles/gpu128.json by default): in-domain DINO, autoencoder,
# latent cache and diffusion UNet on the unlabelled cxr_corpus train split + JSRT train, each stage under a time
# budget (seconds; it stops at the next epoch end and exports), then reconstruction-strategy samples for the corpus
# and JSRT test splits and their evaluation against test (FD with a train-vs-test reference, memorisation,
# autoencoder PSNR/MS-SSIM).
#   bash scripts/run_quality_gpu.sh            (WORK=runs/gpu128; about 25 min on one H100)
#   DATA=folder with train.csv, test_corpus.csv, test_jsrt.csv  (default: written from ../shared/data)
# Extra arguments are passed to every bundle command (e.g. --num_workers 4). Sampling and evaluation read the
# settings from the trained models' records.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${WORK:-runs/gpu128}
PROFILE=${PROFILE:-configs/profiles/gpu128.json}
DATA=${DATA:-$WORK/lists}
mkdir -p "$WORK"
[ -f "$DATA/train.csv" ] || $PY scripts/cxr_corpus_datalist.py --lists "$DATA"
DINO="$WORK/models/dino/teacher.safetensors"
TRAIN="['configs/train.json','$PROFILE']"
COMMON=(--work_dir "$WORK" --dataset_dir "$DATA/train.csv" "$@")
stage() {  # stage NAME CONFIG RUN_ID [overrides...]
  local name=$1 config=$2 run_id=$3; shift 3
  SECONDS=0
  $PY -m monai.bundle run "$run_id" --config_file "$config" "${COMMON[@]}" "$@" \
    > "$WORK/$name.log" 2>&1 || { tail -30 "$WORK/$name.log"; exit 1; }
  echo "$name $SECONDS" | tee -a "$WORK/stage_seconds.txt"
}
stage train_dino "$TRAIN" train_dino --dino_epochs "${DINO_EPOCHS:-100}" --dino_max_seconds "${DINO_SECONDS:-270}"
stage train_autoencoder "$TRAIN" train_autoencoder --ae_epochs "${AE_EPOCHS:-100}" --ae_max_seconds "${AE_SECONDS:-300}"
stage cache "$TRAIN" cache --dino_weights "$DINO"
stage train_diffusion "$TRAIN" train_diffusion --dino_weights "$DINO" --diffusion_epochs "${DIFFUSION_EPOCHS:-400}" \
  --diffusion_max_seconds "${DIFFUSION_SECONDS:-500}"
for test in corpus jsrt; do
  stage "sample_$test" configs/inference.json sample --input_dir "$DATA/test_$test.csv" --num_inputs all \
    --num_samples 1 --sample_batch_size 64 --label_columns "['source', 'label']" --output_dir "$WORK/samples_$test"
  stage "evaluate_$test" configs/evaluate.json evaluate --generated_dir "$WORK/samples_$test/manifest.csv" \
    --real_dir "$DATA/test_$test.csv" --train_dir "$DATA/train.csv" --evaluation_dir "$WORK/evaluation_$test"
done
