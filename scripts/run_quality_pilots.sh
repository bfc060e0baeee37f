#!/usr/bin/env bash
# Autoencoder pilots for the long CPU run (scripts/run_quality_cpu.sh): 4 epochs (536 iterations) each on the
# corpus + JSRT train list, bf16, then scripts/evaluate_quality.py --final_only on the JSRT and corpus test splits.
# Compares latent channels (3, 4), learning rate (1e-4, 5e-4, 1e-3) and width; writes docs/results/quality_pilots.json.
#   bash scripts/run_quality_pilots.sh      (about 30 min on two CPU cores; DATA as in run_quality_cpu.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${WORK:-runs/pilots}
DATA=${DATA:-runs/corpus_cpu64/lists}
mkdir -p "$WORK"
[ -f "$DATA/train.csv" ] || $PY scripts/cxr_corpus_datalist.py --lists "$DATA"
pilot() {  # NAME overrides...
  local name=$1; shift
  SECONDS=0
  $PY -m monai.bundle run train_autoencoder --config_file configs/train.json --profile cpu64 --amp bf16 \
    --dataset_dir "$DATA/train.csv" --work_dir "$WORK/$name" --cache_dir "$WORK/cache" --ae_epochs 4 "$@" \
    > "$WORK/$name.log" 2>&1
  echo "$SECONDS" > "$WORK/$name.seconds"
  $PY scripts/evaluate_quality.py --work_dir "$WORK/$name" --train "$DATA/train.csv" --test "jsrt=$DATA/test_jsrt.csv" \
    --test "corpus=$DATA/test_corpus.csv" --out "$WORK/eval_$name" --final_only > "$WORK/eval_$name.log" 2>&1
}
pilot c3_lr1 --latent_channels 3 --ae_lr 0.0001
pilot c4_lr1 --latent_channels 4 --ae_lr 0.0001
pilot c3_lr5 --latent_channels 3 --ae_lr 0.0005
pilot c4_lr5 --latent_channels 4 --ae_lr 0.0005
pilot c4_lr10 --latent_channels 4 --ae_lr 0.001
pilot c4_lr5_wide --latent_channels 4 --ae_lr 0.0005 --autoencoder_channels "[64,128,128]"
$PY - "$WORK" <<'PYEOF'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
rows = {}
for name in ("c3_lr1", "c4_lr1", "c3_lr5", "c4_lr5", "c4_lr10", "c4_lr5_wide"):
    quality = json.loads((work / f"eval_{name}" / "quality.json").read_text())["autoencoder_curve"][-1]["sets"]
    rows[name] = {"seconds": int((work / f"{name}.seconds").read_text()),
                  **{f"{s}_{m}": round(q[m]["mean"], 4) for s, q in quality.items() for m in ("psnr_db", "ms_ssim")}}
out = Path("docs/results/quality_pilots.json")
out.write_text(json.dumps({"command": "bash scripts/run_quality_pilots.sh", "iterations": 536, "pilots": rows}, indent=2))
print(json.dumps(rows, indent=1))
PYEOF
