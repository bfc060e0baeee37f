#!/usr/bin/env bash
# Evidence for sampling and evaluation with a trained generator (default: the long CPU run of
# evidence/run_quality_cpu.sh, trained on cxr_corpus train + JSRT train): one grid per strategy on JSRT test
# images, speed, generated-vs-real metrics on the JSRT test split, and the augmentation experiment for JSRT
# `nodule` and `sex`. Outputs: docs/results/sampling*.{json,png}, docs/results/evaluation*, docs/results/augmentation_*.
#   bash evidence/run_evaluation.sh   (~40 min on 2 CPU cores)
# WORK (the generator's work dir), LABELLED (the JSRT train split: the same-source reference FD, the memorisation
# check and the augmentation experiment's labelled pool) and TEST change the inputs.
{ # the whole script is read before it runs: editing it while a long run is under way cannot change that run
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${WORK:-runs/corpus_cpu64}
MODEL=(--work_dir "$WORK")   # the models describe themselves: only where they are
LABELLED=${LABELLED:-$WORK/lists/jsrt_train.csv}
TEST=${TEST:-$WORK/lists/jsrt_test.csv}
[ -f "$LABELLED" ] || $PY -m scripts.jsrt_datalist --split train --out "$LABELLED"
[ -f "$TEST" ] || $PY -m scripts.jsrt_datalist --split test --out "$TEST"
SECONDS=0
$PY -m evidence.evaluate_sampling --work_dir "$WORK" --test "$TEST" --masks "${DINO_DIFFUSION_DATA:?set DINO_DIFFUSION_DATA to the data folder (jsrt/; docs/data.md)}/jsrt/masks/left_lung" \
    --out docs/results -- "${MODEL[@]}"
echo "sampling_evidence $SECONDS" >> "$WORK/stage_seconds.txt"
SECONDS=0
$PY -m monai.bundle run sample --config_file configs/inference.json "${MODEL[@]}" --input_dir "$TEST" \
    --num_inputs all --num_samples 4 --output_dir "$WORK/samples_test"
$PY -m monai.bundle run evaluate --config_file configs/evaluate.json "${MODEL[@]}" \
    --generated_dir "$WORK/samples_test/manifest.csv" --real_dir "$TEST" --train_dir "$LABELLED" \
    --evaluation_dir docs/results/evaluation
echo "evaluation $SECONDS" >> "$WORK/stage_seconds.txt"
SECONDS=0
$PY -m scripts.augmentation_experiment --train "$LABELLED" --test "$TEST" --label nodule --sizes 10 50 150 \
    --arms real real+synthetic synthetic --ratios 1 3 --folds 2 --iterations 200 --out "$WORK/augmentation/nodule" --copy_to docs/results \
    -- "${MODEL[@]}" --num_inference_steps 20
echo "augmentation_nodule $SECONDS" >> "$WORK/stage_seconds.txt"
SECONDS=0
$PY -m scripts.augmentation_experiment --train "$LABELLED" --test "$TEST" --label sex --positive M --sizes 10 50 \
    --arms real real+synthetic synthetic --ratios 3 --folds 2 --iterations 200 --out "$WORK/augmentation/sex" --copy_to docs/results \
    -- "${MODEL[@]}" --num_inference_steps 20
echo "augmentation_sex $SECONDS" >> "$WORK/stage_seconds.txt"
exit
}
