#!/usr/bin/env bash
# Few-shot heads at 128 px, as the landmark paper measures them (docs/results/heads.md, section 128 px):
#   pretrain  the label-free image-space denoiser (configs/heads/pretrain.json) at 128 px on the 2,139 unlabelled
#             films of the generator (cxr_corpus train + JSRT train); resumable: run again to go on, a larger
#             DENOISER_EPOCHS continues a finished run
#   grid      landmark and segmentation heads fine-tuned on N = 1, 5, 10, 25, 50, 150 JSRT train films from each
#             initialisation (evidence/run_heads.py; results appended to $WORK/heads_results.jsonl, so it resumes)
#   report    tables and figures into docs/results/heads128
#   bash evidence/run_heads128.sh                       (all stages)
#   STAGES=pretrain THREADS=1 bash evidence/run_heads128.sh   (one stage, one thread beside another run)
# Settings: LIST (unlabelled datalist, default runs/corpus_cpu128/lists/train.csv, written by
# scripts/cxr_corpus_datalist.py), WORK (default runs/heads128), DENOISER_EPOCHS (default 20), GENERATOR (the
# 128-px generator's work dir, default runs/corpus_cpu128), THREADS.
{ # the whole script is read before it runs: editing it while a long run is under way cannot change that run
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${WORK:-runs/heads128}
LIST=${LIST:-runs/corpus_cpu128/lists/train.csv}
GENERATOR=${GENERATOR:-runs/corpus_cpu128}
STAGES=${STAGES:-pretrain grid report}
THREAD_ARGS=()
[ -z "${THREADS:-}" ] || THREAD_ARGS=(--torch_threads "$THREADS")
mkdir -p "$WORK"
[ -f "$LIST" ] || $PY -m scripts.cxr_corpus_datalist --lists "$(dirname "$LIST")"
DENOISER=(--image_size 128)
case " $STAGES " in *" pretrain "*)
  SECONDS=0
  $PY -m monai.bundle run training --config_file configs/heads/pretrain.json --dataset_dir "$LIST" \
      --work_dir "$WORK/pretrain" "${DENOISER[@]}" --denoiser_epochs "${DENOISER_EPOCHS:-20}" "${THREAD_ARGS[@]}" \
      >> "$WORK/pretrain.log" 2>&1 || { tail -30 "$WORK/pretrain.log"; exit 1; }
  echo "pretrain_denoiser $SECONDS" | tee -a "$WORK/stage_seconds.txt";;
esac
exit
}
