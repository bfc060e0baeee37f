#!/usr/bin/env bash
# Does bf16 training give a generator as good as float32? The whole generator (autoencoder, latent cache, diffusion
# UNet) trained twice per precision (seeds 0 and 1, so the spread between seeds is measured) with the cpu64 profile's
# networks on the 150 JSRT train images, then evidence/evaluate_quality.py --final_only on JSRT test (autoencoder PSNR
# and MS-SSIM; FD of reconstruction-strategy samples in pixels). The DINO condition is the seeded random ViT (no
# pre-training, the same for every run), so FD in its space is a random-feature distance. Writes
# docs/results/amp_quality.json and prints the table. Needs a CPU with bf16 instructions to say anything.
#   bash evidence/run_amp_check.sh       (about 40 min on one CPU core; JSRT=the JSRT folder; THREADS=torch threads)
{ # the whole script is read before it runs: editing it while a long run is under way cannot change that run
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${WORK:-runs/amp_check}
mkdir -p "$WORK"
JSRT_ARGS=(); [ -z "${JSRT:-}" ] || JSRT_ARGS=(--root "$JSRT")
for split in train test; do
  [ -f "$WORK/$split.csv" ] || $PY -m scripts.jsrt_datalist "${JSRT_ARGS[@]}" --split "$split" --out "$WORK/$split.csv"
done
THREAD_ARGS=(); [ -z "${THREADS:-}" ] || THREAD_ARGS=(--torch_threads "$THREADS")
for seed in 0 1; do
  for amp in none bf16; do
    run="$WORK/${amp}_seed$seed"
    [ -f "$run/eval/quality.json" ] && continue
    SECONDS=0
    for run_id in train_autoencoder cache train_diffusion; do
      $PY -m monai.bundle run "$run_id" --config_file configs/train.json --profile cpu64 --amp "$amp" --seed "$seed" \
        --dataset_dir "$WORK/train.csv" --work_dir "$run" --dino_weights random --latent_channels 4 --ae_lr 0.0005 \
        --ae_epochs "${AE_EPOCHS:-30}" --diffusion_epochs "${DIFFUSION_EPOCHS:-80}" "${THREAD_ARGS[@]}" >> "$run.log" 2>&1
    done
    echo "$SECONDS" > "$run.seconds"
    $PY -m evidence.evaluate_quality --work_dir "$run" --train "$WORK/train.csv" --test "jsrt=$WORK/test.csv" \
      --out "$run/eval" --final_only --samples 150 --memorisation_samples 32 >> "$run.log" 2>&1
  done
done
$PY - "$WORK" <<'PYEOF'
import json, statistics, sys
from pathlib import Path
work = Path(sys.argv[1])
runs = {}
for run in sorted(work.glob("*_seed*")):
    if not (run / "eval" / "quality.json").is_file():
        continue
    t = json.loads((run / "eval" / "quality.json").read_text())["targets"]["jsrt"]
    runs[run.name] = {"train_seconds": int((work / f"{run.name}.seconds").read_text()),
                      "psnr_db": round(t["reconstruction"]["psnr_db"]["mean"], 3),
                      "ms_ssim": round(t["reconstruction"]["ms_ssim"]["mean"], 4),
                      "fd_pixels": round(t["fd_pixels"], 3), "fd_pixels_reference": round(t["fd_pixels_reference"], 3),
                      "fd_random_vit": round(t["fd_dino"], 3)}
summary = {}
for amp in ("none", "bf16"):
    rows = [r for name, r in runs.items() if name.startswith(amp + "_")]
    summary[amp] = {k: [r[k] for r in rows] for k in ("train_seconds", "psnr_db", "ms_ssim", "fd_pixels", "fd_random_vit")}
out = {"command": "bash evidence/run_amp_check.sh", "data": "JSRT train (150) -> JSRT test (30)", "runs": runs,
       "by_precision": summary}
(Path("docs/results") / "amp_quality.json").write_text(json.dumps(out, indent=2) + "\n")
print("| precision | train s (seeds 0, 1) | PSNR dB | MS-SSIM | FD pixels | FD random ViT |")
print("|---|---|---|---|---|---|")
for amp, s in summary.items():
    print(f"| {amp} | " + " | ".join(", ".join(str(v) for v in s[k]) for k in s) + " |")
PYEOF
exit
}
