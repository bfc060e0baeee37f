#!/usr/bin/env bash
# Heads evidence: pre-train the image-space denoiser without labels on the JSRT train split, and on the whole
# unlabelled set (cxr_corpus train + JSRT train, the generator's training list), then fine-tune landmark and
# segmentation heads on the first N labelled training images, pre-trained (either) vs from scratch (and the main
# pipeline's latent UNet as the pre-trained network), scored on the test split; then zero-shot lungs from
# self-attention. Outputs: docs/results/heads.{json,png}, heads_table.md, zero_shot.{json,png}.
#   bash evidence/run_heads.sh   (2 CPU cores alone: ~16 min JSRT pre-training, ~55 min on the whole set,
#                                1-2 min per fine-tuning run, 1 min zero-shot)
# Fine-tuning results are appended to runs/heads/heads_results.jsonl, so an interrupted run continues.
# The latent comparison and zero-shot latent rows need the generator of evidence/run_quality_cpu.sh (LATENT: another).
{ # the whole script is read before it runs: editing it while a long run is under way cannot change that run
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${WORK:-runs/heads}
mkdir -p "$WORK"
DENOISER=(--image_size 64 --denoiser_channels "[16,32,64]" --denoiser_head_channels 16)
LATENT=${LATENT:-'--work_dir runs/corpus_cpu64'}  # the generator at scale (evidence/run_quality_cpu.sh)
$PY -m scripts.jsrt_datalist --split train --out "$WORK/train.csv"
$PY -m scripts.jsrt_datalist --split test --out "$WORK/test.csv"
SECONDS=0
$PY -m monai.bundle run training --config_file configs/heads/pretrain.json --dataset_dir "$WORK/train.csv" \
    --work_dir "$WORK" "${DENOISER[@]}" --denoiser_epochs "${DENOISER_EPOCHS:-60}" > "$WORK/pretrain.log" 2>&1
echo "pretrain_denoiser $SECONDS" >> "$WORK/stage_seconds.txt"
# the whole unlabelled set: scripts/cxr_corpus_datalist.py --lists runs/corpus_cpu64/lists (run_quality_cpu.sh writes it)
LARGE_LIST=${LARGE_LIST:-runs/corpus_cpu64/lists/train.csv}
LARGE_WORK=${LARGE_WORK:-runs/heads_corpus}
SECONDS=0
$PY -m monai.bundle run training --config_file configs/heads/pretrain.json --dataset_dir "$LARGE_LIST" \
    --work_dir "$LARGE_WORK" "${DENOISER[@]}" --denoiser_epochs "${LARGE_EPOCHS:-15}" > "$WORK/pretrain_large.log" 2>&1
echo "pretrain_denoiser_large $SECONDS" >> "$WORK/stage_seconds.txt"
HEADS=(--train "$WORK/train.csv" --test "$WORK/test.csv" --work "$WORK" --denoiser "$WORK/models/heads/denoiser.pt"
       --denoiser_large "$LARGE_WORK/models/heads/denoiser.pt" --iterations "${ITERATIONS:-400}" --lr 1e-3)
INITS=(--inits pretrained pretrained_large scratch)
SECONDS=0
# seed 0 at every N, then more seeds where the fine-tuning is noisiest (small N)
$PY -m evidence.run_heads "${HEADS[@]}" "${INITS[@]}" --sizes 1 5 10 25 50 --seeds 0 --out "$WORK/out" -- "${DENOISER[@]}" \
    > "$WORK/heads.log" 2>&1
$PY -m evidence.run_heads "${HEADS[@]}" "${INITS[@]}" --sizes ${EXTRA_SIZES:-1 5 10 25} --seeds ${EXTRA_SEEDS:-1} --out "$WORK/out" \
    -- "${DENOISER[@]}" >> "$WORK/heads.log" 2>&1
echo "heads $SECONDS" >> "$WORK/stage_seconds.txt"
SECONDS=0
$PY -m evidence.run_heads "${HEADS[@]}" --sizes 5 25 --seeds 0 --inits latent --latent_args "$LATENT" --out "$WORK/out" \
    -- "${DENOISER[@]}" >> "$WORK/heads.log" 2>&1
echo "heads_latent $SECONDS" >> "$WORK/stage_seconds.txt"
# the report: every run above, read back from heads_results.jsonl
$PY -m evidence.run_heads "${HEADS[@]}" --sizes 1 5 10 25 50 --seeds 0 ${EXTRA_SEEDS:-1} --inits pretrained pretrained_large scratch latent \
    --latent_args "$LATENT" --report_only --out docs/results -- "${DENOISER[@]}" >> "$WORK/heads.log" 2>&1
SECONDS=0
$PY -m evidence.zero_shot_evidence --train "$WORK/train.csv" --test "$WORK/test.csv" --latent_args "$LATENT" \
    --denoiser_args "--work_dir $WORK ${DENOISER[*]}" --out docs/results > "$WORK/zero_shot.log" 2>&1
echo "zero_shot $SECONDS" >> "$WORK/stage_seconds.txt"
exit
}
