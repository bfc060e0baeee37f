"""The training report's measurement, repeated over model files and guidance scales of one work dir.

Each variant is :func:`bundle.report.training_report`, the report at the end of a run: one reconstruction-strategy
sample per real image, drawn beside it (``OUT/variant<N>/samples_grid.png``) and evaluated against those images
(FD in DINO space and in pixels, with the reference FD of as many training images). Used to choose the default run's guidance scale and stage shares (docs/results/first_run.md):

    python -m evidence.report_variants --work_dir WORK --real LIST_OR_FOLDER --count 64 \\
        --variant guidance_scale=1 --variant guidance_scale=3 \\
        --variant diffusion_path=WORK/models/snapshots/diffusion_epoch0032.pt,guidance_scale=1 \\
        --variant guidance_scale=1,num_inference_steps=10

Prints one JSON line per variant and appends them to ``OUT/variants.jsonl``. Nothing is trained. A variant already
there (same model file, images, count and settings) is not measured again, so an interrupted run goes on where it
stopped.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from bundle import data as bundle_data
from bundle.data import file_stamp
from bundle.models import model_path
from bundle.report import training_report

SETTINGS = {"guidance_scale": float, "diffusion_path": str, "num_inference_steps": int}


def variant(text: str) -> dict:
    """``key=value,key=value`` of :data:`SETTINGS` (empty: the config's defaults)."""
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in SETTINGS:
            raise argparse.ArgumentTypeError(f"'{key}' is not a variant setting: choose from {sorted(SETTINGS)}.")
        out[key] = SETTINGS[key](value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", required=True)
    parser.add_argument("--real", help="held-out images (datalist or folder; default: the bundled val images)")
    parser.add_argument("--train", help="training images for the reference FD (default: the bundled train images)")
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--variant", type=variant, action="append", default=None)
    parser.add_argument("--out", help="default: WORK/report_variants")
    parser.add_argument("--torch_threads", type=int)
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    real = args.real or str(bundle_data.default_data("val"))
    train = args.train or str(bundle_data.default_data("train"))
    out_root = Path(args.out or Path(args.work_dir) / "report_variants")
    done = out_root / "variants.jsonl"
    measured = [json.loads(line) for line in done.read_text().splitlines() if line.strip()] if done.is_file() else []
    for number, settings in enumerate(args.variant or [{}]):
        model = Path(settings.get("diffusion_path") or model_path(args.work_dir, "diffusion"))
        # every setting named, None where the variant leaves it to the config: a row measured with another setting
        # (say 10 sampler steps) never stands for one without it
        same = {"work_dir": args.work_dir, "real": real, "count": args.count, **{k: settings.get(k) for k in SETTINGS},
                "model": file_stamp(model) if model.is_file() else None}
        if any({k: r.get(k) for k in same} == same for r in measured):
            print(f"variant {number} {settings} was measured already ({done}): kept", flush=True)
            continue
        out = out_root / f"variant{number}"
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        result = training_report(".", args.work_dir, real, train_dir=train, count=args.count, report_dir=out,
                                 **settings)
        row = {**same, "seconds": round(time.perf_counter() - started, 1)}
        for space, entry in result["feature_spaces"].items():
            row[f"fd_{space}"] = round(entry["frechet_distance"], 3)
            row[f"fd_{space}_reference"] = round(entry["frechet_distance_train_reference"], 3)
        print(json.dumps(row), flush=True)
        with open(done, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
