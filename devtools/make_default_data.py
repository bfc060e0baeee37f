"""Build the default data set that ships with the bundle: the NIH ChestX-ray14 images of the cxr_corpus
train and val splits, downscaled to 128 pixels (longest side), as 8-bit grey PNGs with a manifest.

    python -m devtools.make_default_data            (reads $DINO_DIFFUSION_DATA/cxr_corpus, writes bundle/default_data/nih_cxr)

NIH ChestX-ray14 is released by the NIH Clinical Center without restriction on use, which is why only the
`nih` rows are used (the other corpus sources carry licences that ask for more than attribution). The
test split stays out of the repository: it is the held-out set reports are made on.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

from bundle.cli import data_folder
from bundle.constants import DEFAULT_DATA_DIR

SPLITS = ("train", "val")
COLUMNS = ("id", "split", "label", "finding", "view", "original_path")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None,
                        help="the cxr_corpus folder, manifest.csv and images/ (default: $DINO_DIFFUSION_DATA/cxr_corpus)")
    parser.add_argument("--out", type=Path, default=ROOT / DEFAULT_DATA_DIR)
    parser.add_argument("--size", type=int, default=128, help="longest side in pixels")
    args = parser.parse_args()
    manifest = data_folder("cxr_corpus", args.root) / "manifest.csv"
    if not manifest.is_file():
        raise SystemExit(f"error: {manifest} does not exist: pass --root to the cxr_corpus folder.")
    with open(manifest, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["source"] == "nih" and r["split"] in SPLITS]
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for split in SPLITS:
        (tmp / split).mkdir(parents=True)
    for r in rows:
        image = Image.open(args.root / "images" / f"{r['id']}.png").convert("L")
        image.thumbnail((args.size, args.size), Image.LANCZOS)
        image.save(tmp / r["split"] / f"{r['id']}.png", optimize=True)
    with open(tmp / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    readme = args.out / "README.md"
    if readme.is_file():
        shutil.copy(readme, tmp / "README.md")
    shutil.rmtree(args.out, ignore_errors=True)
    os.replace(tmp, args.out)
    counts = {s: sum(r["split"] == s for r in rows) for s in SPLITS}
    print(f"{len(rows)} images ({counts}) at {args.size} px -> {args.out}")


if __name__ == "__main__":
    main()
