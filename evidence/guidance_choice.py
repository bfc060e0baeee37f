"""The sampling settings a trained generator is evaluated and used with, chosen on validation films from the rows of
``evidence/report_variants.py`` (the guidance stage of ``evidence/run_quality_cpu.sh``):

- the classifier-free guidance scale among ``--scales`` whose samples have the lowest mean of FD / reference FD over
  DINO space and pixels (at the config's sampler steps);
- with ``--fewer_steps K``: K sampler steps at that scale, kept when their mean ratio is within ``--tolerance``
  (default 2%) of the config's steps; ``WORK/guidance.json`` then gets ``guidance_scale`` and ``num_inference_steps``
  (null: the config's).

    python -m evidence.guidance_choice --work_dir runs/corpus_cpu128 --scales "1 1.5 2 3"            # prints the scale
    python -m evidence.guidance_choice --work_dir runs/corpus_cpu128 --scales "1 1.5 2 3" --fewer_steps 10

Only rows of the current model file (``WORK/models/model.pt``, as report_variants names it) count.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bundle.data import file_stamp
from bundle.io import atomic_write_json

FILMS = "every third of cxr_corpus val (44) + JSRT val (20)"


def ratio(row: dict) -> float:
    """Mean of FD / reference FD over DINO space and pixels (lower is better)."""
    return (row["fd_dino"] / row["fd_dino_reference"] + row["fd_pixels"] / row["fd_pixels_reference"]) / 2


def choose(rows: list[dict], model: str, scales: list[float], fewer_steps: int | None = None,
           tolerance: float = 0.02) -> dict:
    """The choice from ``rows`` of ``model``: ``guidance_scale`` (and, given ``fewer_steps``, ``num_inference_steps``:
    ``fewer_steps`` or None), with the rows it was made from. A scale or the fewer-steps row not measured yet is named
    in one sentence."""
    mine = [r for r in rows if r.get("model") == model]
    at_config = {r["guidance_scale"]: r for r in mine if r.get("num_inference_steps") is None}
    missing = [g for g in scales if g not in at_config]
    if missing:
        raise SystemExit(f"guidance scales {missing} have no rows for {model}: run evidence.report_variants with "
                         "--variant guidance_scale=G for each first.")
    variants = [at_config[g] for g in scales]
    if any(r["fd_dino_reference"] <= 0 or r["fd_pixels_reference"] <= 0 for r in variants):
        raise SystemExit("a reference FD is 0: the rows were measured on the training films themselves; measure them on "
                         "validation films (report_variants --real VAL --train TRAIN).")
    best = min(variants, key=ratio)
    out = {"guidance_scale": best["guidance_scale"], "num_inference_steps": None,
           "rule": "lowest mean of FD / reference FD over DINO space and pixels", "films": FILMS, "variants": variants}
    if fewer_steps is not None:
        fewer = [r for r in mine if r["guidance_scale"] == best["guidance_scale"]
                 and r.get("num_inference_steps") == fewer_steps]
        if not fewer:
            raise SystemExit(f"no row at guidance {best['guidance_scale']} with {fewer_steps} sampler steps for {model}: "
                             f"run evidence.report_variants --variant guidance_scale={best['guidance_scale']},"
                             f"num_inference_steps={fewer_steps} first.")
        kept = ratio(fewer[-1]) <= ratio(best) * (1 + tolerance)
        out.update(num_inference_steps=fewer_steps if kept else None, fewer_steps_check=fewer[-1],
                   steps_rule=f"{fewer_steps} steps where their mean ratio is within {tolerance:.0%} of the config's steps")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", type=Path, required=True)
    parser.add_argument("--scales", required=True, help="the guidance scales measured, e.g. '1 1.5 2 3'")
    parser.add_argument("--fewer_steps", type=int, help="also decide on this many sampler steps, and write guidance.json")
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument("--rows", type=Path, help="default: WORK/guidance/variants.jsonl")
    args = parser.parse_args()
    rows_file = args.rows or args.work_dir / "guidance" / "variants.jsonl"
    rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
    model = file_stamp(args.work_dir / "models" / "model.pt")
    choice = choose(rows, model, [float(g) for g in args.scales.split()], args.fewer_steps, args.tolerance)
    if args.fewer_steps is None:
        print(choice["guidance_scale"])
        return
    atomic_write_json(args.work_dir / "guidance.json", choice)
    print("guidance scale", choice["guidance_scale"], "sampler steps", choice["num_inference_steps"] or "the config's",
          {r["guidance_scale"]: round(ratio(r), 3) for r in choice["variants"]},
          f"{args.fewer_steps} steps: {ratio(choice['fewer_steps_check']):.3f}")


if __name__ == "__main__":
    main()
