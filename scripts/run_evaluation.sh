#!/usr/bin/env bash
# Evidence for sampling and evaluation with the DINO-conditioned generator (scripts/run_foundation_dino.sh):
# one grid per strategy, speed, generated-vs-real metrics on the JSRT test split, and the augmentation
# experiment for `nodule` and `sex`. Outputs: docs/results/sampling*.{json,png}, docs/results/evaluation*,
# docs/results/augmentation_*.   bash scripts/run_evaluation.sh   (~45 min on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${WORK:-runs/foundation_dino}
# the models describe themselves: only where they are
MODEL=(--work_dir "$WORK" --autoencoder_path runs/foundation/models/autoencoder.pt)
TRAIN=runs/foundation/train.csv
TEST=runs/foundation/test.csv
SECONDS=0
$PY scripts/evaluate_sampling.py --work_dir "$WORK" --test "$TEST" --masks ../shared/data/jsrt/masks/left_lung \
    --out docs/results -- "${MODEL[@]}"
echo "sampling_evidence $SECONDS" >> "$WORK/stage_seconds.txt"
SECONDS=0
$PY -m monai.bundle run sample --config_file configs/inference.json "${MODEL[@]}" --input_dir "$TEST" \
    --num_inputs all --num_samples 4 --output_dir "$WORK/samples_test"
$PY -m monai.bundle run evaluate --config_file configs/evaluate.json "${MODEL[@]}" \
    --generated_dir "$WORK/samples_test/manifest.csv" --real_dir "$TEST" --train_dir "$TRAIN" \
    --evaluation_dir docs/results/evaluation
echo "evaluation $SECONDS" >> "$WORK/stage_seconds.txt"
SECONDS=0
$PY scripts/augmentation_experiment.py --train "$TRAIN" --test "$TEST" --label nodule --sizes 10 50 150 \
    --ratios 0 1 3 --folds 2 --iterations 200 --out runs/augmentation/nodule --copy_to docs/results \
    -- "${MODEL[@]}" --num_inference_steps 20
echo "augmentation_nodule $SECONDS" >> "$WORK/stage_seconds.txt"
SECONDS=0
$PY scripts/augmentation_experiment.py --train "$TRAIN" --test "$TEST" --label sex --positive M --sizes 10 50 \
    --ratios 0 3 --folds 2 --iterations 200 --out runs/augmentation/sex --copy_to docs/results \
    -- "${MODEL[@]}" --num_inference_steps 20
echo "augmentation_sex $SECONDS" >> "$WORK/stage_seconds.txt"
