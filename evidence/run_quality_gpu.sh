#!/usr/bin/env bash
# The generator at scale with a GPU profile (configs/profiles/gpu128.json by default): in-domain DINO, autoencoder,
# latent cache and diffusion UNet on the unlabelled cxr_corpus train split + JSRT train, each stage under a time
# budget (seconds; it stops at the next epoch end and exports) with model snapshots along the way, then
# evidence/evaluate_quality.py (curves over the snapshots and the targets on the corpus and JSRT test splits), as the
# CPU run does (evidence/run_quality_cpu.sh).
#   bash evidence/run_quality_gpu.sh            (WORK=runs/gpu128; about 25 min on one H100)
#   STAGES="train_dino train_autoencoder" bash evidence/run_quality_gpu.sh     (some stages only; the rest later)
#   DATA=folder with train.csv, test_corpus.csv, test_jsrt.csv  (default: written from $DINO_DIFFUSION_DATA, docs/data.md)
# Every stage resumes from its last epoch checkpoint and a finished stage is skipped, so the same command continues
# an interrupted run. Extra arguments are passed to every bundle command (e.g. --num_workers 4). torch.compile is
# off unless COMPILE=true: its compile time is a large part of a budget of minutes.
{ # the whole script is read before it runs: editing it while a long run is under way cannot change that run
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${WORK:-runs/gpu128}
PROFILE=${PROFILE:-configs/profiles/gpu128.json}
DATA=${DATA:-$WORK/lists}
RESULTS=${RESULTS:-docs/results/quality_gpu128}
STAGES=${STAGES:-train_dino train_autoencoder cache train_diffusion evaluate}
mkdir -p "$WORK"
[ -f "$DATA/train.csv" ] || $PY -m scripts.cxr_corpus_datalist --lists "$DATA"
DINO="$WORK/models/dino/teacher.safetensors"
TRAIN="['configs/train.json','$PROFILE']"
COMMON=(--work_dir "$WORK" --dataset_dir "$DATA/train.csv" --compile "${COMPILE:-false}" "$@")
stage() {  # stage NAME RUN_ID [overrides...]
  local name=$1 run_id=$2; shift 2
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  SECONDS=0
  $PY -m monai.bundle run "$run_id" --config_file "$TRAIN" "${COMMON[@]}" "$@" \
    >> "$WORK/$name.log" 2>&1 || { tail -30 "$WORK/$name.log"; exit 1; }
  echo "$name $SECONDS" | tee -a "$WORK/stage_seconds.txt"
}
stage train_dino train_dino --dino_epochs "${DINO_EPOCHS:-100}" --dino_max_seconds "${DINO_SECONDS:-270}"
stage train_autoencoder train_autoencoder --ae_epochs "${AE_EPOCHS:-100}" --ae_max_seconds "${AE_SECONDS:-300}" \
  --snapshot_every "${AE_SNAPSHOT_EVERY:-10}"
stage cache cache --dino_weights "$DINO"
stage train_diffusion train_diffusion --dino_weights "$DINO" --diffusion_epochs "${DIFFUSION_EPOCHS:-400}" \
  --diffusion_max_seconds "${DIFFUSION_SECONDS:-500}" --snapshot_every "${DIFFUSION_SNAPSHOT_EVERY:-25}"
case " $STAGES " in *" evaluate "*)
  SECONDS=0
  $PY -m evidence.evaluate_quality --work_dir "$WORK" --train "$DATA/train.csv" --test "jsrt=$DATA/test_jsrt.csv" \
    --test "corpus=$DATA/test_corpus.csv" --ae_batch_size "${AE_BATCH:-32}" --diffusion_batch_size "${DIFFUSION_BATCH:-64}" \
    --out "$RESULTS" > "$WORK/evaluate_quality.log" 2>&1 || { tail -30 "$WORK/evaluate_quality.log"; exit 1; }
  echo "evaluate_quality $SECONDS" | tee -a "$WORK/stage_seconds.txt" ;;
esac
exit
}
