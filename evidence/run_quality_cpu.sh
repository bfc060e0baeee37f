#!/usr/bin/env bash
# The generator at scale on a CPU profile (configs/profiles/<profile>.json, bf16 where the CPU has bf16 instructions):
# in-domain DINO, autoencoder, latent cache and diffusion UNet on the unlabelled cxr_corpus train split + JSRT train,
# with a model snapshot every few epochs, then evidence/evaluate_quality.py (curves over the snapshots and the
# targets on the corpus and JSRT test splits). Every stage resumes from its last epoch checkpoint: after an
# interruption, run the same command again and it goes on where it stopped (a finished stage is skipped).
#   bash evidence/run_quality_cpu.sh            (profile cpu64, WORK=runs/corpus_cpu64; about 3 h on two CPU cores)
#   bash evidence/run_quality_cpu.sh cpu128     (WORK=runs/corpus_cpu128; about 12 h on two CPU cores)
#   DATA=folder with train.csv, test_corpus.csv, test_jsrt.csv  (default: written by scripts/cxr_corpus_datalist.py)
#   DINO_WEIGHTS=a DINO teacher file to condition on instead of training one (e.g. the cpu64 run's, which cpu128 shares)
#   THREADS=torch threads per stage (default: all cores); any further --key value is a bundle override.
#   STAGES="train_dino train_autoencoder cache train_diffusion evaluate" (the default): some stages only. DINO and
#   the autoencoder need nothing of each other: on two cores, THREADS=1 STAGES=train_dino and THREADS=1
#   STAGES=train_autoencoder side by side, then the command without STAGES for the rest.
# cpu64: settings chosen by the pilots of docs/results/quality.md, given here; cpu128: the profile's own settings
# (its pilots: section 128 px). Environment variables below override either.
{ # the whole script is read before it runs: editing it while a long run is under way cannot change that run
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=cpu64
if [ $# -gt 0 ] && [[ $1 != --* ]]; then PROFILE=$1; shift; fi
if [ "$PROFILE" = cpu64 ]; then
  : "${LATENT_CHANNELS:=4}" "${AE_LR:=0.0005}" "${DINO_EPOCHS:=16}" "${AE_EPOCHS:=30}" "${DIFFUSION_EPOCHS:=100}"
fi
PY=${PYTHON:-.venv/bin/python}
WORK=${WORK:-runs/corpus_$PROFILE}
DATA=${DATA:-$WORK/lists}
mkdir -p "$WORK"
[ -f "$DATA/train.csv" ] || $PY -m scripts.cxr_corpus_datalist --lists "$DATA"
opt() {  # opt KEY VALUE: '--KEY VALUE' when VALUE is set
  [ -z "${2:-}" ] || printf -- '--%s\n%s\n' "$1" "$2"
}
mapfile -t SETTINGS < <(opt latent_channels "${LATENT_CHANNELS:-}"; opt ae_lr "${AE_LR:-}"; opt torch_threads "${THREADS:-}")
COMMON=(--config_file configs/train.json --profile "$PROFILE" --work_dir "$WORK" --dataset_dir "$DATA/train.csv"
        --amp "${AMP:-auto}" "${SETTINGS[@]}" "$@")
STAGES=${STAGES:-train_dino train_autoencoder cache train_diffusion evaluate}
stage() {  # stage NAME RUN_ID [overrides...]
  local name=$1 run_id=$2; shift 2
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  SECONDS=0
  $PY -m monai.bundle run "$run_id" "${COMMON[@]}" "$@" >> "$WORK/$name.log" 2>&1 || { tail -30 "$WORK/$name.log"; exit 1; }
  echo "$name $SECONDS" | tee -a "$WORK/stage_seconds.txt"
}
DINO=${DINO_WEIGHTS:-$WORK/models/dino/teacher.safetensors}
if [ -z "${DINO_WEIGHTS:-}" ]; then
  mapfile -t EPOCHS < <(opt dino_epochs "${DINO_EPOCHS:-}")
  stage train_dino train_dino "${EPOCHS[@]}"
fi
mapfile -t EPOCHS < <(opt ae_epochs "${AE_EPOCHS:-}")
stage train_autoencoder train_autoencoder "${EPOCHS[@]}" --snapshot_every "${AE_SNAPSHOT_EVERY:-5}"
stage cache cache --dino_weights "$DINO"
mapfile -t EPOCHS < <(opt diffusion_epochs "${DIFFUSION_EPOCHS:-}")
stage train_diffusion train_diffusion --dino_weights "$DINO" "${EPOCHS[@]}" --snapshot_every "${DIFFUSION_SNAPSHOT_EVERY:-10}"
case " $STAGES " in *" evaluate "*)
  SECONDS=0
  $PY -m evidence.evaluate_quality --work_dir "$WORK" --train "$DATA/train.csv" --test "jsrt=$DATA/test_jsrt.csv" \
    --test "corpus=$DATA/test_corpus.csv" --out "${OUT:-docs/results/quality_$PROFILE}" > "$WORK/evaluate_quality.log" 2>&1
  echo "evaluate_quality $SECONDS" | tee -a "$WORK/stage_seconds.txt";;
esac
exit
}
