#!/usr/bin/env bash
# Few-shot heads at 128 px, as the landmark paper measures them (docs/results/heads.md, section 128 px):
#   pretrain  the label-free image-space denoiser (configs/heads/pretrain.json) at 128 px on the 2,139 unlabelled
#             films of the generator (cxr_corpus train + JSRT train); resumable: run again to go on, a larger
#             DENOISER_EPOCHS continues a finished run
#   tune      (only when named in STAGES) the fine-tuning learning rate at N = 5 and 50, on JSRT val only;
#             evidence/heads_tune.py writes the choice per initialisation and range of N to $TUNE_ROWS/recipe.json
#             (and .md), which the grid follows
#   grid      landmark and segmentation heads fine-tuned on N = 1, 5, 10, 25, 50, 150 JSRT train films from each
#             initialisation (evidence/run_heads.py; one row per finished run appended to $RESULTS, kept with the
#             results so that the grid resumes on any machine: a row is run again only if the weights it started from
#             changed, e.g. a denoiser pre-trained again;
#             a fine-tune killed on the way goes on from its checkpoint of every 25 iterations in $WORK/grid/checkpoints)
#   zero_shot zero-shot lungs from both 128-px UNets (evidence/zero_shot_evidence.py) into docs/results/zero_shot128
#   report    tables and figures into docs/results/heads128
#   bash evidence/run_heads128.sh                       (every stage but tune)
#   STAGES=pretrain THREADS=1 bash evidence/run_heads128.sh   (one stage, one thread beside another run)
# Settings: LIST (unlabelled datalist, default runs/corpus_cpu128/lists/train.csv, written by
# scripts/cxr_corpus_datalist.py), WORK (default runs/heads128), DENOISER_EPOCHS (default 12: 1,608 steps of batch 16, against
# 2,000 for the 64-px denoiser on the same films, as a 128-px step costs about 4x; a larger value continues), GENERATOR (the
# 128-px generator's work dir, default runs/corpus_cpu128), RESULTS (the grid's rows, default
# docs/results/heads128/heads_results.jsonl), FINE_TUNE_AMP (the grid's fine-tuning precision, default auto: bf16 where
# the CPU has it), TUNE_AMP (the tune stage's, default none: float32), THREADS.
{ # the whole script is read before it runs: editing it while a long run is under way cannot change that run
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${WORK:-runs/heads128}
LIST=${LIST:-runs/corpus_cpu128/lists/train.csv}
GENERATOR=${GENERATOR:-runs/corpus_cpu128}
STAGES=${STAGES:-pretrain grid zero_shot report}
THREAD_ARGS=()
[ -z "${THREADS:-}" ] || THREAD_ARGS=(--torch_threads "$THREADS")
mkdir -p "$WORK"
[ -f "$LIST" ] || $PY -m scripts.cxr_corpus_datalist --lists "$(dirname "$LIST")"
DENOISER=(--image_size 128)
case " $STAGES " in *" pretrain "*)
  SECONDS=0
  $PY -m monai.bundle run training --config_file configs/heads/pretrain.json --dataset_dir "$LIST" \
      --work_dir "$WORK/pretrain" "${DENOISER[@]}" --denoiser_epochs "${DENOISER_EPOCHS:-12}" "${THREAD_ARGS[@]}" \
      >> "$WORK/pretrain.log" 2>&1 || { tail -30 "$WORK/pretrain.log"; exit 1; }
  echo "pretrain_denoiser $SECONDS" | tee -a "$WORK/stage_seconds.txt";;
esac
DENOISER_FILE=$WORK/pretrain/models/heads/denoiser.pt
DINO=${DINO:-$GENERATOR/models/dino/teacher.safetensors}
$PY -m scripts.jsrt_datalist --split train --out "$WORK/train.csv" > /dev/null
$PY -m scripts.jsrt_datalist --split val --out "$WORK/val.csv" > /dev/null
$PY -m scripts.jsrt_datalist --split test --out "$WORK/test.csv" > /dev/null
# fine-tuning precision (run_heads keeps only rows of its own precision): the grid's FINE_TUNE_AMP, default auto (bf16
# where the CPU has it: a fine-tune 1.7x faster; one cell run both ways differed by +0.09 px, standard error 0.59,
# docs/results/heads.md); the tune stage's TUNE_AMP, default none (float32, the precision its rows on record were
# made in; it only chooses the learning rate). The pre-trained weights live in the work folder, so on another machine
# every pre-trained row is made again anyway; float32 everywhere would keep only the scratch rows portable, at about
# 8 core-hours more for the grid.
COMMON=(--train "$WORK/train.csv" --denoiser "$DENOISER_FILE" --dino_weights "$DINO" --latent_args "--work_dir $GENERATOR")
# Budget (measured: a 128-px landmark step of batch 8 takes 6.4 s in float32 on one thread beside one other job, on a
# CPU without bf16 instructions; a fine-tune is 400 steps of batch min(8, N)): about 6 min at N = 1, 27 at N = 5 and
# 45 from N = 8 up. The full ~100-run grid (about 60 core-hours) is cut to 38 runs, about 22 core-hours, which with the
# 8 core-hours of pre-training is about 15 hours of the two cores, against the ~12 planned for the study: landmarks
# from the pre-trained denoiser, scratch and the DINO ViT at every N, seed 0; the generator's latent UNet at N = 5, 25
# and 150; segmentation diffusion against scratch at N = 5 and 150, and the other pre-training (the DINO ViT) at
# N = 5, 25 and 150; seeds 1 and 2 (other draws) at N = 5 for diffusion and scratch;
# segmentation diffusion against scratch at N = 25 (the blind set's middle N); seeds 1 and 2 at N = 25 (last, so a
# cut run loses only those). A DINO ViT fine-tune took 138-1,013 s where the UNet's took 469-3,324 s (N = 1 to 50,
# in float32). The tune stage (learning rates 1e-3 and 3e-4 at 400 iterations, N = 5 and 50, JSRT val) is not
# in the default STAGES: its first pass chose 1e-3 everywhere, which head_recipe already holds (docs/results/heads.md).
# tune: the learning rate per N range (iterations x learning rate), chosen on JSRT val (20 films), seed 0; its rows and
# choice are kept with the results (TUNE_ROWS, default docs/results/heads128/tune), so another machine goes on from them
TUNE_ROWS=${TUNE_ROWS:-docs/results/heads128/tune}
case " $STAGES " in *" tune "*)
  SECONDS=0
  for it in ${TUNE_ITERATIONS:-400}; do for lr in ${TUNE_LRS:-0.001 0.0003}; do
    $PY -m evidence.run_heads "${COMMON[@]}" --amp "${TUNE_AMP:-none}" --test "$WORK/val.csv" --iterations "$it" --lr "$lr" --tasks landmarks \
        --inits ${TUNE_INITS:-pretrained scratch} --sizes ${TUNE_SIZES:-5 50} --seeds 0 \
        --work "$WORK/tune/it${it}_lr${lr}" --results "$TUNE_ROWS/it${it}_lr${lr}/heads_results.jsonl" \
        --out "$WORK/tune/it${it}_lr${lr}" -- "${DENOISER[@]}" "${THREAD_ARGS[@]}" \
        >> "$WORK/tune.log" 2>&1 || { tail -30 "$WORK/tune.log"; exit 1; }
  done; done
  echo "tune $SECONDS" | tee -a "$WORK/stage_seconds.txt";;
esac
# the tune stage's choice per initialisation and range of N, and the heads' head_recipe (evidence/heads_tune.py)
RECIPE=$TUNE_ROWS/recipe.json
case " $STAGES " in *" tune "*|*" grid "*)
  if [ -z "${LR_SMALL:-}${LR_LARGE:-}" ] && ls "$TUNE_ROWS"/*/heads_results.jsonl > /dev/null 2>&1; then
    $PY -m evidence.heads_tune "$TUNE_ROWS"/*/ --out "$RECIPE" >> "$WORK/tune.log" 2>&1 \
        || { tail -30 "$WORK/tune.log"; exit 1; }
  fi;;
esac
# grid: every initialisation on JSRT test, each with the tune stage's setting (iterations, learning rate) for its range
# of N (N <= 10, N >= 25): its own where it was tuned, else the recipe's; LR_SMALL / LR_LARGE (and ITERATIONS) override
GRID=("${COMMON[@]}" --amp "${FINE_TUNE_AMP:-auto}" --test "$WORK/test.csv" --draws random --work "$WORK/grid" --out "$WORK/grid"
      --results "${RESULTS:-docs/results/heads128/heads_results.jsonl}")
# the seed-0 heads at N = 5, 25 and 150 predict the blind JSRT films (docs/results/blind/heads/<init>_n<N>/)
BLIND_JSRT=${BLIND:-${DINO_DIFFUSION_DATA:-}/blind}/jsrt/images
[ -d "$BLIND_JSRT" ] && GRID+=(--blind_dir "$BLIND_JSRT" --blind_sizes 5 25 150)
tuned() {  # init, N, lr|iterations: the override, else the tune stage's choice, else the 64-px setting
  local given
  if [ "$3" = lr ]; then given=$([ "$2" -le 10 ] && echo "${LR_SMALL:-}" || echo "${LR_LARGE:-}"); else given=${ITERATIONS:-}; fi
  if [ -n "$given" ]; then echo "$given"
  elif [ -f "$RECIPE" ]; then $PY -m evidence.heads_tune --out "$RECIPE" --get "$1" "$2" "$3"
  elif [ "$3" = lr ]; then echo 0.001; else echo 400; fi
}
grid() {  # task, inits, sizes, seeds: each initialisation and range of N with its own setting
  local init n sizes
  for init in $2; do for range in small large; do
    sizes=()
    for n in $3; do if { [ "$range" = small ] && [ "$n" -le 10 ]; } || { [ "$range" = large ] && [ "$n" -gt 10 ]; }; then sizes+=("$n"); fi; done
    [ ${#sizes[@]} -eq 0 ] && continue
    $PY -m evidence.run_heads "${GRID[@]}" --tasks "$1" --inits "$init" --sizes "${sizes[@]}" --seeds $4 \
        --lr "$(tuned "$init" "${sizes[0]}" lr)" --iterations "$(tuned "$init" "${sizes[0]}" iterations)" \
        -- "${DENOISER[@]}" "${THREAD_ARGS[@]}" >> "$WORK/grid.log" 2>&1 || { tail -30 "$WORK/grid.log"; exit 1; }
  done; done
}
# the latent runs and the zero-shot stage need the 128-px generator's diffusion model: with WAIT_GENERATOR=1 (set by
# evidence/run_all128.sh, whose other lane trains it) wait for it, else say what to run
generator_ready() {
  local model=$GENERATOR/models/model.pt
  while [ ! -f "$model" ]; do
    [ -n "${WAIT_GENERATOR:-}" ] || { echo "$model is not there: train the 128-px generator first (bash evidence/run_quality_cpu.sh cpu128), or set GENERATOR."; exit 1; }
    sleep 300
  done
}
case " $STAGES " in *" grid "*)
  SECONDS=0
  grid landmarks "${LANDMARK_INITS:-pretrained scratch dino}" "1 5 10 25 50 150" 0
  [ -z "${LATENT_INITS-latent}" ] || generator_ready
  grid landmarks "${LATENT_INITS-latent}" "5 25 150" 0
  grid segmentation "${SEGMENTATION_INITS:-pretrained scratch}" "5 150" 0
  grid segmentation "${SEGMENTATION_OTHER_INITS-dino}" "5 25 150" 0
  grid landmarks "${LANDMARK_SEED_INITS:-pretrained scratch}" "5" "1 2"
  grid segmentation "${SEGMENTATION_INITS:-pretrained scratch}" "25" 0
  grid landmarks "${LANDMARK_SEED_INITS:-pretrained scratch}" "25" "1 2"
  echo "grid $SECONDS" | tee -a "$WORK/stage_seconds.txt";;
esac
# zero_shot: DiffSeg and decoder-feature clustering on both 128-px UNets, and the lung rule alone, each with the rule's
# threshold, swept on the first SELECT_ON (default 16, about 30 s per film, timestep and UNet) JSRT train films, scored on test
# (skipped where docs/results/zero_shot128/zero_shot.json was measured on the same models and films)
case " $STAGES " in *" zero_shot "*)
  generator_ready
  SECONDS=0
  $PY -m evidence.zero_shot_evidence --train "$WORK/train.csv" --test "$WORK/test.csv" --select_on "${SELECT_ON:-16}" \
      --denoiser_args "--work_dir $WORK/pretrain" --latent_args "--work_dir $GENERATOR" \
      --out docs/results/zero_shot128 --skip_measured ${THREADS:+--torch_threads $THREADS} >> "$WORK/zero_shot.log" 2>&1 \
      || { tail -30 "$WORK/zero_shot.log"; exit 1; }
  echo "zero_shot $SECONDS" | tee -a "$WORK/stage_seconds.txt";;
esac
case " $STAGES " in *" report "*)
  $PY -m evidence.run_heads "${GRID[@]}" --inits pretrained scratch dino latent --sizes 1 5 10 25 50 150 --seeds 0 1 2 \
      --report_only --out docs/results/heads128 -- "${DENOISER[@]}" >> "$WORK/grid.log" 2>&1;;
esac
exit
}
