"""The heads' fine-tuning recipe from the tune stage of ``evidence/run_heads128.sh``: for each range of labelled films
(up to ``--small_max``, and above) the (iterations, learning rate) with the lowest validation error, per
initialisation, and the entry the heads' configs take as ``head_recipe`` (from the diffusion-pre-trained denoiser,
the initialisation a user's head starts from; where only other initialisations were tuned, the configured recipe of
``configs/heads/landmarks.json`` stays, and every untuned initialisation follows it).

    python -m evidence.heads_tune docs/results/heads128/tune/it400_lr0.001 docs/results/heads128/tune/it400_lr0.0003 \\
        --out docs/results/heads128/tune/recipe.json

Each folder holds the ``heads_results.jsonl`` of one ``evidence/run_heads.py`` run on the validation films. Writes the
choice as JSON and a Markdown table beside it (``recipe.md``); ``--get INIT SIZE KEY`` prints one chosen value (for
shell scripts): the initialisation's own choice where it was tuned, else the recipe's.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from bundle.heads.training import recipe_setting
from bundle.io import atomic_write, atomic_write_json

RECIPE_INIT = "pretrained"
ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/heads/landmarks.json"  # the recipe the heads follow, and every untuned initialisation here


def read_runs(folders: list[Path], task: str = "landmarks") -> list[dict]:
    rows = []
    for folder in folders:
        path = folder / "heads_results.jsonl"
        if not path.exists():
            raise SystemExit(f"{path} does not exist: run the tune stage (STAGES=tune bash evidence/run_heads128.sh) "
                             "first, or name the folders it wrote.")
        rows += [r for r in map(json.loads, path.read_text().splitlines()) if r["task"] == task]
    if not rows:
        raise SystemExit(f"no {task} runs in {', '.join(map(str, folders))}: the tune stage has not finished a run yet.")
    return rows


def choose(rows: list[dict], small_max: int, key: str = "mre_px") -> dict:
    """Per initialisation and range ('small': N <= small_max, 'large': above), the setting with the lowest mean
    ``key`` over that range's tuned sizes (only settings run at every such size compete), and the resulting recipe."""
    by = defaultdict(dict)  # (init, range) -> {(iterations, lr): {size: value}}
    for r in rows:
        span = "small" if r["size"] <= small_max else "large"
        by[(r["init"], span)].setdefault((r["iterations"], r["lr"]), {})[r["size"]] = r[key]
    per_init: dict = defaultdict(dict)
    for (init, span), settings in sorted(by.items()):
        sizes = set().union(*(s.keys() for s in settings.values()))
        complete = {k: v for k, v in settings.items() if set(v) == sizes}
        if not complete:
            continue
        (iterations, lr), values = min(complete.items(), key=lambda kv: sum(kv[1].values()) / len(kv[1]))
        per_init[init][span] = {"iterations": iterations, "lr": lr, "sizes": sorted(sizes),
                                key: round(sum(values.values()) / len(values), 3),
                                "candidates": [{"iterations": i, "lr": l, **{f"n{n}": round(v, 3) for n, v in sorted(vals.items())}}
                                               for (i, l), vals in sorted(complete.items())]}
    if not per_init:
        raise SystemExit("no setting was run at every tuned size: finish the tune stage first.")
    if RECIPE_INIT in per_init:
        chosen, recipe_from = per_init[RECIPE_INIT], RECIPE_INIT
        recipe = []
        for span, up_to in (("small", small_max), ("large", None)):
            pick = chosen.get(span) or chosen.get("large" if span == "small" else "small")
            recipe.append({"up_to": up_to, "lr": pick["lr"], "iterations": pick["iterations"]})
    else:  # the denoiser was not tuned in these runs (only a baseline was): the heads' configured recipe stands
        recipe_from, recipe = CONFIG, json.loads((ROOT / CONFIG).read_text())["head_recipe"]
    return {"metric": key, "small_max": small_max, "recipe_from": recipe_from, "head_recipe": recipe,
            "per_init": dict(per_init)}


def setting(choice: dict, init: str, size: int, key: str):
    """``key`` (lr or iterations) for ``init`` at ``size`` films: its own tuned choice, else the recipe's."""
    span = "small" if size <= choice["small_max"] else "large"
    own = choice["per_init"].get(init, {}).get(span)
    if own is not None:
        return own[key]
    return recipe_setting(choice["head_recipe"], size, key)


def markdown(choice: dict) -> str:
    metric = choice["metric"]
    lines = [f"Fine-tuning settings on the validation films ({metric}, lower is better; chosen per range of N, "
             f"N <= {choice['small_max']} and above):", "",
             "| initialisation | range | iterations | lr | per tuned N | chosen |",
             "|---|---|---|---|---|---|"]
    for init, spans in choice["per_init"].items():
        for span, c in spans.items():
            for cand in c["candidates"]:
                per_n = ", ".join(f"N = {k[1:]}: {v:.2f}" for k, v in cand.items() if k.startswith("n"))
                mark = "yes" if (cand["iterations"], cand["lr"]) == (c["iterations"], c["lr"]) else ""
                lines.append(f"| {init} | {span} | {cand['iterations']} | {cand['lr']:g} | {per_n} | {mark} |")
    lines += ["", f"`head_recipe` (from the {choice['recipe_from']} initialisation): `{json.dumps(choice['head_recipe'])}`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", type=Path, nargs="*", help="the tune stage's run folders")
    parser.add_argument("--small_max", type=int, default=10, help="the largest N of the 'small' range")
    parser.add_argument("--out", type=Path, help="recipe.json to write (recipe.md beside it)")
    parser.add_argument("--get", nargs=3, metavar=("INIT", "SIZE", "KEY"), help="print one setting of --out's recipe")
    args = parser.parse_args()
    if args.get:
        if args.out is None or not args.out.exists():
            raise SystemExit(f"--get reads a recipe written before: {args.out} does not exist.")
        init, size, key = args.get
        print(setting(json.loads(args.out.read_text()), init, int(size), key))
        return
    choice = choose(read_runs(args.folders), args.small_max)
    text = markdown(choice)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out.with_suffix(".md"), lambda tmp: Path(tmp).write_text(text))
        atomic_write_json(args.out, choice)


if __name__ == "__main__":
    main()
