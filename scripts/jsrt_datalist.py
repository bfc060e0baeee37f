"""Write a CSV datalist (image, label columns, landmark file, one mask column per structure) for one split of the JSRT set ($DINO_DIFFUSION_DATA/jsrt, docs/data.md).

    python -m scripts.jsrt_datalist --split train --out runs/jsrt/train.csv
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


from bundle.cli import JSRT_SPLITS, data_folder, jsrt_rows
from bundle.io import atomic_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None,
                        help="the JSRT folder, with manifest.csv, images/, landmarks/ and masks/<structure>/ "
                             "(default: $DINO_DIFFUSION_DATA/jsrt; docs/data.md)")
    parser.add_argument("--split", default="train", choices=JSRT_SPLITS,
                        help="which rows of manifest.csv to list; all = every split (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="the CSV datalist to write")
    args = parser.parse_args()
    rows = jsrt_rows(data_folder("jsrt", args.root), args.split)
    with atomic_path(args.out) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(rows)} images -> {args.out}")


if __name__ == "__main__":
    main()
