#!/usr/bin/env bash
# Evidence for sampling and evaluation with a trained generator (default: the 128-px run of
# evidence/run_quality_cpu.sh cpu128, trained on cxr_corpus train + JSRT train):
#   sampling    one grid per strategy on JSRT test images, the interpolation strip, an inpainting example and the
#               speed (evidence/evaluate_sampling.py) into $SAMPLING_OUT
#   evaluation  4 reconstruction-strategy samples per JSRT test film, scored against the real test films with the
#               JSRT train films as the same-source reference (`monai.bundle run evaluate`) into $EVALUATION_DIR
#   augmentation (only when named in STAGES) the first augmentation experiment (JSRT nodule and sex, 2 folds); the
#               full study is evidence/run_augmentation128.sh (docs/results/augmentation.md)
#   bash evidence/run_evaluation.sh                    (sampling + evaluation: about 35 min of one thread at 128 px)
#   WORK=runs/corpus_cpu64 SAMPLING_OUT=docs/results EVALUATION_DIR=docs/results/evaluation \
#       STAGES="sampling evaluation augmentation" bash evidence/run_evaluation.sh     (the 64-px rows)
# WORK (the generator's work dir), LABELLED (the JSRT train split: the same-source reference FD, the memorisation
# check and the augmentation experiment's labelled pool), TEST, THREADS and STAGES change the inputs.
{ # the whole script is read before it runs: editing it while a long run is under way cannot change that run
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${WORK:-runs/corpus_cpu128}
TAG=$(basename "$WORK"); TAG=${TAG#corpus_}
SAMPLING_OUT=${SAMPLING_OUT:-docs/results/sampling_$TAG}
EVALUATION_DIR=${EVALUATION_DIR:-docs/results/evaluation_$TAG}
STAGES=${STAGES:-sampling evaluation}
MODEL=(--work_dir "$WORK")   # the models describe themselves: only where they are
[ -z "${THREADS:-}" ] || MODEL+=(--torch_threads "$THREADS")
LABELLED=${LABELLED:-$WORK/lists/jsrt_train.csv}
TEST=${TEST:-$WORK/lists/jsrt_test.csv}
[ -f "$LABELLED" ] || $PY -m scripts.jsrt_datalist --split train --out "$LABELLED"
[ -f "$TEST" ] || $PY -m scripts.jsrt_datalist --split test --out "$TEST"
case " $STAGES " in *" sampling "*)
  SECONDS=0
  $PY -m evidence.evaluate_sampling --work_dir "$WORK" --test "$TEST" --masks "${DINO_DIFFUSION_DATA:?set DINO_DIFFUSION_DATA to the data folder (jsrt/; docs/data.md)}/jsrt/masks/left_lung" \
      --out "$SAMPLING_OUT" -- "${MODEL[@]}"
  echo "sampling_evidence $SECONDS" >> "$WORK/stage_seconds.txt";;
esac
case " $STAGES " in *" evaluation "*)
  SECONDS=0
  $PY -m monai.bundle run sample --config_file configs/inference.json "${MODEL[@]}" --input_dir "$TEST" \
      --num_inputs all --num_samples 4 --output_dir "$WORK/samples_test"
  $PY -m monai.bundle run evaluate --config_file configs/evaluate.json "${MODEL[@]}" \
      --generated_dir "$WORK/samples_test/manifest.csv" --real_dir "$TEST" --train_dir "$LABELLED" \
      --evaluation_dir "$EVALUATION_DIR"
  echo "evaluation $SECONDS" >> "$WORK/stage_seconds.txt";;
esac
case " $STAGES " in *" augmentation "*)
  SECONDS=0
  $PY -m scripts.augmentation_experiment --train "$LABELLED" --test "$TEST" --label nodule --sizes 10 50 150 \
      --arms real real+synthetic synthetic --ratios 1 3 --folds 2 --iterations 200 --out "$WORK/augmentation/nodule" --copy_to docs/results \
      -- "${MODEL[@]}" --num_inference_steps 20
  echo "augmentation_nodule $SECONDS" >> "$WORK/stage_seconds.txt"
  SECONDS=0
  $PY -m scripts.augmentation_experiment --train "$LABELLED" --test "$TEST" --label sex --positive M --sizes 10 50 \
      --arms real real+synthetic synthetic --ratios 3 --folds 2 --iterations 200 --out "$WORK/augmentation/sex" --copy_to docs/results \
      -- "${MODEL[@]}" --num_inference_steps 20
  echo "augmentation_sex $SECONDS" >> "$WORK/stage_seconds.txt";;
esac
exit
}
