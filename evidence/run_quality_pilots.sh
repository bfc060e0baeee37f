#!/usr/bin/env bash
# Autoencoder pilots for the long CPU run (evidence/run_quality_cpu.sh) on the corpus + JSRT train list, then
# evidence/evaluate_quality.py --final_only on the JSRT and corpus test splits; writes docs/results/quality_pilots[_PROFILE].json.
#   bash evidence/run_quality_pilots.sh          cpu64: 4 epochs (536 iterations) each; latent channels (3, 4), learning
#                                               rate (1e-4, 5e-4, 1e-3) and width (about 30 min on two CPU cores)
#   bash evidence/run_quality_pilots.sh cpu128   cpu128: 2,144 images each (one epoch); learning rate (5e-4, 1e-3) and
#                                               batch size (16, 8) at 32x32x4 latents (about 45 min on one core)
# DATA as in run_quality_cpu.sh; THREADS=torch threads per pilot (default: all cores).
{ # the whole script is read before it runs: editing it while a long run is under way cannot change that run
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${1:-cpu64}
PY=${PYTHON:-.venv/bin/python}
WORK=${WORK:-runs/pilots_$PROFILE}
DATA=${DATA:-runs/corpus_$PROFILE/lists}
mkdir -p "$WORK"
[ -f "$DATA/train.csv" ] || $PY -m scripts.cxr_corpus_datalist --lists "$DATA"
THREAD_ARGS=(); [ -z "${THREADS:-}" ] || THREAD_ARGS=(--torch_threads "$THREADS")
NAMES=()
pilot() {  # NAME overrides...
  local name=$1; shift
  NAMES+=("$name")
  [ -f "$WORK/eval_$name/quality.json" ] && return
  SECONDS=0
  $PY -m monai.bundle run train_autoencoder --config_file configs/train.json --profile "$PROFILE" --amp auto \
    --dataset_dir "$DATA/train.csv" --work_dir "$WORK/$name" --cache_dir "$WORK/cache" "${THREAD_ARGS[@]}" "$@" \
    > "$WORK/$name.log" 2>&1
  echo "$SECONDS" > "$WORK/$name.seconds"
  $PY -m evidence.evaluate_quality --work_dir "$WORK/$name" --train "$DATA/train.csv" --test "jsrt=$DATA/test_jsrt.csv" \
    --test "corpus=$DATA/test_corpus.csv" --out "$WORK/eval_$name" --final_only > "$WORK/eval_$name.log" 2>&1
}
if [ "$PROFILE" = cpu64 ]; then
  OUT=docs/results/quality_pilots.json
  pilot c3_lr1 --ae_epochs 4 --latent_channels 3 --ae_lr 0.0001
  pilot c4_lr1 --ae_epochs 4 --latent_channels 4 --ae_lr 0.0001
  pilot c3_lr5 --ae_epochs 4 --latent_channels 3 --ae_lr 0.0005
  pilot c4_lr5 --ae_epochs 4 --latent_channels 4 --ae_lr 0.0005
  pilot c4_lr10 --ae_epochs 4 --latent_channels 4 --ae_lr 0.001
  pilot c4_lr5_wide --ae_epochs 4 --latent_channels 4 --ae_lr 0.0005 --autoencoder_channels "[64,128,128]"
else
  OUT=docs/results/quality_pilots_$PROFILE.json
  pilot b16_lr5 --ae_epochs 1 --ae_batch_size 16 --ae_lr 0.0005
  pilot b16_lr10 --ae_epochs 1 --ae_batch_size 16 --ae_lr 0.001
  pilot b8_lr5 --ae_epochs 1 --ae_batch_size 8 --ae_lr 0.0005
fi
$PY - "$WORK" "$OUT" "$*" "${NAMES[@]}" <<'PYEOF'
import json, sys
from pathlib import Path
work, out, args, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4:]
rows = {}
for name in names:
    quality = json.loads((work / f"eval_{name}" / "quality.json").read_text())["autoencoder_curve"][-1]["sets"]
    rows[name] = {"seconds": int((work / f"{name}.seconds").read_text()),
                  **{f"{s}_{m}": round(q[m]["mean"], 4) for s, q in quality.items() for m in ("psnr_db", "ms_ssim")}}
out.write_text(json.dumps({"command": f"bash evidence/run_quality_pilots.sh {args}".strip(), "pilots": rows}, indent=2) + "\n")
print(json.dumps(rows, indent=1))
PYEOF
exit
}
