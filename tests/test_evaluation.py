"""Evaluation metrics on real JSRT images, and the evaluate config end to end."""

from __future__ import annotations

import json

import pytest
import torch

from bundle.errors import BundleInputError
from bundle.evaluation import PixelFeatures, divergent, diversity, frechet_distance, memorisation, prdc, source_retrieval

from .conftest import run_bundle


@pytest.fixture
def jsrt_batch(jsrt_images) -> torch.Tensor:
    from bundle.data import modality_preprocessing

    pre = modality_preprocessing("configs/modality/cxr.json", image_size=64)
    return torch.stack([torch.as_tensor(pre({"image": str(p)})["image"]).float() for p in jsrt_images[:40]])


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    from monai.transforms import GaussianSmooth

    return torch.stack([GaussianSmooth(sigma)(img) for img in images]).float()


def test_frechet_distance_is_zero_for_a_set_against_itself_and_grows_with_damage(jsrt_batch):
    pixels = PixelFeatures(16)
    real = pixels(jsrt_batch)
    assert abs(frechet_distance(real, real)) < 1e-6
    blurred = [frechet_distance(real, pixels(blur(jsrt_batch, s))) for s in (0.5, 1.5, 3.0)]
    assert 0 < blurred[0] < blurred[1] < blurred[2]
    g = torch.Generator().manual_seed(0)
    noised = [frechet_distance(real, pixels((jsrt_batch + s * torch.randn(jsrt_batch.shape, generator=g)).clamp(0, 1)))
              for s in (0.05, 0.2)]
    assert 0 < noised[0] < noised[1]
    with pytest.raises(BundleInputError, match="at least two"):
        frechet_distance(real[:1], real)


def test_reconstruction_quality_scores_a_blurring_decoder_below_a_faithful_one(jsrt_batch):
    """PSNR and MS-SSIM fall, and the reconstructions' FD from the originals grows, as the decoder blurs more."""
    from bundle.evaluation import reconstruction_quality

    class Codec(torch.nn.Module):  # what the metric sees of an autoencoder: encode then decode
        def __init__(self, sigma: float):
            super().__init__()
            self.sigma = sigma

        def encode(self, x):
            return x

        def decode(self, z):
            return blur(z, self.sigma) if self.sigma else z

    spaces = {"pixels": PixelFeatures(16)}
    faithful, soft, blurred = (reconstruction_quality(jsrt_batch, Codec(s), features=spaces) for s in (0, 1.0, 3.0))
    assert faithful["psnr_db"]["mean"] > 60 and faithful["fd_pixels"] < 1e-6
    assert soft["psnr_db"]["mean"] > blurred["psnr_db"]["mean"] and soft["ms_ssim"]["mean"] > blurred["ms_ssim"]["mean"]
    assert 0 < soft["fd_pixels"] < blurred["fd_pixels"]
    assert "fd_pixels" not in reconstruction_quality(jsrt_batch[:4], Codec(1.0))  # only when feature spaces are given


def test_diversity_of_identical_images_is_one_and_of_real_images_less(jsrt_batch):
    assert diversity(jsrt_batch[:1].repeat(6, 1, 1, 1)) == pytest.approx(1.0, abs=1e-5)
    real = diversity(jsrt_batch[:12])
    assert 0 < real < 0.95
    assert diversity(blur(jsrt_batch[:12], 3.0)) > real  # blurring makes images more alike
    with pytest.raises(BundleInputError, match="at least two"):
        diversity(jsrt_batch[:1])


def test_prdc_is_one_for_identical_sets_and_falls_for_disjoint_ones(jsrt_batch):
    feats = PixelFeatures(16)(jsrt_batch)
    same = prdc(feats, feats.clone(), k=5)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0 and same["density"] >= 1.0
    shifted = prdc(feats, feats + 10.0, k=5)
    assert shifted == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    half = prdc(feats[:20], torch.cat([feats[:10], feats[:10] + 10.0]), k=3)
    assert 0.3 < half["precision"] < 0.7
    with pytest.raises(BundleInputError, match="needs more than 5"):
        prdc(feats[:5], feats, k=5)


def test_memorisation_flags_a_planted_copy(jsrt_batch):
    pixels = PixelFeatures(16)
    train, test = jsrt_batch[:30], jsrt_batch[30:40]
    generated = torch.cat([blur(jsrt_batch[30:36], 1.0), train[7:8]])  # the last one is a training image
    result = memorisation(pixels(generated), pixels(train), pixels(test), quantile=0.05)
    assert result["flagged"] == [6] and result["nearest_train"][6] == 7 and result["distance"][6] < 1e-5
    assert result["flagged_fraction"] == pytest.approx(1 / 7)


def test_divergence_check_passes_real_images_and_flags_noise_blank_and_nan(jsrt_batch):
    pixels = PixelFeatures(16)
    train, test = jsrt_batch[:24], jsrt_batch[24:40]
    g = torch.Generator().manual_seed(0)
    noise = torch.rand((1, *jsrt_batch.shape[1:]), generator=g)  # what a diverged sampler makes: texture, no anatomy
    blank = torch.full_like(noise, 0.5)
    broken = test[:1].clone()
    broken[..., 3, 3] = float("nan")
    speckled = (test[1:2] + 0.15 * torch.randn(test[1:2].shape, generator=g)).clamp(0, 1)  # anatomy under noise
    generated = torch.cat([test[2:8], noise, blank, broken, speckled])
    result = divergent(generated, pixels(generated), pixels(train), pixels(test), test)
    assert result["flagged"] == [6, 7, 8, 9] and result["count"] == 4 and result["of"] == 10
    assert result["by_reason"]["non_finite"] == 1 and result["by_reason"]["flat"] == 1
    assert result["by_reason"]["noisy"] == 3  # the noise image, the speckled radiograph and the zeroed NaN pixel
    real_only = divergent(test, pixels(test), pixels(train), pixels(test), test)
    assert real_only["count"] == 0, "the real held-out images themselves are never divergent"
    far = divergent(test[:2] * 0.2, pixels(test[:2] * 0.2), pixels(train), pixels(test), test)
    assert far["by_reason"]["off_manifold"] == 2, "dark radiographs lie off the manifold of the training images"
    with pytest.raises(BundleInputError, match="at least two real held-out"):
        divergent(test, pixels(test), pixels(train), pixels(test[:1]), test[:1])


def test_source_retrieval_finds_sources_of_faithful_samples_and_chance_for_shuffled_ones(jsrt_batch):
    pixels = PixelFeatures(16)
    pool = pixels(jsrt_batch[:20])
    faithful = pixels(blur(jsrt_batch[:20], 0.7))
    result = source_retrieval(faithful, pool, range(20))
    assert result["top1"] == 1.0 and result["top5"] == 1.0 and result["chance_top1"] == 0.05 and result["median_rank"] == 1
    shuffled = source_retrieval(faithful, pool, [(i + 7) % 20 for i in range(20)])
    assert shuffled["top1"] == 0.0 and shuffled["top5"] < 1.0
    with pytest.raises(BundleInputError, match="one source index"):
        source_retrieval(faithful, pool, [25] * 20)


def test_inception_features_need_a_weights_file(tmp_path):
    from bundle.evaluation import InceptionFeatures

    with pytest.raises(BundleInputError, match="inception_weights PATH"):
        InceptionFeatures(None)
    bad = tmp_path / "bad.pth"
    torch.save({"not": torch.zeros(1)}, bad)
    with pytest.raises(BundleInputError, match="do not load"):
        InceptionFeatures(bad)


def test_evaluate_config_writes_json_markdown_and_closest_pairs(trained_tiny, tmp_path):
    samples = tmp_path / "samples"
    run_bundle("inference.json", "sample", {**trained_tiny, "output_dir": str(samples), "num_inputs": 4,
                                             "num_samples": 3})
    out = tmp_path / "evaluation"
    run_bundle("evaluate.json", "evaluate", {**trained_tiny, "generated_dir": str(samples / "manifest.csv"),
                                             "real_dir": trained_tiny["dataset_dir"], "train_dir": trained_tiny["dataset_dir"],
                                             "evaluation_dir": str(out), "prdc_k": 3})
    result = json.loads((out / "evaluation.json").read_text())
    assert result["counts"] == {"generated": 12, "real": 8, "train": 8}
    assert set(result["feature_spaces"]) == {"dino", "pixels"}
    assert result["feature_spaces"]["dino"]["name"].startswith("dino:vit_tiny_patch16_224")
    for space in result["feature_spaces"].values():
        # samples of a 2-epoch model are far from the real images; the reference (real against itself) is 0
        assert space["frechet_distance"] > 1e-2 and 0 <= space["prdc"]["coverage"] <= 1
        assert space["frechet_distance_train_reference"] == pytest.approx(0, abs=1e-4)  # train and real are one set here
    assert result["memorisation"]["test_to_train"]["min"] == pytest.approx(0)  # real == train: all are "copies"
    assert 0 < result["diversity_ms_ssim"]["real"] < 1 and 0 < result["reconstruction"]["psnr_db"]["mean"] < 60
    assert "| dino" in (out / "evaluation.md").read_text() and (out / "closest_pairs.png").stat().st_size > 0
    with pytest.raises(Exception) as err:
        run_bundle("evaluate.json", "evaluate", {**trained_tiny, "generated_dir": str(samples / "manifest.csv"),
                                                 "feature_spaces": ["inception"], "evaluation_dir": str(out / "x")})
    assert "inception_weights PATH" in str(err.value.__cause__ or err.value)


def test_evaluate_from_the_command_line_names_a_missing_set(tmp_path):
    import subprocess
    import sys

    from .conftest import ROOT

    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "evaluate", "--config_file", "configs/evaluate.json",
         "--generated_dir", str(tmp_path / "nothing"), "--real_dir", str(tmp_path), "--dino_weights", "random",
         "--dino_model", "vit_tiny_patch16_224", "--dino_input_size", "32", "--dino_kwargs", "{'depth': 1}",
         "--with_reconstruction", "false", "--evaluation_dir", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: Image set '{tmp_path / 'nothing'}' does not exist")
    assert not (tmp_path / "out").exists()


def test_quality_against_compute_counts_each_stage_at_its_benchmarked_cost(tmp_path):
    # the 64/128-px figure's x-axis: DINO epochs, then the autoencoder epochs so far (or all it trained, for diffusion
    # points), then the diffusion epochs so far, each at the benchmark's core-seconds per image
    from evidence.quality_compute import main, points

    bench = {"environment": {"profile": "cpu64"}, "stages": [
        {"stage": "dino", "per": "iteration", "seconds_median": 3.6, "batch_size": 32, "threads": 2},
        {"stage": "autoencoder", "per": "iteration", "seconds_median": 0.9, "batch_size": 16, "threads": 1},
        {"stage": "diffusion", "per": "iteration", "seconds_median": 0.36, "batch_size": 32, "threads": 1},
        {"stage": "image_cache", "per": "run", "seconds_median": 9.0, "batch_size": 1, "threads": 1}]}
    ae = lambda e, db: {"model": f"autoencoder_epoch{e:04d}.pt", "epoch": e, "sets": {"a": {"psnr_db": {"mean": db}}}}  # noqa: E731
    dif = {"model": "diffusion_epoch0010.pt", "epoch": 10, "sets": {"a": {
        "fd_pixels": 3.0, "fd_pixels_reference": 2.0, "fd_dino": 8.0, "fd_dino_reference": 2.0}}}
    final = {"model": "model_diffusion.pt", "epoch": None, "iterations": None, "sets": dif["sets"]}
    quality = {"train_images": 1000, "autoencoder_curve": [ae(5, 27.0), ae(10, 28.0)], "diffusion_curve": [dif, final]}
    run = points(quality, bench, dino_epochs=16)
    dino_h = 16 * 1000 * (3.6 / 32 * 2) / 3600
    assert run["core_hours"]["dino"] == pytest.approx(dino_h, abs=1e-3)
    assert [p["core_hours"] for p in run["autoencoder"]] == pytest.approx(
        [dino_h + e * 1000 * 0.9 / 16 / 3600 for e in (5, 10)], abs=1e-3)
    # a diffusion snapshot comes after every autoencoder epoch trained (10), not only those before a chosen snapshot
    assert len(run["diffusion"]) == 1 and run["diffusion"][0]["core_hours"] == pytest.approx(
        dino_h + 10 * 1000 * 0.9 / 16 / 3600 + 10 * 1000 * 0.36 / 32 / 3600, abs=1e-3)
    assert run["diffusion"][0]["sets"]["a"] == {"pixels": 1.5, "dino": 4.0}
    # a final model trained past its last snapshot counts every epoch it trained (its iterations), and a final model
    # that is a snapshot is drawn once
    last_ae = {"model": "model_autoencoder.pt", "epoch": None, "iterations": 10 * 63, "sets": {"a": {"psnr_db": {"mean": 28.5}}}}
    run = points({**quality, "autoencoder_curve": [ae(5, 27.0), last_ae],
                  "diffusion_curve": [dif, {**final, "iterations": 10 * 32}]}, bench, dino_epochs=16)
    assert [(p["epoch"], p["sets"]["a"]) for p in run["autoencoder"]] == [(5, 27.0), (10, 28.5)]
    assert run["core_hours"]["autoencoder"] == pytest.approx(10 * 1000 * 0.9 / 16 / 3600, abs=1e-3)
    assert len(run["diffusion"]) == 1
    # a benchmark without a training stage is named, not plotted at zero cost
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "quality.json").write_text(json.dumps(quality))
    bench["stages"] = bench["stages"][1:]
    (tmp_path / "b.json").write_text(json.dumps(bench))
    with pytest.raises(SystemExit, match="no dino stage"):
        main(["--run", f"x={tmp_path / 'q'},{tmp_path / 'b.json'}", "--out", str(tmp_path / "fig")])


def test_quality_curve_dates_a_final_model_by_its_checkpointed_epochs(tmp_path):
    # the final model of a run that stopped past its last snapshot trained as long as its last checkpoint says, not
    # as long as that snapshot
    from evidence.evaluate_quality import date_final_model, trained_epochs

    checkpoints = tmp_path / "models" / "checkpoints" / "autoencoder"
    checkpoints.mkdir(parents=True)
    for epoch in (5, 10, 40):
        (checkpoints / f"checkpoint_epoch={epoch}.pt").write_bytes(b"")
    (checkpoints / "checkpoint_epoch=final.pt").write_bytes(b"")
    assert trained_epochs(tmp_path, "autoencoder") == 40
    assert trained_epochs(tmp_path, "diffusion") is None
    curve = [{"epoch": 20, "iterations": 20 * 67}, {"epoch": None, "iterations": None}]
    date_final_model(curve, trained_epochs(tmp_path, "autoencoder"), 67)
    assert curve[-1]["iterations"] == 40 * 67
    curve[-1]["iterations"] = None  # no checkpoints: the last snapshot's iterations
    date_final_model(curve, None, 67)
    assert curve[-1]["iterations"] == 20 * 67
    snapshot_final = [{"epoch": 20, "iterations": 20 * 67}]  # a final model that is a snapshot keeps its own
    date_final_model(snapshot_final, 40, 67)
    assert snapshot_final[0]["iterations"] == 20 * 67
