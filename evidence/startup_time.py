"""Start-up time of the light run IDs against MONAI's own import, measured side by side.

    python -m evidence.startup_time --concept PATH/TO/concept.safetensors --repeats 3 --out docs/results/startup.json

Runs, in turn and ``--repeats`` times, ``python -c "import monai.bundle"`` (the floor every ``monai.bundle run`` pays),
``python -m monai.bundle run list_concepts`` and ``python -m monai.bundle run inspect_concept``, each in a fresh
process, and writes the wall times and the ratio of each run ID's median to the import's median. Alternating the
commands keeps a busy machine's load the same for all of them, so the ratios count even where the seconds do not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bundle.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]


def commands(concept: Path, concept_dir: Path) -> dict[str, list[str]]:
    run = [sys.executable, "-m", "monai.bundle", "run"]
    return {
        "import monai.bundle": [sys.executable, "-c", "import monai.bundle"],
        "list_concepts": [*run, "list_concepts", "--config_file", "configs/concept.json", "--concept_dir", str(concept_dir)],
        "inspect_concept": [*run, "inspect_concept", "--config_file", "configs/concept.json", "--concept_path", str(concept)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept", type=Path, required=True, help="a learned concept file (.safetensors)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results/startup.json")
    args = parser.parse_args()
    if not args.concept.is_file():
        parser.error(f"--concept '{args.concept}' is not a file: pass a concept learned with run learn_concept.")
    todo = commands(args.concept.resolve(), args.concept.resolve().parent)
    seconds: dict[str, list[float]] = {name: [] for name in todo}
    for _ in range(args.repeats):
        for name, command in todo.items():
            start = time.perf_counter()
            subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
            seconds[name].append(round(time.perf_counter() - start, 2))
    floor = statistics.median(seconds["import monai.bundle"])
    result = {"command": " ".join(["python -m evidence.startup_time", *sys.argv[1:]]),
              "seconds": seconds,
              "ratio_to_import_monai_bundle": {name: round(statistics.median(s) / floor, 2)
                                                for name, s in seconds.items() if name != "import monai.bundle"}}
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
