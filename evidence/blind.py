"""Predictions of the final models on the blind set (459 films under opaque ids, no labels here; scored elsewhere),
and the index that names, for each prediction folder, the model, its settings, the exact command and the date.

    python -m evidence.blind generator --work_dir runs/corpus_cpu128 --name generator_128
        (one reconstruction-strategy sample conditioned on each blind film's own DINO embedding, saved at the
        generator's own size, or --size, as docs/results/blind/<name>/samples/<id>.png)
    python -m evidence.blind zero_shot --name zero_shot -- --work_dir runs/heads128/pretrain --zero_shot_method ...
        (the served zero-shot method's lung masks for the blind JSRT films: <name>/lungs/<id>.png)

Other evidence scripts (evidence/run_heads.py --blind, run ID score of configs/augmentation.json) write their own
folders and call :func:`record`. Never train, fit or choose anything on these films.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

from bundle.cli import config_workflow, data_folder, parse_overrides
from bundle.io import atomic_write

OUT = ROOT / "docs" / "results" / "blind"


def blind_rows(blind: Path, subset: str) -> list[dict[str, str]]:
    """The rows of the blind manifest of one set (``jsrt``, ``cxr_corpus`` or ``all``); file names are the ids."""
    from bundle.data import read_datalist

    if not (blind / "manifest.csv").is_file():
        raise SystemExit(f"error: {blind / 'manifest.csv'} does not exist: pass --blind to the blind folder.")
    rows = [r for r in read_datalist(blind / "manifest.csv") if subset in ("all", r["set"])]
    for r in rows:  # predictions are named by the files' own names, which the scoring reads as ids
        if Path(r["image"]).stem != r["id"]:
            raise SystemExit(f"error: {blind / 'manifest.csv'} names {r['image']} as id {r['id']}: the blind set's "
                             "files are named by their ids; restore that layout.")
    return rows


def _module() -> str:
    """The running script as ``python -m`` names it (``evidence.run_heads``)."""
    try:
        return ".".join(Path(sys.argv[0]).resolve().relative_to(ROOT).with_suffix("").parts)
    except ValueError:
        return Path(sys.argv[0]).stem


def record(folder: str, entry: dict[str, Any], out: Path = OUT, merge: bool = False) -> None:
    """Add or replace ``folder``'s entry in ``<out>/index.json`` (with today's date and the command line); with
    ``merge``, the entry's keys are added to the ones already there (e.g. one key per task of a folder)."""
    import fcntl

    index_path = out / "index.json"
    out.mkdir(parents=True, exist_ok=True)
    folder_fd = os.open(out, os.O_RDONLY)
    try:  # the grids of several scripts record into one index at once: read, change and write it under a lock
        fcntl.flock(folder_fd, fcntl.LOCK_EX)
        index = json.loads(index_path.read_text()) if index_path.is_file() else {}
        index[folder] = {**(index.get(folder, {}) if merge else {}), **entry, "date": datetime.date.today().isoformat(),
                         "command": entry.get("command") or " ".join(shlex.quote(a) for a in ["python", "-m", _module(),
                                                                                               *sys.argv[1:]])}
        text = json.dumps(dict(sorted(index.items())), indent=1) + "\n"
        data = os.environ.get("DINO_DIFFUSION_DATA")
        if data:  # commands name the data folder as users set it, not where it lies on this machine
            for location in {data.rstrip("/"), str(Path(data).resolve())}:
                text = text.replace(location + "/", "$DINO_DIFFUSION_DATA/").replace(f'"{location}"', '"$DINO_DIFFUSION_DATA"')
        atomic_write(index_path, lambda tmp: Path(tmp).write_text(text))
    finally:
        os.close(folder_fd)  # closing releases the lock


def model_files(work_dir: Path) -> dict[str, Any]:
    """The generator's model files with the SHA-256 their records hold."""
    from bundle.model_files import read_record, record_file
    from bundle.models import model_path

    files = {}
    for name in ("autoencoder", "diffusion"):
        path = Path(model_path(work_dir, name))
        read_record(path, name, "train it first")  # the weights are the ones their record describes
        files[name] = {"path": str(path), "sha256": json.loads(record_file(path).read_text())["weights"]["sha256"]}
    return files


def generator(args: argparse.Namespace) -> None:
    from PIL import Image

    rows = blind_rows(args.blind, "all")
    overrides = {"work_dir": str(args.work_dir), **parse_overrides(args.overrides)}
    wf = config_workflow("configs/inference.json", "sample", **overrides)
    get = wf.parser.get_parsed_content
    scratch = args.work_dir / "blind_samples"
    get("generation")(get("generator").datalist(rows), output_dir=scratch, strategy="reconstruction", num_samples=1,
                      seed=args.seed)
    from bundle.data import read_datalist

    made = read_datalist(scratch / "manifest.csv")
    if len(made) != len(rows):
        raise SystemExit(f"error: {len(made)} samples for {len(rows)} blind films; see {scratch}.")
    folder = args.out / args.name / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    by_id = {m["source_ids"]: m for m in made}
    for row in rows:
        sample = by_id.get(row["id"])
        if sample is None:
            raise SystemExit(f"error: no sample conditioned on {row['image']} in {scratch / 'manifest.csv'}.")
        image = Image.open(sample["image"]).convert("L")
        if args.size:
            image = image.resize((args.size, args.size), Image.BILINEAR)
        atomic_write(folder / f"{row['id']}.png", lambda tmp: image.save(tmp, format="PNG"))
    settings = {k: get(k) for k in ("sampler", "num_inference_steps", "guidance_scale")}
    record(args.name, out=args.out, entry={"what": "one reconstruction-strategy sample per blind film, conditioned on its own DINO "
                               f"embedding, saved at {image.width} px", "images": len(rows),
                       "model": model_files(args.work_dir), "settings": {**settings, "seed": args.seed}})
    print(f"{len(rows)} samples -> {folder}")


def zero_shot(args: argparse.Namespace) -> None:
    import csv
    import tempfile

    rows = blind_rows(args.blind, "jsrt")
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "blind_jsrt.csv"
        with open(listing, "w", newline="") as f:
            csv.writer(f).writerows([["image"], *[[r["image"]] for r in rows]])
        overrides = parse_overrides(args.overrides)
        wf = config_workflow("configs/heads/zero_shot.json", "inference", **overrides, input_dir=str(listing),
                             output_dir=str(args.out / args.name))
        wf.run()
    settings = json.loads((args.out / args.name / "metrics.json").read_text())["settings"]
    record(args.name, out=args.out, entry={"what": "label-free lung masks (both lungs) of the served zero-shot method, 0/255 at "
                                           "each film's own size", "images": len(rows),
                                           "model": {settings["model"]: settings["model_path"]}, "settings": settings})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["generator", "zero_shot"])
    parser.add_argument("--name", required=True, help="the folder under docs/results/blind")
    parser.add_argument("--work_dir", type=Path, help="the generator's work dir (generator)")
    parser.add_argument("--blind", type=Path, default=None, help="the blind folder (default: $DINO_DIFFUSION_DATA/blind)")
    parser.add_argument("--out", type=Path, default=OUT, help="where prediction folders and index.json go")
    parser.add_argument("--size", type=int, default=None, help="side of the saved samples (default: as generated)")
    parser.add_argument("--seed", type=int, default=0)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)  # after --: overrides of the config
    args = parser.parse_args(argv[:split])
    args.overrides = argv[split + 1 :]
    os.chdir(ROOT)
    name = Path(args.name)
    if name.is_absolute() or ".." in name.parts or not name.parts:
        raise SystemExit(f"error: --name '{args.name}' must be a folder name inside {args.out}, such as generator_128.")
    args.blind = data_folder("blind", args.blind)
    if args.what == "generator" and args.work_dir is None:
        raise SystemExit("error: generator needs --work_dir, the generator's work dir.")
    {"generator": generator, "zero_shot": zero_shot}[args.what](args)


if __name__ == "__main__":
    main()
