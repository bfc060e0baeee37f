"""The blind-set predictions (evidence/blind.py): what the final models write for films whose labels are held
elsewhere, and the index that names model, settings and command for each folder."""

from __future__ import annotations

import csv
import json
import multiprocessing
import sys

import numpy as np
import pytest
from PIL import Image

from evidence import blind


def _blind_folder(tmp_path, jsrt_images, cxr_samples):
    """A blind folder laid out as the real one (manifest.csv: id, set, image), holding real films under opaque ids."""
    folder = tmp_path / "blind"
    corpus = sorted(p for p in cxr_samples.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:1]
    rows = []
    for subset, prefix, films in (("jsrt", "bj", jsrt_images[-3:]), ("cxr_corpus", "bc", corpus)):
        (folder / subset / "images").mkdir(parents=True)
        for i, film in enumerate(films):
            link = folder / subset / "images" / f"{prefix}{i:04d}.png"
            link.symlink_to(film)
            rows.append((link.stem, subset, str(link.relative_to(folder))))
    with open(folder / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([["id", "set", "image"], *rows])
    return folder, rows


def test_blind_generator_writes_one_sample_per_film_and_the_index_names_model_and_settings(
        trained_tiny, tmp_path, jsrt_images, cxr_samples, monkeypatch):
    folder, rows = _blind_folder(tmp_path, jsrt_images, cxr_samples)
    out = tmp_path / "results"
    argv = ["evidence/blind.py", "generator", "--work_dir", trained_tiny["work_dir"], "--name", "generator_tiny",
            "--blind", str(folder), "--out", str(out), "--size", "48", "--", "--num_inference_steps", "3"]
    monkeypatch.setattr(sys, "argv", argv)
    blind.main()
    written = sorted(p.stem for p in (out / "generator_tiny" / "samples").glob("*.png"))
    assert written == sorted(r[0] for r in rows), "one sample per blind film, named by its id"
    pixels = np.asarray(Image.open(out / "generator_tiny" / "samples" / f"{rows[0][0]}.png"))
    assert pixels.shape == (48, 48) and pixels.std() > 0, "a grey image at the size asked, not a blank"
    entry = json.loads((out / "index.json").read_text())["generator_tiny"]
    assert entry["images"] == len(rows) and len(entry["model"]["diffusion"]["sha256"]) == 64
    assert "saved at 48 px" in entry["what"]
    assert entry["settings"]["num_inference_steps"] == 3 and entry["command"].startswith("python -m evidence.blind")

    monkeypatch.setattr(sys, "argv", [*argv[:4], "--name", "../outside", *argv[6:]])  # a name outside the folder
    with pytest.raises(SystemExit, match="must be a folder name inside"):
        blind.main()
    assert not (tmp_path / "outside").exists()


def _record_many(out, prefix):
    for i in range(40):
        blind.record(f"{prefix}{i}", {"what": "x", "command": "c"}, out=out)


def test_index_keeps_every_entry_when_two_scripts_record_at_once(tmp_path):
    # the heads grid and the augmentation grid run side by side and both record into one index
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_record_many, args=(tmp_path, prefix)) for prefix in ("heads_", "augmentation_")]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    index = json.loads((tmp_path / "index.json").read_text())
    assert len(index) == 80, sorted(index)


def test_index_names_the_data_folder_by_its_setting_not_by_where_it_lies(tmp_path, monkeypatch):
    from evidence.blind import record

    data = tmp_path / "where" / "data"
    monkeypatch.setenv("DINO_DIFFUSION_DATA", str(data))
    record("heads/x", {"what": "w", "command": f"python -m evidence.run_heads --blind_dir {data}/blind/jsrt/images"},
           out=tmp_path / "out")
    text = (tmp_path / "out" / "index.json").read_text()
    assert str(tmp_path) not in text
    assert json.loads(text)["heads/x"]["command"].endswith("--blind_dir $DINO_DIFFUSION_DATA/blind/jsrt/images")


def test_blind_zero_shot_masks_the_jsrt_films_only_and_records_the_served_settings(
        trained_tiny, tmp_path, jsrt_images, cxr_samples, monkeypatch):
    folder, rows = _blind_folder(tmp_path, jsrt_images, cxr_samples)
    out = tmp_path / "results"
    monkeypatch.setattr(sys, "argv", [
        "evidence/blind.py", "zero_shot", "--name", "zero_shot", "--blind", str(folder), "--out", str(out), "--",
        "--work_dir", trained_tiny["work_dir"], "--zero_shot_model", "generator", "--zero_shot_method", "features",
        "--feature_clusters", "3"])
    blind.main()
    masks = sorted((out / "zero_shot" / "lungs").glob("*.png"))
    assert [p.stem for p in masks] == [r[0] for r in rows if r[1] == "jsrt"], "the JSRT films of the blind set, by id"
    mask = np.asarray(Image.open(masks[0]))
    assert mask.shape == Image.open(folder / rows[0][2]).size[::-1] and set(np.unique(mask)) <= {0, 255}
    entry = json.loads((out / "index.json").read_text())["zero_shot"]
    assert entry["images"] == 3 and entry["settings"]["method"] == "features", entry["settings"]


def test_a_blind_manifest_whose_files_are_not_named_by_their_ids_is_refused(tmp_path, jsrt_images):
    (tmp_path / "manifest.csv").write_text(f"id,set,image\nbj0000,jsrt,{jsrt_images[0]}\n")
    with pytest.raises(SystemExit, match=f"names {jsrt_images[0]} as id bj0000"):
        blind.blind_rows(tmp_path, "jsrt")
