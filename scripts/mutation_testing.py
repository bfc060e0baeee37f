"""Mutation testing of the modules that carry the bundle's promises: mutmut changes one operator, constant or
call at a time and runs the fast tests that cover it; a mutant the tests do not notice "survives".

    .venv/bin/pip install mutmut==3.8.1
    python scripts/mutation_testing.py --modules io validation checkpoints --out docs/results   (long: minutes per module)

Best on an otherwise idle machine: mutmut stops a mutant's tests after 15 times their time in its first run (a
stopped mutant counts as a timeout, apart from killed and survived), and it is hours of CPU for every module.

Runs on a copy of the tracked files in <work>/src (mutmut writes its mutants/ folder there, and keeps its results
in it: run the same command again to continue an interrupted run), with the real images of ../shared/data linked
in, and writes <out>/tests.json and <out>/tests.md: killed / survived / other
per module and the surviving mutants, so that each can be judged (a missing test, or an equivalent mutant).
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
sys.path.insert(0, str(ROOT))

from bundle.cli import report_json  # noqa: E402
from bundle.io import atomic_write  # noqa: E402

# module -> the fast tests that defend it
TESTS = {
    "io": ["tests/test_io.py", "tests/test_checkpoints.py", "tests/test_data.py", "tests/test_evaluation.py"],
    "validation": ["tests/test_validation.py"],
    "checkpoints": ["tests/test_checkpoints.py"],
    "data": ["tests/test_data.py"],
    "strategies": ["tests/test_strategies.py"],
    "heads/landmarks": ["tests/test_heads.py"],
    "heads/frame": ["tests/test_heads.py"],
    "diffusion": ["tests/test_training.py", "tests/test_sampling.py"],
}
RESULT = re.compile(r"^\s*(bundle[\w.]+__mutmut_\d+): (.+)$")


def prepare(work: Path, modules: list[str], shared: Path) -> Path:
    src = work / "src"
    # a fresh copy of the tracked files, but mutants/ is kept: mutmut re-tests only the functions whose code or
    # tests changed, so an interrupted run continues where it stopped
    if src.exists():
        for entry in src.iterdir():
            if entry.name in ("mutants", "shared"):
                continue
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        target = src / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target, follow_symlinks=True)
    for folder in (work, src):  # tests look for ../shared/data beside the repository (src, and src/mutants)
        link = folder / "shared"
        if not link.exists():
            link.symlink_to(shared.resolve())
    tests = sorted({t for m in modules for t in TESTS[m]})
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
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared", help="the folder holding data/")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--max_children", type=int, help="mutants tested at once (mutmut's default: one per core)")
    args = parser.parse_args()
    mutmut = shutil.which("mutmut", path=str(Path(sys.executable).parent)) or shutil.which("mutmut")
    if not mutmut:
        raise SystemExit("error: mutmut is not installed: pip install mutmut==3.8.1")
    src = prepare(args.work, args.modules, args.shared)
    env = {**os.environ, "PYTHONPATH": ""}
    run = [mutmut, "run"] + ([f"--max-children={args.max_children}"] if args.max_children else [])
    subprocess.run(run, cwd=src, env=env)
    listing = subprocess.run([mutmut, "results", "--all", "true"], cwd=src, env=env, capture_output=True,
                             text=True).stdout
    per_module: dict[str, Counter] = defaultdict(Counter)
    survivors: dict[str, list[str]] = defaultdict(list)
    for line in listing.splitlines():
        m = RESULT.match(line)
        if not m:
            continue
        name, status = m.group(1), m.group(2).strip()
        module = next((mod for mod in args.modules if name.startswith("bundle." + mod.replace("/", ".") + ".")), "other")
        per_module[module][status] += 1
        if status == "survived":
            survivors[module].append(name)
    table = {}
    for module in args.modules:
        c = per_module[module]
        decided = c["killed"] + c["survived"]
        table[module] = {**c, "score": round(c["killed"] / decided, 3) if decided else None}
    result = {"command": "python scripts/mutation_testing.py " + " ".join(sys.argv[1:]), "mutmut": "3.8.1",
              "tests": {m: TESTS[m] for m in args.modules}, "modules": table, "survivors": survivors}
    report_json(result, args.out / "tests.json")
    lines = ["# Mutation testing", "", f"`{result['command']}` (mutmut 3.8.1; each mutant runs the module's fast tests).",
             "", "| module | killed | survived | other | score |", "|---|---|---|---|---|"]
    for module, row in table.items():
        other = sum(v for k, v in row.items() if k not in ("killed", "survived", "score"))
        score = "-" if row["score"] is None else f"{100 * row['score']:.0f}%"
        lines.append(f"| bundle/{module}.py | {row.get('killed', 0)} | {row.get('survived', 0)} | {other} | {score} |")
    lines += ["", "Surviving mutants (inspect with `mutmut show NAME` in runs/mutation/src):", ""]
    lines += [f"- {name}" for module in args.modules for name in survivors[module]]
    text = "\n".join(lines) + "\n"
    atomic_write(args.out / "tests.md", lambda tmp: Path(tmp).write_text(text))
    print(text)


if __name__ == "__main__":
    main()
