"""README command 1's code path: no --dataset_dir, no internet, default DINO weights 'auto', a time budget; it
trains on the radiographs that ship with the bundle and ends with a report."""

from __future__ import annotations

import json
import logging
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from PIL import Image

import bundle.dino
from bundle.dino import plan_weights
from bundle.errors import BundleInputError
from bundle.model_files import read_record, recorded_path
from bundle.models import model_path
from bundle.workflow import TimeBudget, load_profile, preflight, stage_seconds

from .conftest import ROOT, run_bundle, tiny_settings


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub weights in the cache and no answer from the hub, as on a hospital machine."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(bundle.dino, "_reachable", lambda *args, **kwargs: False)


def test_first_command_offline_on_the_default_images_ends_with_a_report(tmp_path, offline, caplog, capsys):
    settings = tiny_settings(tmp_path / "work", "")
    del settings["dataset_dir"], settings["dino_weights"]  # the defaults: bundled images, DINO 'auto'
    settings.update(time_budget_minutes=0.4, ae_epochs=50, diffusion_epochs=50, dino_epochs=50, ae_batch_size=32,
                    diffusion_batch_size=64, dino_batch_size=64, num_local_crops=2, report_count=8)
    with caplog.at_level(logging.INFO):
        run_bundle("train.json", "training", settings)
    work = tmp_path / "work"
    assert "pre-training vit_tiny_patch16_224 on the training images first, because the hub cannot be reached" in caplog.text
    dino = read_record(work / "models/model.pt", "diffusion", "x")["record"]["dino"]
    assert dino["weights"] == "models/dino/teacher.safetensors"  # relative to the work dir: it can be moved
    assert Path(recorded_path(dino["weights"], work / "models/model.pt")).resolve() == Path(model_path(work, "dino")).resolve()
    # the budget, not the 50 epochs, ended each stage
    for stage in ("dino", "autoencoder", "diffusion"):
        epochs = [int(p.stem.split("=")[-1]) for p in (work / "models/checkpoints" / stage).glob("*.pt")]
        assert epochs and max(epochs) < 50, (stage, epochs)
    grid = Image.open(work / "report/samples_grid.png")
    assert grid.size[0] > 4 * 128 and grid.size[1] > 2 * 128
    evaluation = json.loads((work / "report/evaluation.json").read_text())
    assert evaluation["counts"] == {"generated": 8, "real": 8, "train": 8}
    assert "bundle/default_data/nih_cxr/val" in evaluation["real"]
    for space in ("dino", "pixels"):
        entry = evaluation["feature_spaces"][space]
        assert entry["frechet_distance"] > 0 and entry["frechet_distance_train_reference"] > 0
    assert 0 < evaluation["reconstruction"]["psnr_db"]["mean"] < 60
    # a log that is a file says where each stage starts, in order (what devtools/fault_injection.py aims kills by)

    from devtools import fault_injection

    starts = [next(i for i, m in enumerate(caplog.messages) if marker in m) for marker in fault_injection.MARKERS.values()]
    assert starts == sorted(starts), dict(zip(fault_injection.MARKERS, starts))
    # a quiet log: one line per epoch (the bundle's, with its time), no engine or MONAI note repeating it
    epochs = [m for m in caplog.messages if " epoch " in m and " iterations in " in m]
    assert len(epochs) == sum(len(list((work / "models/checkpoints" / s).glob("*.pt"))) and
                              max(int(p.stem.split("=")[-1]) for p in (work / "models/checkpoints" / s).glob("*.pt"))
                              for s in ("dino", "autoencoder", "diffusion")), epochs
    repeats = [m for m in caplog.messages if m.startswith(("Epoch[", "Key metric", "Got new best", "Engine run"))]
    assert not repeats, repeats[:5]
    for note in ("No workflow type", "Logging file is set"):  # MONAI's, once for the run itself, not per inner config
        assert sum(m.startswith(note) for m in caplog.messages) <= 1, note
    assert len(caplog.messages) < 60 + len(epochs), len(caplog.messages)
    assert "guidance scale 1)" in capsys.readouterr().out  # the report's samples: no guidance for a 20-minute model


def test_dino_weights_auto_prefers_what_can_be_had(tmp_path, monkeypatch):
    target = tmp_path / "models/dino.pt"
    monkeypatch.setattr(bundle.dino, "_hub_cached", lambda hub_id: False)
    monkeypatch.setattr(bundle.dino, "_reachable", lambda *a, **k: False)
    plan = plan_weights("auto", "vit_small_patch14_dinov2.lvd142m", target)
    assert plan.pretrain and plan.weights == str(target) and "cannot be reached" in plan.reason
    monkeypatch.setattr(bundle.dino, "_reachable", lambda *a, **k: True)
    assert plan_weights("auto", "vit_small_patch14_dinov2.lvd142m", target)[:2] == ("hub", False)
    monkeypatch.setattr(bundle.dino, "_reachable", lambda *a, **k: False)
    monkeypatch.setattr(bundle.dino, "_hub_cached", lambda hub_id: hub_id == "timm/vit_small_patch14_dinov2.lvd142m")
    plan = plan_weights("auto", "vit_small_patch14_dinov2.lvd142m", target)
    assert plan[:2] == ("hub", False) and "local cache" in plan.reason
    target.parent.mkdir(parents=True)
    target.write_bytes(b"x")  # an in-domain DINO already trained here wins: a re-run must not switch condition
    assert plan_weights("auto", "vit_small_patch14_dinov2.lvd142m", target)[:2] == (str(target), True)
    assert plan_weights("pretrain", "m", target)[:2] == (str(target), True)
    assert plan_weights("random", "m", target)[:2] == ("random", False)


def test_profiles_follow_the_device_and_name_what_is_missing(tmp_path):
    assert load_profile(ROOT, "auto", "cpu")["image_size"] == 64
    assert load_profile(ROOT, "auto", torch.device("cuda", 0))["image_size"] == 128
    cpu, *others = (json.loads((ROOT / f"configs/profiles/{n}.json").read_text())
                    for n in ("cpu64", "cpu128", "gpu128", "gpu256"))
    for other in others:
        assert set(cpu) == set(other) - {"sample_batch_size"}, "every profile sets the same keys"
    with pytest.raises(BundleInputError, match=r"profile 'gpu512' is not one of \['cpu128', 'cpu64', 'gpu128', 'gpu256', 'auto'\]"):
        load_profile(ROOT, "gpu512")
    (tmp_path / "configs/profiles").mkdir(parents=True)
    (tmp_path / "configs/profiles/mine.json").write_text('{"image_size": 96}')
    profile = load_profile(tmp_path, "mine")
    with pytest.raises(BundleInputError, match="mine.json' does not set 'unet_channels'"):
        profile["unet_channels"]


def test_time_budget_plans_the_epochs_that_fit():
    import time

    engine = Engine(lambda engine, batch: time.sleep(0.02))
    TimeBudget(0.3).attach(engine)
    epochs = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: epochs.append(e.state.max_epochs))
    engine.run(range(5), max_epochs=1000)  # 0.1 s per epoch
    assert 2 <= engine.state.epoch <= 4 and engine.state.max_epochs == engine.state.epoch
    assert stage_seconds(10, "autoencoder", False) == pytest.approx(210.0)
    assert stage_seconds(None, "diffusion") is None
    with pytest.raises(BundleInputError, match="--time_budget_minutes -1 must be above 0"):
        stage_seconds(-1, "dino", True)


def test_preflight_refuses_a_work_dir_without_room(tmp_path, monkeypatch):
    import shutil

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 10**6, 10**6))
    plan = bundle.dino.WeightsPlan("random", False, "DINO: random")
    net = lambda: torch.nn.Linear(1000, 1000)  # noqa: E731: 4 MB of weights, 16 MB a checkpoint
    with pytest.raises(BundleInputError, match=r"work_dir '.*' has 0.00 GB free, and this run needs about 0.0[34] GB"):
        preflight([{"image": "x.png"}], plan, "m", work_dir=tmp_path, networks=[net])
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 0, 10**12))
    preflight([{"image": "x.png"}], plan, "m", work_dir=tmp_path, networks=[net], image_sizes=[64])


def test_every_default_output_folder_is_ignored_by_git():
    """Run IDs write under work_dir, which is the repository itself by default: none of it may show as a change."""
    import re
    import shutil
    import subprocess

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    texts = [p.read_text() for p in (ROOT / "configs").rglob("*.json")]
    texts += [p.read_text() for p in (ROOT / "apps").rglob("*.json")]
    folders = sorted({m for text in texts for m in re.findall(r"@work_dir \+ '/([A-Za-z_]+)", text)})
    assert {"samples", "interpolation", "concepts", "models"} <= set(folders), folders
    shown = subprocess.run(["git", "check-ignore", "--no-index", *(f"{f}/x" for f in folders)], cwd=ROOT,
                           capture_output=True, text=True).stdout.split()
    assert sorted(s[:-2] for s in shown) == folders, "default output folders not ignored by git"


def test_the_bundle_package_imports_in_one_direction():
    """No import circle among bundle's modules, counting imports inside functions too (a circle there works only
    by the order in which modules happen to load)."""
    import ast

    modules = {}
    for path in (ROOT / "bundle").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [node.module or ""])
                base = base.rstrip(".")
                edges |= {m for m in [base, *(f"{base}.{a.name}" for a in node.names)] if m in modules}
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                edges |= {n for n in names if n in modules}
        graph[name] = edges - {name, "bundle"}  # the package's __init__ re-exports; that is not a dependency
    assert {"bundle.autoencoder", "bundle.models", "bundle.sampling"} <= set(graph) and graph["bundle.sampling"]

    state: dict = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != "open", "import circle: " + " -> ".join(path[path.index(nxt):] + [nxt])
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_scripts_find_the_data_sets_through_one_setting_and_say_so_when_it_is_missing(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    from bundle.cli import DATA_ENV, data_folder

    from .conftest import DATA

    monkeypatch.delenv(DATA_ENV, raising=False)
    with pytest.raises(BundleInputError) as err:
        data_folder("jsrt")
    assert str(err.value) == ("Where is the jsrt data set? Set DINO_DIFFUSION_DATA to the folder that holds jsrt/ (or "
                              "pass the script its folder); docs/data.md says where to get it and how to lay it out.")
    assert data_folder("jsrt", tmp_path) == tmp_path
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    with pytest.raises(BundleInputError, match=f"The cxr_corpus folder '{tmp_path / 'cxr_corpus'}' does not exist"):
        data_folder("cxr_corpus")
    env = {k: v for k, v in os.environ.items() if k != DATA_ENV}
    script = [sys.executable, "-m", "scripts.jsrt_datalist", "--split", "test", "--out", str(tmp_path / "t.csv")]
    missing = subprocess.run(script, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and missing.stderr.strip().splitlines()[-1].startswith("error: Where is the jsrt")
    if (DATA / "jsrt").is_dir():
        found = subprocess.run(script, cwd=ROOT, env={**env, DATA_ENV: str(DATA)}, capture_output=True, text=True,
                               timeout=120)
        assert found.returncode == 0 and found.stdout.strip() == f"30 images -> {tmp_path / 't.csv'}", found.stderr


def test_every_relative_link_of_the_readme_and_the_guide_reaches_a_file():
    import re

    pages = [ROOT / "README.md", ROOT / "docs/data.md", ROOT / "docs/results/README.md",
             *sorted((ROOT / "docs/guide").glob("*.md"))]
    assert len(pages) >= 12
    broken = [(page.name, target) for page in pages for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text())
              if not re.match(r"^(https?:|mailto:|#)", target) and not (page.parent / target.split("#")[0]).exists()]
    assert not broken


def test_every_tool_the_docs_name_exists_and_none_patches_sys_path():
    """The guide's ``python -m scripts|evidence|devtools.NAME`` and ``bash evidence/NAME.sh`` commands name files that
    exist, and no tool edits ``sys.path`` (they run as modules from the bundle root)."""
    import re

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    named = {match for page in pages for match in re.findall(r"-m ((?:scripts|evidence|devtools)\.\w+)", page.read_text())
             if not match.endswith(".NAME")}  # the guide's placeholder
    named |= {m.replace("/", ".")[:-3] for page in pages
              for m in re.findall(r"\b((?:scripts|evidence|devtools)/\w+\.(?:py|sh))", page.read_text())
              if m.endswith(".py")}
    shells = {m for page in pages for m in re.findall(r"bash ((?:scripts|evidence|devtools)/\w+\.sh)", page.read_text())
              if "/NAME." not in m}
    assert len(named) >= 15 and len(shells) >= 5
    assert not [m for m in named if not (ROOT / (m.replace(".", "/") + ".py")).is_file()]
    assert not [s for s in shells if not (ROOT / s).is_file()]
    tools = [p for d in ("scripts", "evidence", "devtools") for p in (ROOT / d).glob("*.py")]
    assert len(tools) >= 20 and not [p.name for p in tools if "sys.path" in p.read_text()]
    assert not list((ROOT / "scripts").glob("*.sh")), "scripts/ holds the user tools; the long runs live in evidence/"


def test_report_grid_shows_each_sample_beside_its_real_film_at_the_same_size(tmp_path):
    import numpy as np
    from PIL import Image

    from bundle.report import pairs_grid

    dark, bright = np.full((32, 32), 0.1, np.float32), np.full((32, 32), 0.9, np.float32)
    pairs_grid([dark] * 3, [bright] * 3, tmp_path / "grid.png", pairs_per_row=2, size=40)
    grid = np.asarray(Image.open(tmp_path / "grid.png"), dtype=np.float32) / 255
    rows = np.flatnonzero(np.abs(grid[:, :].mean(1) - 1) > 0.05)  # rows that are not blank paper
    real_cols = np.flatnonzero(np.isclose(grid[rows[-1]], 0.1, atol=0.02))
    sample_cols = np.flatnonzero(np.isclose(grid[rows[-1]], 0.9, atol=0.02))
    assert len(real_cols) == len(sample_cols) == 40  # one pair in the last row: real and sample equally wide
    assert np.isclose(grid[:, real_cols[0]], 0.1, atol=0.02).sum() == np.isclose(grid[:, sample_cols[0]], 0.9,
                                                                                   atol=0.02).sum() == 2 * 40
