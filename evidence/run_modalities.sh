#!/usr/bin/env bash
# Small CT and MRI runs on the public volumes of docs/data.md (2D slices, CPU profile, 64 px): the head CT in the brain window and
# the brain T1 MRI, each trained on its own slices with a seeded random DINO, then the closing report (samples
# beside the real slices whose embeddings conditioned them, and their evaluation). One volume per modality shows
# that the path works and what the slices look like; it cannot show generalisation to other patients.
#   bash evidence/run_modalities.sh      (WORK=runs/modalities; about 25 min on two CPU cores)
{ # the whole script is read before it runs: editing it while a long run is under way cannot change that run
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${WORK:-runs/modalities}
DATA=${DATA:-${DINO_DIFFUSION_DATA:?set DINO_DIFFUSION_DATA to the data folder (ct/, mri/; docs/data.md)}}
mkdir -p "$WORK"
run() {  # NAME MODALITY VOLUME SETTINGS
  local name=$1 modality=$2 volume=$3 settings=$4
  echo "image" > "$WORK/$name.csv"
  realpath "$volume" >> "$WORK/$name.csv"
  SECONDS=0
  $PY -m monai.bundle run training --config_file configs/train.json --profile cpu64 --amp bf16 --modality "$modality" \
    --modality_settings "$settings" --dataset_dir "$WORK/$name.csv" --work_dir "$WORK/$name" --dino_weights random \
    --ae_epochs "${AE_EPOCHS:-40}" --diffusion_epochs "${DIFFUSION_EPOCHS:-300}" --report_count 16 \
    > "$WORK/$name.log" 2>&1
  echo "$name $SECONDS" | tee -a "$WORK/stage_seconds.txt"
}
run head_ct ct "$DATA/ct/head_ct.nii.gz" "{'window': 'brain'}"
run brain_t1 mri "$DATA/mri/brain_t1_ch2.nii.gz" "{}"
exit
}
