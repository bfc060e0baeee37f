"""Write a CSV datalist (image, id, split, patient, source, label, finding) for one split of the cxr_corpus
set ($DINO_DIFFUSION_DATA/cxr_corpus, docs/data.md), optionally with the JSRT images of the same split appended (source 'jsrt'): the unlabelled training set at scale.

    python -m scripts.cxr_corpus_datalist --split train --with_jsrt --out runs/corpus/train.csv
    python -m scripts.cxr_corpus_datalist --split test --source kermany --out runs/corpus/test_kermany.csv
    python -m scripts.cxr_corpus_datalist --lists runs/corpus/lists   (train.csv, test_corpus.csv, test_jsrt.csv)
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path


from bundle.cli import data_folder

COLUMNS = ("image", "id", "split", "patient", "source", "label", "finding")


def corpus_rows(root: Path, split: str, source: str | None = None) -> list[dict[str, str]]:
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        raise SystemExit(f"error: {manifest} does not exist: pass --root to the cxr_corpus folder (manifest.csv, images/).")
    with open(manifest, newline="") as f:
        rows = [r for r in csv.DictReader(f) if split in ("all", r["split"]) and source in (None, r["source"])]
    return [{"image": str((root / "images" / f"{r['id']}.png").resolve()), **{k: r[k] for k in COLUMNS[1:]}} for r in rows]


def jsrt_rows(root: Path, split: str) -> list[dict[str, str]]:
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        raise SystemExit(f"error: {manifest} does not exist: pass --jsrt_root to the JSRT folder (manifest.csv, images/).")
    with open(manifest, newline="") as f:
        rows = [r for r in csv.DictReader(f) if split in ("all", r["split"])]
    return [{"image": str((root / "images" / f"{r['id']}.png").resolve()), "id": r["id"], "split": r["split"],
             "patient": f"jsrt_{r['id']}", "source": "jsrt", "label": r["condition"] or "", "finding": ""} for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None,
                        help="the cxr_corpus folder (default: $DINO_DIFFUSION_DATA/cxr_corpus)")
    parser.add_argument("--split", default="train", help="train, val, test or all (patient-level splits)")
    parser.add_argument("--source", default=None, help="keep one source only: nih, kermany or mhhcovid")
    parser.add_argument("--with_jsrt", action="store_true", help="append the JSRT images of the same split")
    parser.add_argument("--jsrt_root", type=Path, default=None, help="the JSRT folder (default: $DINO_DIFFUSION_DATA/jsrt)")
    parser.add_argument("--out", type=Path, help="the datalist to write")
    parser.add_argument("--lists", type=Path, help="instead of --out: write the generator's standard lists into this "
                        "folder: train.csv (corpus train + JSRT train), test_corpus.csv and test_jsrt.csv")
    args = parser.parse_args()
    args.root = data_folder("cxr_corpus", args.root)
    if args.lists or args.with_jsrt:
        args.jsrt_root = data_folder("jsrt", args.jsrt_root)
    if args.lists:
        write(args.lists / "train.csv", corpus_rows(args.root, "train") + jsrt_rows(args.jsrt_root, "train"))
        write(args.lists / "test_corpus.csv", corpus_rows(args.root, "test"))
        write(args.lists / "test_jsrt.csv", jsrt_rows(args.jsrt_root, "test"))
        return
    if not args.out:
        parser.error("pass --out (one datalist) or --lists (the standard lists)")
    rows = corpus_rows(args.root, args.split, args.source)
    if args.with_jsrt:
        rows += jsrt_rows(args.jsrt_root, args.split)
    if not rows:
        raise SystemExit(f"error: no rows with split '{args.split}' and source '{args.source}': check both.")
    write(args.out, rows)


def write(out: Path, rows: list[dict[str, str]]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out)
    print(f"{len(rows)} images -> {out}")


if __name__ == "__main__":
    main()
