"""Lay out the cxr_corpus set (docs/data.md) from the public repositories its films come from.

The corpus's 2,394 films (NIH ChestX-ray14, Kermany paediatric, Hannover COVID-19) were taken from three public
GitHub repositories at fixed commits; ``scripts/data/cxr_corpus_manifest.csv.gz`` names each film's repository,
commit and path there, with its id, split, patient, source and label. Clone the three repositories, then:

    git clone https://github.com/muhammedtalo/COVID-19 src/COVID-19
    git clone https://github.com/lecuong1502/BTL_Machine_Learning src/BTL_Machine_Learning
    git clone https://github.com/ml-workgroup/covid-19-image-repository src/covid-19-image-repository
    python -m scripts.prepare_corpus --sources src --out "$DINO_DIFFUSION_DATA/cxr_corpus"

Each film is read at the manifest's commit (``git show``, so a clone on another branch or a bare mirror serves as
well; a folder that is not a git repository is read as it is), turned grey and shrunk to a longest side of 256 px
with Pillow (JPEG decoded at the nearest DCT scale, aspect kept, Lanczos), and written as ``images/<id>.png``;
``manifest.csv`` comes last, so a folder with a manifest is complete. Films already written are kept: run it
again after an interruption. ``--repo OWNER/NAME=PATH`` names one
repository's folder directly.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import subprocess
import sys
from pathlib import Path

from PIL import Image

from bundle.io import atomic_path, atomic_write

MANIFEST = Path(__file__).resolve().parent / "data" / "cxr_corpus_manifest.csv.gz"
SIDE = 256


def manifest_rows(path: Path = MANIFEST) -> list[dict[str, str]]:
    with gzip.open(path, "rt", newline="") as f:
        return list(csv.DictReader(f))


def shrink(data: bytes, side: int = SIDE) -> Image.Image:
    """A film's bytes as an 8-bit grey image with a longest side of ``side`` (smaller films are kept as they
    are), made as the corpus was: a JPEG decoded at the smallest DCT scale that keeps both sides at least
    ``side``, then grey, then Lanczos to the rounded size that keeps the aspect."""
    image = Image.open(io.BytesIO(data))
    if image.format == "JPEG":
        image.draft("L", (side, side))
    image = image.convert("L")
    scale = side / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.LANCZOS)


class Source:
    """One repository's files at a commit: through ``git show`` in a clone or bare mirror, or from a folder."""

    def __init__(self, repo: str, path: Path, commit: str) -> None:
        self.repo, self.path = repo, path
        probe = subprocess.run(["git", "-C", str(path), "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True)
        self.git = probe.returncode == 0  # the commit is in this clone (not in some repository around the folder)

    def read(self, commit: str, file: str) -> bytes:
        if not self.git:
            if not (self.path / file).is_file():
                raise SystemExit(f"error: {file} is not in {self.path} ({self.repo}, commit {commit[:10]}): clone "
                                 f"https://github.com/{self.repo} there, with its history.")
            return (self.path / file).read_bytes()
        done = subprocess.run(["git", "-C", str(self.path), "show", f"{commit}:{file}"], capture_output=True)
        if done.returncode:
            raise SystemExit(f"error: {file} at commit {commit[:10]} is not in {self.path} ({self.repo}): clone the "
                             f"whole history of https://github.com/{self.repo} (not --depth 1) and run again.")
        return done.stdout


def sources(rows: list[dict[str, str]], folder: str | None, named: list[str]) -> dict[str, Source]:
    paths: dict[str, Path] = {}
    for item in named:
        repo, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --repo {item} is not OWNER/NAME=PATH.")
        paths[repo] = Path(path)
    for repo in sorted({r["repo"] for r in rows}):
        if repo in paths:
            continue
        if folder is None:
            raise SystemExit(f"error: no folder for {repo}: pass --sources (a folder holding its clone) or --repo {repo}=PATH.")
        candidates = [Path(folder) / repo.split("/")[1], Path(folder) / repo.replace("/", "+"), Path(folder) / repo]
        found = next((p for p in candidates if p.is_dir()), None)
        if found is None:
            raise SystemExit(f"error: {repo} is not in {folder} (looked for {', '.join(p.name for p in candidates[:2])}): "
                             f"git clone https://github.com/{repo} {candidates[0]}")
        paths[repo] = found
    for repo, path in paths.items():
        if not path.is_dir():
            raise SystemExit(f"error: {path} (for {repo}) is not a folder.")
    commits = {r["repo"]: r["commit"] for r in rows}
    return {repo: Source(repo, path, commits.get(repo, "HEAD")) for repo, path in paths.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", help="folder holding the clones (each under its repository's name)")
    parser.add_argument("--repo", action="append", default=[], metavar="OWNER/NAME=PATH")
    parser.add_argument("--out", required=True, help="the cxr_corpus folder to write (images/, manifest.csv)")
    parser.add_argument("--ids", nargs="*", help="only these ids (a partial layout, e.g. to check a clone)")
    parser.add_argument("--manifest", default=str(MANIFEST), help="the corpus manifest (default: the one shipped)")
    args = parser.parse_args(argv)
    if not Path(args.manifest).is_file():
        raise SystemExit(f"error: the manifest {args.manifest} does not exist.")
    rows = manifest_rows(Path(args.manifest))
    if args.ids:
        unknown = sorted(set(args.ids) - {r["id"] for r in rows})
        if unknown:
            raise SystemExit(f"error: {', '.join(unknown[:5])} not in the corpus manifest.")
        rows = [r for r in rows if r["id"] in set(args.ids)]
    repos = sources(rows, args.sources, args.repo)
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    written = 0
    for number, row in enumerate(rows, 1):
        target = out / "images" / f"{row['id']}.png"
        if target.is_file():
            continue
        image = shrink(repos[row["repo"]].read(row["commit"], row["original_path"]))
        with atomic_path(target) as tmp:
            image.save(tmp, format="PNG")
        written += 1
        if number % 200 == 0:
            print(f"{number} of {len(rows)} films", file=sys.stderr, flush=True)

    def write_manifest(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(out / "manifest.csv", write_manifest)
    print(f"{len(rows)} films in {out} ({written} written now, {len(rows) - written} already there).")


if __name__ == "__main__":
    main()
