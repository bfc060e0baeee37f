"""Does synthetic data help a downstream classifier? A command-line front for the run ID ``augment`` of
configs/augmentation.json (an overlay for configs/inference.json; bundle/augmentation.py holds the experiment).

    python -m scripts.augmentation_experiment --train runs/jsrt/train.csv --test runs/jsrt/test.csv \\
        --label nodule --sizes 10 25 50 --ratios 1 5 --folds 3 --out runs/augmentation/nodule \\
        -- --work_dir runs/corpus_cpu128          (the work dir of the trained generator, and any other override)
    python -m scripts.augmentation_experiment --train runs/kermany/train.csv --test runs/kermany/test.csv \\
        --label label --positive pneumonia --per_class --sizes 5 10 25 --arms real real+classic real+synthetic \\
        real+concept --concept_tokens 8 --out runs/showdown/kermany -- --work_dir runs/corpus_cpu128

is the same as ``python -m monai.bundle run augment --config_file "['configs/inference.json',
'configs/augmentation.json']" --labelled_list ... --test_list ... --label ... --augmentation_dir ...``; settings left
out keep the config's values. Run the same command again to continue an interrupted experiment.
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from bundle.augmentation import ARM_ORDER, _done, write_report
from bundle.cli import config_workflow, parse_overrides

CONFIGS = ["configs/inference.json", "configs/augmentation.json"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, required=True, help="labelled training datalist (the pool to draw from)")
    parser.add_argument("--test", type=Path, required=True, help="labelled real test datalist")
    parser.add_argument("--label", required=True, help="label column, e.g. nodule or sex")
    parser.add_argument("--positive", help="value of the positive class when the column is not 0/1 (e.g. M)")
    parser.add_argument("--sizes", type=int, nargs="+", help="pool sizes N (default: the config's)")
    parser.add_argument("--ratios", type=float, nargs="+", help="synthetic images per real one (default: the config's)")
    parser.add_argument("--folds", help="folds: a number, or a mapping such as \"{25: 5, 100: 3}\" (default: the config's)")
    parser.add_argument("--arms", nargs="+", choices=ARM_ORDER, help="the arms to train (default: the config's)")
    parser.add_argument("--classic", action="store_true", help="add real + classic augmentation and real + synthetic + "
                        "classic augmentation to the arms")
    parser.add_argument("--strategy", help="sampling strategy or mix as a Python literal (default: the config's)")
    parser.add_argument("--iterations", type=int, help="classifier iterations (default: the config's)")
    parser.add_argument("--per_class", action="store_true", help="N images of each class (default: N in all)")
    parser.add_argument("--concept_tokens", type=int, help="tokens of the concept learned per class and fold for the "
                        "concept arms (configs/concept.json)")
    parser.add_argument("--concept_steps", type=int)
    parser.add_argument("--concept_init", choices=["mean", "random"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--copy_to", type=Path, help="also copy results.md/png/jsonl there (e.g. docs/results)")
    parser.add_argument("--report_only", action="store_true", help="train nothing: write results.md and the plot "
                        "from every arm in <out>/results.jsonl (e.g. while a run is still adding arms)")
    parser.add_argument("overrides", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    os.chdir(ROOT)
    if args.report_only:
        records = list(_done(args.out / "results.jsonl").values())
        if not records:
            raise SystemExit(f"error: no results in {args.out / 'results.jsonl'}: run the experiment first.")
        write_report(records, args.out, args.label)
        print((args.out / "results.md").read_text())
        return
    settings = {"labelled_list": str(args.train), "test_list": str(args.test), "label": args.label,
                "positive": args.positive, "augmentation_dir": str(args.out), "per_class": args.per_class,
                "pool_sizes": args.sizes, "ratios": args.ratios, "classifier_iterations": args.iterations,
                "augmentation_concept_tokens": args.concept_tokens, "augmentation_concept_steps": args.concept_steps,
                "augmentation_concept_init": args.concept_init}
    if args.folds is not None:
        settings["folds"] = ast.literal_eval(args.folds)
    if args.strategy is not None:
        settings["synthetic_strategy"] = ast.literal_eval(args.strategy) if args.strategy.strip().startswith("{") \
            else args.strategy
    if args.arms or args.classic:
        arms = list(args.arms or ["real", "real+synthetic"])
        settings["arms"] = arms + [a for a in ("real+classic", "classic+synthetic") if args.classic and a not in arms]
    settings = {k: v for k, v in settings.items() if v is not None}
    start = time.perf_counter()
    config_workflow(CONFIGS, "augment", **{**settings, **parse_overrides(args.overrides)}).run()
    print(f"wall time {time.perf_counter() - start:.0f} s (this invocation)")
    print((args.out / "results.md").read_text())
    if args.copy_to:
        args.copy_to.mkdir(parents=True, exist_ok=True)
        for name in ("results.md", "augmentation_auc.png", "results.jsonl", "summary.json"):
            shutil.copy(args.out / name, args.copy_to / f"augmentation_{args.label}_{name}".replace("_augmentation_auc", ""))


if __name__ == "__main__":
    main()
