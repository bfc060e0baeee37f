"""What the command-line scripts in ``scripts/`` share: bundle overrides read from their command line, a
config workflow built as ``python -m monai.bundle run`` builds it, and the JSRT datalist rows.

The tools run as modules from the bundle root (``python -m scripts.jsrt_datalist``, ``python -m evidence.NAME``,
``python -m devtools.NAME``), so ``bundle`` imports without any ``sys.path`` patching.
"""

from __future__ import annotations

import ast
import csv
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from monai.bundle import ConfigWorkflow

from .constants import JSRT_STRUCTURES, MASK_COLUMN_PREFIX
from .errors import BundleInputError
from .io import atomic_write
from .performance import set_threads

REPO_ROOT = Path(__file__).resolve().parents[1]
JSRT_SPLITS = ("train", "val", "test", "all")
# the one setting that tells every script where the public data sets lie (docs/data.md): one folder holding
# jsrt/, cxr_corpus/, ct/, mri/, each laid out as docs/data.md says
DATA_ENV = "DINO_DIFFUSION_DATA"


def data_folder(name: str, given: str | os.PathLike | None = None) -> Path:
    """The folder of the data set ``name`` (``jsrt``, ``cxr_corpus``, ...): ``given`` (a script's own option) or
    ``$DINO_DIFFUSION_DATA/<name>``; one sentence naming both when neither gives an existing folder."""
    if given is not None:
        folder = Path(given)
    elif os.environ.get(DATA_ENV):
        folder = Path(os.environ[DATA_ENV]) / name
    else:
        raise BundleInputError(f"Where is the {name} data set? Set {DATA_ENV} to the folder that holds {name}/ (or pass "
                               f"the script its folder); docs/data.md says where to get it and how to lay it out.")
    if not folder.is_dir():
        raise BundleInputError(f"The {name} folder '{folder}' does not exist: set {DATA_ENV} to the folder that holds "
                               f"{name}/ (or pass the script its folder); docs/data.md says where to get it.")
    return folder


def parse_overrides(tokens: Sequence[str]) -> dict[str, Any]:
    """``--key value`` pairs as the monai.bundle command line reads them (values parsed as Python literals);
    a ``--`` separating them from the script's own options is skipped."""
    tokens = [t for t in tokens if t != "--"]
    out = {}
    for key, value in zip(tokens[::2], tokens[1::2]):
        try:
            out[key.lstrip("-")] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.lstrip("-")] = value
    return out


def config_workflow(config_file: str | Sequence[str], run_id: str, **overrides: Any) -> ConfigWorkflow:
    """An initialised workflow of ``config_file`` (relative to the repository root, the working directory the
    configs expect) for ``run_id``, exactly as ``python -m monai.bundle run`` builds it, without a log file.

    MONAI's notes on building it ("No workflow type ... default to 'meta' properties", "Logging file is set to
    False") say what is asked here on purpose, so they are switched off for the construction alone. The config's
    ``torch_threads`` is applied at once, since callers use its parts without its run list (which would set it)."""
    notes = logging.getLogger("monai.bundle.workflows")
    level = notes.level
    notes.setLevel(logging.ERROR)
    try:
        wf = ConfigWorkflow(config_file=config_file, workflow_type=None, run_id=run_id, logging_file=False, **overrides)
    finally:
        notes.setLevel(level)
    wf.initialize()
    if "torch_threads" in wf.parser.config:  # a caller that runs parts of the config, not its run list, still gets them
        set_threads(wf.parser.get_parsed_content("torch_threads"))
    return wf


def jsrt_rows(root: str | Path, split: str) -> list[dict[str, str]]:
    """Datalist rows of one JSRT split (or ``all``): the manifest's columns, ``image``, ``landmark_file`` and
    one ``mask_<structure>`` column per structure (empty where a file is missing)."""
    root = Path(root)
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        raise BundleInputError(f"{manifest} does not exist: pass --root to the JSRT folder (with manifest.csv and images/).")
    with open(manifest, newline="") as f:
        rows = [r for r in csv.DictReader(f) if split in ("all", r["split"])]
    if not rows:
        raise BundleInputError(f"No rows with split '{split}' in {manifest}: use one of {', '.join(JSRT_SPLITS)}.")
    out = []
    for r in rows:
        row = {"image": str((root / "images" / f"{r['id']}.png").resolve()), **r}
        landmarks = root / "landmarks" / f"{r['id']}.json"
        row["landmark_file"] = str(landmarks.resolve()) if landmarks.is_file() else ""
        for structure in JSRT_STRUCTURES:
            mask = root / "masks" / structure / f"{r['id']}.png"
            row[MASK_COLUMN_PREFIX + structure] = str(mask.resolve()) if mask.is_file() else ""
        out.append(row)
    return out


def pyplot():
    """matplotlib's ``pyplot`` on the file-only Agg backend (scripts run without a display); imported on first
    use, as only the scripts' report steps draw and matplotlib is slow to import."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def report_json(result: dict, path: str | os.PathLike | None = None) -> None:
    """Print ``result`` as indented JSON and, when ``path`` is given, write the same text there (atomically)."""
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))
