#!/usr/bin/env bash
# Does synthetic data help where a classifier has room to improve? The augmentation check (run ID augment of
# configs/augmentation.json) on three tasks, each within one source, with the 128-px generator:
#   nih       cxr_corpus NIH adults, normal vs pneumonia, N per class; test: the NIH films of corpus test
#   nodule    JSRT nodule present vs absent, N in all; test: JSRT val + test together (50 films; tuned on nothing)
#   kermany   cxr_corpus Kermany children, normal vs pneumonia, N per class (small N); test: Kermany corpus test
# every classifier at the smallest and the largest N scores the matching blind set as soon as it is trained
# (docs/results/blind/augmentation/<task>/), and every finished cell's row goes to $RESULTS/<task>/results.jsonl, kept
# with the results, beside the task's table, summary and figure so far (results.md, summary.json, augmentation_auc.png):
# on another machine the grid goes on from the rows on record (the cells of the synthetic and
# concept arms only where the generator is the same, by content).
# The tasks go breadth first: each at its smallest N, then each at its next N, and so on.
#   bash evidence/run_augmentation128.sh                  (every task; resumes: run it again after an interruption)
#   TASKS="nodule" SIZES="10 25" bash evidence/run_augmentation128.sh
# Settings: GENERATOR (work dir of the trained generator, default runs/corpus_cpu128), GUIDANCE (the synthetic films'
# guidance scale; default: $GENERATOR/guidance.json, chosen on validation films), WORK (default
# runs/augmentation128), RESULTS (default docs/results/augmentation128), BLIND (the blind folder; default
# $DINO_DIFFUSION_DATA/blind, none: no scoring), THREADS,
# STEPS (the sampler's steps for the synthetic films; default: $GENERATOR/guidance.json's num_inference_steps, which
# the guidance stage sets to 10 where 10 steps sample as well as the config's 20 on validation films, at half the cost;
# else inference.json's),
# SIZES / RATIOS / FOLDS / ARMS / RATIO_MAX_SIZE / ARM_MAX_SIZE per run, CLASSIFIER_AMP (default auto: bf16 where the
# CPU has it, about 80 s a classifier against 130 s in float32; none: float32 on every CPU. A row of one precision
# is trained again in the other, but the synthetic and concept rows, most of the grid, are made again on another
# machine anyway, with the generator trained there: only the real and classic rows would be).
# Defaults: the grid cut to fit about 10 hours of the two cores from unit costs measured at 128 px on one thread beside
# one other job (docs/results/augmentation.md): a classifier about 130 s in float32 (+40 s with classic augmentation;
# 80 s in bf16), a synthetic film 1.8 s at guidance 1 and 3.5 s at 2 in bf16 (about 1.7x that in float32, on a CPU
# without bf16 instructions), a concept 300 steps of 2.9 s (bf16) or 4.3 s (float32) at batch 16, less for smaller
# pools. So 1:50 is cut (2,500 films per fold at N = 25 per class), 1:10 runs at N <= 10 and 1:5 at N <= 25, 1:1
# everywhere; 5 folds to N = 25, 3 at 50; the concept arm (two concepts per fold) only at the smallest N (5 for
# Kermany, 10 otherwise); Kermany at N = 5 and 10 per class only (the headroom is at small N). In all 289
# classifiers, about 5,300 DINO-manifold films, 2,000 concept films and 30 concepts: about 17 core-hours in bf16 at
# guidance 1 (20 at 2), 15-16 with STEPS=10; 22-28 in float32.
{ # the whole script is read before it runs: editing it while a long run is under way cannot change that run
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
GENERATOR=${GENERATOR:-runs/corpus_cpu128}
WORK=${WORK:-runs/augmentation128}
RESULTS=${RESULTS:-docs/results/augmentation128}
BLIND=${BLIND:-${DINO_DIFFUSION_DATA:-}/blind}
TASKS=${TASKS:-nodule nih kermany}
mkdir -p "$WORK/lists"
L=$WORK/lists
$PY -m scripts.jsrt_datalist --split train --out "$L/jsrt_train.csv" > /dev/null
$PY -m scripts.jsrt_datalist --split val --out "$L/jsrt_val.csv" > /dev/null
$PY -m scripts.jsrt_datalist --split test --out "$L/jsrt_test.csv" > /dev/null
{ cat "$L/jsrt_val.csv"; tail -n +2 "$L/jsrt_test.csv"; } > "$L/jsrt_val_test.csv.$$" && mv "$L/jsrt_val_test.csv.$$" "$L/jsrt_val_test.csv"
for source in nih kermany; do
  $PY -m scripts.cxr_corpus_datalist --split train --source "$source" --out "$L/${source}_train.csv" > /dev/null
  $PY -m scripts.cxr_corpus_datalist --split test --source "$source" --out "$L/${source}_test.csv" > /dev/null
done
CONFIGS="['configs/inference.json','configs/augmentation.json']"
THREAD_ARGS=()
[ -z "${THREADS:-}" ] || THREAD_ARGS=(--torch_threads "$THREADS")
# the synthetic films' guidance scale and sampler steps: GUIDANCE and STEPS, else those the generator's guidance stage
# chose on validation films ($GENERATOR/guidance.json, written by evidence/run_quality_cpu.sh), else inference.json's
chosen() {  # chosen KEY: KEY of $GENERATOR/guidance.json, empty where it is not there or null
  [ -f "$GENERATOR/guidance.json" ] || return 0
  $PY -c 'import json,sys; v = json.load(open(sys.argv[1])).get(sys.argv[2]); print("" if v is None else v)' \
      "$GENERATOR/guidance.json" "$1"
}
# WAIT_GUIDANCE=1 (a second lane of evidence/run_all128.sh): wait until the generator's guidance stage has chosen the
# settings of the model now there, so that every lane samples with the same ones
if [ -n "${WAIT_GUIDANCE:-}" ]; then
  until [ -f "$GENERATOR/guidance.json" ] && [ "$GENERATOR/guidance.json" -nt "$GENERATOR/models/model.pt" ]; do sleep 300; done
fi
GUIDANCE=${GUIDANCE:-$(chosen guidance_scale)}
STEPS=${STEPS:-$(chosen num_inference_steps)}
GUIDANCE_ARGS=()
[ -z "$STEPS" ] || GUIDANCE_ARGS+=(--num_inference_steps "$STEPS")
[ -z "$GUIDANCE" ] || GUIDANCE_ARGS+=(--guidance_scale "$GUIDANCE")
# breadth first: every task at its smallest N, then every task at its next N, and so on (each pass gives the run ID
# the sizes so far, so it skips the finished cells and its report covers them all), so that a grid cut short still
# answers the question on every task at the N where the papers place the benefit. A task is worked on by one run at
# a time ($WORK/<task>.lock): a second run of this script beside the first takes the tasks the first is not on
round=1
while :; do
any=
for task in $TASKS; do
  case $task in
    nodule)  args=(--labelled_list "$L/jsrt_train.csv" --test_list "$L/jsrt_val_test.csv" --label nodule --per_class False)
             sizes=${SIZES:-"[10,25,50]"}; concept_max=10; blind=jsrt;;
    nih)     args=(--labelled_list "$L/nih_train.csv" --test_list "$L/nih_test.csv" --label label --positive pneumonia
                   --per_class True); sizes=${SIZES:-"[10,25,50]"}; concept_max=10; blind=cxr_corpus;;
    kermany) args=(--labelled_list "$L/kermany_train.csv" --test_list "$L/kermany_test.csv" --label label
                   --positive pneumonia --per_class True); sizes=${SIZES:-"[5,10]"}; concept_max=5; blind=cxr_corpus;;
    *) echo "unknown task $task (nodule, nih, kermany)"; exit 1;;
  esac
  sizes_now=$($PY -c "import ast,sys; s=sorted(ast.literal_eval(sys.argv[1])); r=int(sys.argv[2]); print(s[:r] if r <= len(s) else '')" "$sizes" "$round")
  [ -n "$sizes_now" ] || continue
  any=1
  exec {lock}>"$WORK/$task.lock"
  if ! flock -n "$lock"; then
    echo "$task: another run is working on it; going on with the next task"; exec {lock}>&-; continue
  fi
  SCORE_ARGS=()
  if [ -d "$BLIND/$blind/images" ]; then
    ends=$($PY -c "import ast,sys; s=ast.literal_eval(sys.argv[1]); print([min(s), max(s)])" "$sizes")
    SCORE_ARGS=(--score_list "$BLIND/$blind/images" --score_sizes "$ends" --scores_dir "docs/results/blind/augmentation/$task")
  fi
  SECONDS=0
  $PY -m monai.bundle run augment --config_file "$CONFIGS" --work_dir "$GENERATOR" "${args[@]}" \
      --augmentation_dir "$WORK/$task" --augmentation_results "$RESULTS/$task/results.jsonl" "${SCORE_ARGS[@]}" \
      --pool_sizes "$sizes_now" --ratios "${RATIOS:-[1,5,10]}" \
      --ratio_max_size "${RATIO_MAX_SIZE:-{'10': 10, '5': 25}}" --folds "${FOLDS:-{'25': 5, '50': 3}}" \
      --arms "${ARMS:-['real','real+classic','real+synthetic','classic+synthetic','real+concept']}" \
      --arm_max_size "${ARM_MAX_SIZE:-{'real+concept': $concept_max}}" \
      --classifier_amp "${CLASSIFIER_AMP:-auto}" "${GUIDANCE_ARGS[@]}" "${THREAD_ARGS[@]}" >> "$WORK/$task.log" 2>&1 || { tail -30 "$WORK/$task.log"; exit 1; }
  echo "augment_${task}_n$(echo "$sizes_now" | tr -d "[] ") $SECONDS" | tee -a "$WORK/stage_seconds.txt"
  cp "$WORK/$task/results.md" "$WORK/$task/summary.json" "$WORK/$task/augmentation_auc.png" "$RESULTS/$task/"
  if [ ${#SCORE_ARGS[@]} -gt 0 ]; then
    $PY -c "import sys; from evidence.blind import record; record(f'augmentation/{sys.argv[1]}', {'what': 'scores of every kept classifier at the smallest and largest N (one scores.csv per arm, ratio, N and fold)', 'generator': sys.argv[2], 'experiment': sys.argv[3], 'command': 'bash evidence/run_augmentation128.sh'})" "$task" "$GENERATOR" \
        "$WORK/$task"
  fi
  exec {lock}>&-
done
[ -n "$any" ] || break
round=$((round + 1))
done
exit
}
