#!/usr/bin/env bash
# The generator at scale on a CPU profile (configs/profiles/<profile>.json, bf16 where the CPU has bf16 instructions):
# in-domain DINO, autoencoder, latent cache and diffusion UNet on the unlabelled cxr_corpus train split + JSRT train,
# with a model snapshot every few epochs, then evidence/evaluate_quality.py (curves over the snapshots and the
# targets on the corpus and JSRT test splits). Every stage resumes (training from its last epoch checkpoint, the guidance
# and evaluation stages from the variants and sample sets already made): after an interruption, run the same command
# again and it goes on where it stopped (a finished stage is skipped).
#   bash evidence/run_quality_cpu.sh            (profile cpu64, WORK=runs/corpus_cpu64; about 3 h on two CPU cores)
#   bash evidence/run_quality_cpu.sh cpu128     (WORK=runs/corpus_cpu128; about 8-10 h on two CPU cores)
#   DATA=folder with train.csv, test_corpus.csv, test_jsrt.csv  (default: written by scripts/cxr_corpus_datalist.py)
#   DINO_WEIGHTS=a DINO teacher file to condition on instead of training one (e.g. the cpu64 run's, which cpu128 shares)
#   THREADS=torch threads per stage (default: all cores); any further --key value is a bundle override.
#   CURVE_EVERY=K: the evaluation's diffusion curve samples the snapshots of every K-th epoch only (and the final model)
#   STAGES="train_dino train_autoencoder cache train_diffusion guidance evaluate" (the default): some stages only. DINO and
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
STAGES=${STAGES:-train_dino train_autoencoder cache train_diffusion guidance evaluate}
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
# guidance: the classifier-free guidance scale of the evaluation, chosen on validation films only (every third of the 132
# cxr_corpus val films, and the 20 of JSRT val): the scale of GUIDANCE_SCALES whose samples have the lowest mean of FD / reference FD
# over DINO space and pixels (evidence/report_variants.py); then FEWER_STEPS (default 10) sampler steps at that scale,
# kept when their mean ratio is within 2% of the config's steps (the synthetic films of the augmentation grid use them);
# written to $WORK/guidance.json (guidance_scale, num_inference_steps), reused when there
case " $STAGES " in *" guidance "*)
  if [ ! -f "$WORK/guidance.json" ]; then
    SECONDS=0
    if [ ! -f "$DATA/val.csv" ]; then
      $PY -m scripts.cxr_corpus_datalist --split val --out "$DATA/val_corpus.csv" > /dev/null
      $PY -m scripts.jsrt_datalist --split val --out "$DATA/val_jsrt.csv" > /dev/null
      { echo image; awk -F, 'NR > 1 && (NR - 2) % 3 == 0 { print $1 }' "$DATA/val_corpus.csv"; tail -n +2 "$DATA/val_jsrt.csv" | cut -d, -f1; } \
        > "$DATA/.val.csv" && mv "$DATA/.val.csv" "$DATA/val.csv"
    fi
    variants() {  # variants --variant SETTINGS ...: rows appended to $WORK/guidance/variants.jsonl (measured ones kept)
      $PY -m evidence.report_variants --work_dir "$WORK" --real "$DATA/val.csv" --train "$DATA/train.csv" --count 64 \
        "$@" --out "$WORK/guidance" ${THREADS:+--torch_threads "$THREADS"} >> "$WORK/guidance.log" 2>&1 \
        || { tail -30 "$WORK/guidance.log"; exit 1; }
    }
    choose() {  # choose SCALES [STEPS]: the best scale (and, given STEPS, the steps to sample with) from the rows
      $PY -m evidence.guidance_choice --work_dir "$WORK" --scales "$1" ${2:+--fewer_steps "$2"}
    }
    VARIANTS=(); for g in ${GUIDANCE_SCALES:-1 1.5 2 3}; do VARIANTS+=(--variant "guidance_scale=$g"); done
    variants "${VARIANTS[@]}"
    best=$(choose "${GUIDANCE_SCALES:-1 1.5 2 3}")
    variants --variant "guidance_scale=$best,num_inference_steps=${FEWER_STEPS:-10}"
    choose "${GUIDANCE_SCALES:-1 1.5 2 3}" "${FEWER_STEPS:-10}"
    echo "guidance $SECONDS" | tee -a "$WORK/stage_seconds.txt"
  fi;;
esac
GUIDANCE=()
[ -f "$WORK/guidance.json" ] && GUIDANCE=(--guidance_scale "$($PY -c 'import json,sys; print(json.load(open(sys.argv[1]))["guidance_scale"])' "$WORK/guidance.json")")
case " $STAGES " in *" evaluate "*)
  SECONDS=0
  $PY -m evidence.evaluate_quality --work_dir "$WORK" --train "$DATA/train.csv" --test "jsrt=$DATA/test_jsrt.csv" \
    --test "corpus=$DATA/test_corpus.csv" --profile "$PROFILE" --out "${OUT:-docs/results/quality_$PROFILE}" "${GUIDANCE[@]}" \
    --curve_every "${CURVE_EVERY:-1}" ${THREADS:+--torch_threads "$THREADS"} $([ "$PROFILE" = cpu128 ] && echo --target_psnr 31 --target_fd_ratio 1.5) \
    > "$WORK/evaluate_quality.log" 2>&1
  echo "evaluate_quality $SECONDS" | tee -a "$WORK/stage_seconds.txt";;
esac
exit
}
