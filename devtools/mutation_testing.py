"""Mutation testing of the modules that carry the bundle's promises: mutmut changes one operator, constant or
call at a time and runs the fast tests that cover it; a mutant the tests do not notice "survives".

    .venv/bin/pip install mutmut==3.8.1
    python -m devtools.mutation_testing --modules io validation checkpoints --out docs/results   (long: minutes per module)

Best on an otherwise idle machine: mutmut stops a mutant's tests after 15 times their time in its first run (a
stopped mutant counts as a timeout, apart from killed and survived). Minutes to an hour per module on two cores
(docs/results/tests.md); longer where the covering tests train and sample networks.

Runs on a copy of the tracked files in <work>/src (mutmut writes its mutants/ folder there, and keeps its results
in it: run the same command again to continue an interrupted run), its tests finding the real images through
$DINO_DIFFUSION_DATA (--data), and writes <out>/mutation.json (killed / survived / other per module, and each surviving mutant's changed line,
so that each can be judged: a missing test, or an equivalent mutant) and <out>/mutation_table.md. Modules measured
by an earlier run are kept there, this run's replace theirs. docs/results/tests.md reads them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from bundle.cli import DATA_ENV, report_json
from bundle.io import atomic_write

# module -> the fast tests that defend it
TESTS = {
    "io": ["tests/test_io.py", "tests/test_checkpoints.py", "tests/test_data.py", "tests/test_evaluation.py"],
    "validation": ["tests/test_validation.py"],
    "checkpoints": ["tests/test_checkpoints.py"],
    "data": ["tests/test_data.py", "tests/test_data_cache.py", "tests/test_volumes.py"],
    "cache": ["tests/test_data_cache.py"],
    "strategies": ["tests/test_strategies.py"],
    "heads/landmarks": ["tests/test_heads.py"],
    "heads/frame": ["tests/test_heads.py"],
    "diffusion": ["tests/test_diffusion.py", "tests/test_training.py", "tests/test_sampling.py",
                  "tests/test_strategies.py", "tests/test_performance.py"],
}
# modules whose covering files also hold tests that train a tiny pipeline through the configs (tens of seconds per
# mutant): their mutants are run against the fast tests only (pytest -m "not pipeline", tests/conftest.py)
FAST_ONLY = {"strategies", "diffusion"}
RESULT = re.compile(r"^\s*(bundle[\w.]+__mutmut_\d+): (.+)$")


def prepare(work: Path, modules: list[str]) -> Path:
    src = work / "src"
    # a fresh copy of the tracked files, but mutants/ is kept: mutmut keeps each verdict until the mutated function
    # changes, so an interrupted run continues where it stopped (--retest_survivors after adding tests)
    if src.exists():
        for entry in src.iterdir():
            if entry.name == "mutants":
                continue
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        target = src / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target, follow_symlinks=True)
    tests = sorted({t for m in modules for t in TESTS[m]})
    if FAST_ONLY & set(modules):
        tests += ["-m", "not pipeline"]
    config = ["[mutmut]", "source_paths=bundle",
              "only_mutate=" + "\n    ".join(f"bundle/{m}.py" for m in modules),
              "pytest_add_cli_args_test_selection=" + "\n    ".join(tests),
              "pytest_add_cli_args=-q\n    -p\n    no:cacheprovider",
              "also_copy=configs\n    scripts\n    tests\n    pytest.ini\n    bundle/default_data"]
    (src / "setup.cfg").write_text("\n".join(config) + "\n")
    return src


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modules", nargs="+", default=list(TESTS), choices=list(TESTS))
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "mutation")
    parser.add_argument("--data", type=Path, default=None,
                        help="the data folder the tests read (default: $DINO_DIFFUSION_DATA; docs/data.md)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--retest_survivors", action="store_true",
                        help="test the mutants that survived the last run again (after tests were added for them)")
    parser.add_argument("--max_children", type=int, help="mutants tested at once (mutmut's default: one per core)")
    args = parser.parse_args()
    mutmut = shutil.which("mutmut", path=str(Path(sys.executable).parent)) or shutil.which("mutmut")
    if not mutmut:
        raise SystemExit("error: mutmut is not installed: pip install mutmut==3.8.1")
    data = args.data or os.environ.get(DATA_ENV)
    if not data or not Path(data).is_dir():
        raise SystemExit(f"error: the tests need the real images: pass --data or set {DATA_ENV} to the data folder.")
    src = prepare(args.work, args.modules)
    env = {**os.environ, "PYTHONPATH": "", DATA_ENV: str(Path(data).resolve())}
    run = [mutmut, "run"] + ([f"--max-children={args.max_children}"] if args.max_children else [])

    def statuses() -> list[tuple[str, str]]:
        """(mutant, status) of every mutant mutmut knows."""
        listing = subprocess.run([mutmut, "results", "--all", "true"], cwd=src, env=env, capture_output=True,
                                 text=True).stdout
        return [(m.group(1), m.group(2).strip()) for line in listing.splitlines() if (m := RESULT.match(line))]

    if args.retest_survivors:  # mutmut keeps a verdict until the function changes, not when a test is added
        survived = [name for name, status in statuses() if status == "survived"]
        if survived:
            subprocess.run(run + survived, cwd=src, env=env)
    subprocess.run(run, cwd=src, env=env)
    per_module: dict[str, Counter] = defaultdict(Counter)
    survivors: dict[str, list[str]] = defaultdict(list)
    for name, status in statuses():
        module = next((mod for mod in args.modules if name.startswith("bundle." + mod.replace("/", ".") + ".")), "other")
        per_module[module][status] += 1
        if status == "survived":
            survivors[module].append(name)
    table = {}
    for module in args.modules:
        c = per_module[module]
        decided = c["killed"] + c["survived"]
        table[module] = {**c, "score": round(c["killed"] / decided, 3) if decided else None}
    changes = {module: {name: diff(mutmut, src, env, name) for name in survivors[module]} for module in args.modules}
    # modules of earlier runs (another --work) are kept, this run's replace theirs; read just before writing, so
    # that a run finishing meanwhile is not overwritten
    path = args.out / "mutation.json"
    result = json.loads(path.read_text()) if path.exists() else {"mutmut": "3.8.1", "runs": {}, "modules": {},
                                                                   "survivors": {}}
    command = "python -m devtools.mutation_testing " + " ".join(sys.argv[1:])
    for module in args.modules:
        result["runs"][module] = command
        result["modules"][module] = {**table[module], "tests": TESTS[module], "fast_only": module in FAST_ONLY}
        result["survivors"][module] = changes[module]
    report_json(result, path)
    lines = ["| module | tests run for its mutants | killed | survived | other | score |", "|---|---|---|---|---|---|"]
    for module, row in result["modules"].items():
        other = sum(v for k, v in row.items() if k not in ("killed", "survived", "score", "tests", "fast_only"))
        score = "-" if row["score"] is None else f"{100 * row['score']:.0f}%"
        tests = ", ".join(Path(t).name for t in row["tests"]) + (" (not pipeline)" if row.get("fast_only") else "")
        lines.append(f"| bundle/{module}.py | {tests} | {row.get('killed', 0)} | {row.get('survived', 0)} | {other} "
                     f"| {score} |")
    text = "\n".join(lines) + "\n"
    atomic_write(args.out / "mutation_table.md", lambda tmp: Path(tmp).write_text(text))
    print(text)
    for module in args.modules:
        for name, change in result["survivors"][module].items():
            print(f"{name}: {change}")


def diff(mutmut: str, src: Path, env: dict, name: str) -> str:
    """The changed line of a mutant, as ``old | new``."""
    shown = subprocess.run([mutmut, "show", name], cwd=src, env=env, capture_output=True, text=True).stdout
    changed = [line[1:].strip() for line in shown.splitlines() if line[:1] in "-+" and line[:3] not in ("---", "+++")]
    return " | ".join(changed[:2])


if __name__ == "__main__":
    main()
