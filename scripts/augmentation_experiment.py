"""The synthetic-augmentation experiment: a fixed classifier trained on N real images plus synthetic images
made from only those N, at several real:synthetic ratios and folds, scored by AUC on a fixed real test set.

    python scripts/augmentation_experiment.py --train runs/foundation/train.csv --test runs/foundation/test.csv \\
        --label nodule --sizes 10 25 50 150 --ratios 0 1 5 --folds 3 --out runs/augmentation/nodule \\
        -- --work_dir runs/foundation_dino ... (the overrides the generator was trained with)

Interrupted runs continue (results.jsonl and the synthetic images are kept in --out).
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from evaluate_foundation import parse_overrides  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, required=True, help="labelled training datalist (the pool to draw from)")
    parser.add_argument("--test", type=Path, required=True, help="labelled real test datalist")
    parser.add_argument("--label", required=True, help="label column, e.g. nodule or sex")
    parser.add_argument("--positive", help="value of the positive class when the column is not 0/1 (e.g. M)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0, 1, 5, 10])
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--no_synthetic_only", action="store_true")
    parser.add_argument("--strategy", default="{'reconstruction': 1, 'interpolation': 1, 'perturbation': 1}",
                        help="sampling strategy or mix (Python literal)")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--copy_to", type=Path, help="also copy results.md/png there (e.g. docs/results)")
    parser.add_argument("overrides", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    overrides = parse_overrides([t for t in args.overrides if t != "--"])
    os.chdir(ROOT)

    from monai.bundle import ConfigWorkflow

    from bundle.augmentation import run_experiment
    from bundle.data import read_datalist

    wf = ConfigWorkflow(config_file="configs/inference.json", workflow_type=None, run_id="sample", logging_file=False,
                        **overrides)
    wf.initialize()
    strategy = ast.literal_eval(args.strategy) if args.strategy.strip().startswith("{") else args.strategy
    start = time.perf_counter()
    run_experiment(wf.parser.get_parsed_content("generation"), read_datalist(args.train), read_datalist(args.test),
                   wf.parser.get_parsed_content("preprocessing"), args.label, args.out, positive=args.positive,
                   sizes=args.sizes, ratios=args.ratios, folds=args.folds, synthetic_only=not args.no_synthetic_only,
                   strategy=strategy, iterations=args.iterations, device=wf.parser.get_parsed_content("device"))
    print(f"wall time {time.perf_counter() - start:.0f} s (this invocation)")
    print((args.out / "results.md").read_text())
    if args.copy_to:
        args.copy_to.mkdir(parents=True, exist_ok=True)
        for name in ("results.md", "augmentation_auc.png", "results.jsonl"):
            shutil.copy(args.out / name, args.copy_to / f"augmentation_{args.label}_{name}".replace("_augmentation_auc", ""))


if __name__ == "__main__":
    main()
