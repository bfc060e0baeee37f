"""Sampling with the inference config: readable images of the right size, a manifest, seeds, bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import LoadImage

from bundle.errors import BundleInputError
from bundle.performance import cpu_has_bf16

from .conftest import JSRT, ROOT, require, run_bundle, write_datalist


def sample(settings: dict, out, **extra):
    return run_bundle("inference.json", "sample", {**settings, "output_dir": str(out), "num_inputs": 2,
                                                   "num_samples": 2, **extra})


def test_sampling_writes_readable_images_and_a_manifest(trained_tiny, tmp_path):
    sample(trained_tiny, tmp_path, output_formats=["png", "nifti"])
    with open(tmp_path / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["strategy"] for r in rows} == {"reconstruction"}
    assert len({r["source_ids"] for r in rows}) == 2 and [int(r["seed"]) for r in rows] == [0, 1, 2, 3]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(r["image"] for r in rows)
    for row in rows:
        png = LoadImage(image_only=True)(str(tmp_path / row["image"]))
        nii = LoadImage(image_only=True)(str(tmp_path / row["image"].replace(".png", ".nii.gz")))
        assert tuple(png.shape) == tuple(nii.shape) == (32, 32)
        assert 0 <= float(nii.min()) and float(nii.max()) <= 1
        # the PNG is the NIfTI quantised to 8 bits, in the same orientation
        assert np.abs(png.numpy() / 255.0 - nii.numpy()).max() <= 0.5 / 255 + 1e-6


def test_same_seed_same_image_and_finished_outputs_are_skipped(trained_tiny, tmp_path):
    sample(trained_tiny, tmp_path / "a")
    sample(trained_tiny, tmp_path / "b")
    for name in os.listdir(tmp_path / "a"):
        if name.endswith(".png"):
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    first = sorted((tmp_path / "a").glob("*.png"))
    os.remove(first[0])
    stamps = {p: p.stat().st_mtime_ns for p in first[1:]}
    sample(trained_tiny, tmp_path / "a")
    # made alone instead of in a batch of two: the same image up to float rounding in batched convolutions
    alone, batched = (np.asarray(LoadImage(image_only=True)(str(p)), dtype=np.int16)
                      for p in (first[0], tmp_path / "b" / first[0].name))
    assert np.abs(alone - batched).max() <= 1 and (alone != batched).mean() < 0.01
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    sample(trained_tiny, tmp_path / "c", sample_seed=100)
    assert (tmp_path / "c" / first[1].name).read_bytes() != first[1].read_bytes()


def test_outputs_made_with_other_settings_are_refused_not_relabelled(trained_tiny, tmp_path):
    sample(trained_tiny, tmp_path, guidance_scale=1.0)
    manifest = (tmp_path / "manifest.csv").read_bytes()
    with pytest.raises(Exception) as err:
        sample(trained_tiny, tmp_path, guidance_scale=2.0)
    cause = err.value.__cause__ or err.value
    assert isinstance(cause, BundleInputError) and "other settings (guidance_scale '1.0' -> '2.0')" in str(cause)
    assert (tmp_path / "manifest.csv").read_bytes() == manifest  # still says how its images were made
    sample(trained_tiny, tmp_path, guidance_scale=1.0)  # the same settings: kept as they are
    assert (tmp_path / "manifest.csv").read_bytes() == manifest


@pytest.mark.skipif(not cpu_has_bf16(), reason="bf16 sampling needs a CPU with bf16 instructions")
def test_bf16_sampling_runs_the_unet_in_bf16_records_it_and_matches_float32(trained_tiny, tmp_path, monkeypatch):
    from monai.networks.nets import DiffusionModelUNet

    seen = []
    forward = DiffusionModelUNet.forward

    def recording(self, x, *args, **kwargs):
        out = forward(self, x, *args, **kwargs)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(DiffusionModelUNet, "forward", recording)
    sample(trained_tiny, tmp_path / "float32", sampling_amp="none")
    assert seen and set(seen) == {torch.float32}
    seen.clear()
    sample(trained_tiny, tmp_path / "auto")  # the default: bf16 on this CPU
    assert seen and set(seen) == {torch.bfloat16}
    images = {}
    for run in ("float32", "auto"):
        with open(tmp_path / run / "manifest.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert {r["precision"] for r in rows} == {"float32" if run == "float32" else "bf16"}
        images[run] = np.stack([np.asarray(LoadImage(image_only=True)(str(tmp_path / run / r["image"])), float) for r in rows])
    # the same seeds give the same images up to bf16 rounding, far closer than two seeds of one source are
    assert np.abs(images["float32"] - images["auto"]).mean() < 0.1 * np.abs(images["float32"][0] - images["float32"][1]).mean()
    with pytest.raises(Exception) as err:  # a folder of float32 images is not passed off as bf16 ones
        sample(trained_tiny, tmp_path / "float32")
    assert "precision 'float32' -> 'bf16'" in str(err.value.__cause__ or err.value)


def test_missing_checkpoint_and_other_dino_are_refused(trained_tiny, tmp_path):
    with pytest.raises(Exception) as err:
        sample({**trained_tiny, "diffusion_path": str(tmp_path / "none.pt")}, tmp_path / "x")
    assert "none.pt' does not exist: train it (run ID train_diffusion)" in str(err.value.__cause__ or err.value)
    with pytest.raises(Exception) as err:
        sample({**trained_tiny, "dino_tokens": "cls+patch"}, tmp_path / "x")
    cause = err.value.__cause__ or err.value
    assert isinstance(cause, BundleInputError) and "--dino_tokens cls+patch contradicts the diffusion model" in str(cause)
    from bundle.dino import DinoFeatures

    other = tmp_path / "other.safetensors"  # same architecture, other weights: only the fingerprint tells
    from safetensors.torch import save_file

    vit = DinoFeatures("vit_tiny_patch16_224", "random", input_size=32, model_kwargs=trained_tiny["dino_kwargs"], seed=5).vit
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(other))
    with pytest.raises(Exception) as err:
        sample({**trained_tiny, "dino_weights": str(other)}, tmp_path / "x")
    assert "are not the ones the diffusion model" in str(err.value.__cause__ or err.value)
    assert not (tmp_path / "x" / "manifest.csv").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"guidance_scale": -1}, "--guidance_scale -1 must be at least 0.0"),
    ({"num_inference_steps": 0}, "--num_inference_steps 0 must be at least 1"),
    ({"num_inference_steps": 2.5}, "--num_inference_steps 2.5 is not a whole number"),
    ({"sample_batch_size": 0}, "--sample_batch_size 0 must be at least 1"),
    ({"strategy": "dream"}, "dream"),
    ({"num_samples": 0}, "num_samples 0 must be at least 1"),
    ({"strategy_params": {"dream": {}}}, "strategy_params names 'dream', which is not a strategy"),
    ({"strategy": "concept"}, "The concept strategy needs concepts"),
    ({"strategy": "img2img", "strategy_params": {"img2img": {"concepts": {"nowhere": 1.0}}}}, "nowhere"),
    ({"label_columns": ["sex"]}, "Label column 'sex' is missing"),
    ({"sampling_amp": "fp8"}, "--sampling_amp 'fp8' is not a precision: choose auto"),
])
def test_impossible_sampling_values_are_refused_before_any_work(trained_tiny, tmp_path, overrides, message):
    """Every setting is checked before the pool cache (preprocessed images, latents, embeddings) is written."""
    with pytest.raises(Exception) as err:
        sample(trained_tiny, tmp_path / "x", **overrides)
    cause = err.value.__cause__ or err.value
    assert isinstance(cause, BundleInputError) and message in str(cause), str(cause)
    assert not (tmp_path / "x" / ".pool").exists() and not (tmp_path / "x" / "manifest.csv").exists()


def test_command_line_shows_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json",
         "--dataset_dir", str(tmp_path / "empty"), "--work_dir", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: No images were found in") and "dataset_dir" in last
    assert "Traceback" not in result.stderr


def test_failures_a_user_can_fix_are_one_sentence_wherever_they_sit_in_the_chain(trained_tiny, jsrt_images, tmp_path):
    import errno

    from bundle.errors import user_message

    def wrapped(error: BaseException) -> RuntimeError:  # as MONAI's config parser wraps a failing expression
        try:
            try:
                raise error
            except BaseException as inner:
                raise RuntimeError("Failed to evaluate ConfigExpression") from inner
        except RuntimeError as outer:
            return outer

    assert user_message(wrapped(BundleInputError("x is wrong: fix x."))) == "x is wrong: fix x."
    assert user_message(wrapped(PermissionError(errno.EACCES, "Permission denied", "/ro/out"))) == (
        "'/ro/out' cannot be opened (Permission denied): choose a folder you can write to (--work_dir, --output_dir) "
        "and files you can read.")
    assert user_message(wrapped(OSError(errno.EROFS, "Read-only file system", "/mnt/x"))).startswith("'/mnt/x' cannot")
    assert user_message(wrapped(OSError(errno.ENOSPC, "No space left", "/x"))) is None, "not a permission problem"
    assert user_message(wrapped(ValueError("a bug"))) is None
    if torch.cuda.is_available():
        return
    # the real command line, asked for a GPU on a machine without one
    inputs = write_datalist(tmp_path / "in.csv", jsrt_images[:2])
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "sample", "--config_file", "configs/inference.json",
         "--work_dir", trained_tiny["work_dir"], "--input_dir", str(inputs), "--output_dir", str(tmp_path / "out"),
         "--device", "cuda"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --device asks for a GPU (CUDA) and torch finds none on this machine: leave --device out (the bundle "
        "uses a GPU when there is one) or pass --device cpu.")


def test_the_pool_cache_is_rebuilt_when_an_input_image_changes(trained_tiny, tmp_path, caplog):
    import logging
    import shutil

    from PIL import Image

    rows = list(csv.DictReader(open(trained_tiny["dataset_dir"])))[:2]
    pool = tmp_path / "pool"
    pool.mkdir()
    for r in rows:
        shutil.copy(r["image"], pool)
    def made_anew():  # the images go (another seed would be refused beside them), the pool cache stays
        for f in [*(tmp_path / "out").glob("*.png"), tmp_path / "out" / "manifest.csv"]:
            f.unlink()

    with caplog.at_level(logging.INFO):
        sample(trained_tiny, tmp_path / "out", input_dir=str(pool))
        caplog.clear()
        made_anew()
        sample(trained_tiny, tmp_path / "out", input_dir=str(pool), sample_seed=7)
        assert "latent cache" in caplog.text and "up to date: reusing it" in caplog.text and "rebuilding" not in caplog.text
        before = torch.load(tmp_path / "out" / ".pool" / "latents.pt", weights_only=True)["latents"].clone()
        first = sorted(pool.glob("*.png"))[0]
        Image.fromarray(255 - np.asarray(Image.open(first).convert("L"))).save(first)  # same name, other image
        caplog.clear()
        made_anew()
        sample(trained_tiny, tmp_path / "out", input_dir=str(pool), sample_seed=8)
    assert "was built from other images" in caplog.text
    after = torch.load(tmp_path / "out" / ".pool" / "latents.pt", weights_only=True)["latents"]
    assert not torch.allclose(before[0], after[0]) and torch.allclose(before[1], after[1], atol=1e-5)


def test_the_report_samples_the_model_there_now_not_an_earlier_setting(trained_tiny, tmp_path):
    """The report of a work dir is made anew each time: a second report with another guidance scale (or after more
    training) shows its own samples, rather than stopping at, or reusing, the first one's."""
    from bundle.report import training_report

    for guidance in (1.0, 2.0):
        training_report(ROOT, trained_tiny["work_dir"], trained_tiny["dataset_dir"], train_dir=trained_tiny["dataset_dir"],
                        count=4, report_dir=tmp_path / "report", guidance_scale=guidance)
        with open(tmp_path / "report" / "samples" / "manifest.csv", newline="") as f:
            assert {float(r["guidance_scale"]) for r in csv.DictReader(f)} == {guidance}


def test_report_variants_measure_each_setting_once_and_sample_with_the_steps_asked(trained_tiny, tmp_path, monkeypatch,
                                                                                   capsys):
    """evidence/report_variants.py, which chooses the guidance scale (and checks fewer sampler steps) on validation
    films: a variant with 2 sampler steps samples with 2 steps; the same guidance without it is a row of its own, and
    run again it is recognised as measured and not sampled again."""
    from evidence import report_variants

    out = tmp_path / "variants"
    held_out = write_datalist(tmp_path / "val.csv", sorted(require(JSRT / "images").glob("*.png"))[8:12])

    def run(*variants):
        argv = ["report_variants", "--work_dir", trained_tiny["work_dir"], "--real", str(held_out),
                "--train", trained_tiny["dataset_dir"], "--count", "2", "--out", str(out)]
        for v in variants:
            argv += ["--variant", v]
        monkeypatch.setattr("sys.argv", argv)
        report_variants.main()
        return capsys.readouterr().out

    run("guidance_scale=1,num_inference_steps=2")
    with open(out / "variant0" / "samples" / "manifest.csv", newline="") as f:
        assert {int(r["num_inference_steps"]) for r in csv.DictReader(f)} == {2}
    assert "measured already" not in run("guidance_scale=1")  # the 2-step row does not stand for the config's steps
    assert "measured already" in run("guidance_scale=1")
    rows = [json.loads(line) for line in (out / "variants.jsonl").read_text().splitlines()]
    assert [(r["guidance_scale"], r["num_inference_steps"]) for r in rows] == [(1.0, 2), (1.0, None)]

    # evidence/guidance_choice.py decides from these rows: fewer steps are kept only within the tolerance
    from evidence import guidance_choice

    chosen = Path(trained_tiny["work_dir"]) / "guidance.json"
    try:
        for tolerance, steps in (("100", 2), ("-1", None)):
            monkeypatch.setattr("sys.argv", ["guidance_choice", "--work_dir", trained_tiny["work_dir"], "--scales", "1",
                                             "--fewer_steps", "2", "--tolerance", tolerance, "--rows", str(out / "variants.jsonl")])
            guidance_choice.main()
            choice = json.loads(chosen.read_text())
            assert (choice["guidance_scale"], choice["num_inference_steps"]) == (1.0, steps)
            assert choice["fewer_steps_check"] == rows[0] and choice["variants"] == [rows[1]]
        monkeypatch.setattr("sys.argv", ["guidance_choice", "--work_dir", trained_tiny["work_dir"], "--scales", "1 2",
                                         "--rows", str(out / "variants.jsonl")])
        with pytest.raises(SystemExit, match=r"guidance scales \[2.0\] have no rows"):
            guidance_choice.main()
    finally:
        chosen.unlink(missing_ok=True)
