"""Write a CSV datalist (image, label columns, landmark file, one mask column per structure) for one split of the JSRT set in ../shared/data/jsrt.

    python scripts/jsrt_datalist.py --split train --out runs/jsrt/train.csv
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

STRUCTURES = ("left_lung", "right_lung", "heart", "left_clavicle", "right_clavicle")
DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "jsrt"


def jsrt_rows(root: Path, split: str) -> list[dict[str, str]]:
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        raise SystemExit(f"error: {manifest} does not exist: pass --root to the JSRT folder (with manifest.csv and images/).")
    with open(manifest, newline="") as f:
        rows = [r for r in csv.DictReader(f) if split in ("all", r["split"])]
    if not rows:
        raise SystemExit(f"error: no rows with split '{split}' in {manifest}: use train, val, test or all.")
    out = []
    for r in rows:
        row = {"image": str((root / "images" / f"{r['id']}.png").resolve()), **r}
        landmarks = root / "landmarks" / f"{r['id']}.json"
        row["landmark_file"] = str(landmarks.resolve()) if landmarks.is_file() else ""
        for structure in STRUCTURES:
            mask = root / "masks" / structure / f"{r['id']}.png"
            row[f"mask_{structure}"] = str(mask.resolve()) if mask.is_file() else ""
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--split", default="train", help="train, val, test or all")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = jsrt_rows(args.root, args.split)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, args.out)
    print(f"{len(rows)} images -> {args.out}")


if __name__ == "__main__":
    main()
