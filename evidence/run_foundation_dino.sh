#!/usr/bin/env bash
# The generator conditioned on the DINO trained on JSRT itself (evidence/run_dino.sh first): stage 2 and the
# cache again with that DINO, reusing the stage-1 autoencoder of evidence/run_foundation.sh; fully offline.
#   bash evidence/run_foundation_dino.sh       (WORK=runs/foundation_dino; ~15 min on 2 CPU cores)
{ # the whole script is read before it runs: editing it while a long run is under way cannot change that run
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${WORK:-runs/foundation_dino}
mkdir -p "$WORK"
CONFIG="['configs/train.json','configs/profiles/cpu64.json']"
ARGS=(--dataset_dir runs/foundation/train.csv --work_dir "$WORK" --autoencoder_path runs/foundation/models/autoencoder.pt
      --dino_weights runs/dino/models/dino/teacher.safetensors --diffusion_epochs "${DIFFUSION_EPOCHS:-200}")
: > "$WORK/stage_seconds.txt"
for stage in cache train_diffusion; do
  SECONDS=0
  $PY -m monai.bundle run "$stage" --config_file "$CONFIG" "${ARGS[@]}" > "$WORK/$stage.log" 2>&1
  echo "$stage $SECONDS" >> "$WORK/stage_seconds.txt"
done
printf '%s\n' "${ARGS[@]}" > "$WORK/args.txt"
exit
}
