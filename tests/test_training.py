"""Stage 1, the latent cache and stage 2, run from the real configs with tiny networks on real JSRT images."""

from __future__ import annotations

import logging
import os
import re
import shutil

import numpy as np
import pytest
import torch
from ignite.engine import Events

from bundle.diffusion import LatentDiffusionPrepareBatch
from bundle.errors import BundleInputError
from bundle.models import read_record
from monai.networks.schedulers import DDPMScheduler
from PIL import Image

from .conftest import run_bundle, tiny_settings, workflow


def record_losses(trainer) -> list[float]:
    losses: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"])))
    return losses


def test_stage1_loss_falls_and_exports_a_scale_factor(tmp_path, tiny_dataset, caplog):
    settings = {**tiny_settings(tmp_path, tiny_dataset), "ae_epochs": 8, "ae_lr": 3e-3, "adv_warmup_epochs": 6}
    wf = workflow("train.json", "train_autoencoder", settings)
    losses = record_losses(wf.parser.get_parsed_content("ae_trainer"))
    with caplog.at_level(logging.INFO, logger="bundle.workflow"):
        wf.run()
    assert len(losses) == 16
    # a log that is a file (not a terminal) gets one line per epoch with the epoch's mean losses, not a progress bar
    lines = [m for m in caplog.messages if " epoch " in m and " iterations in " in m]
    assert len(lines) == 8 and re.match(r"autoencoder epoch 1/8: 2 iterations in [0-9.]+ s, mean ", lines[0]), lines
    for epoch, line in enumerate(lines):
        mean = float(re.search(r"(?:^|, )loss ([0-9.e+-]+)", line.split("mean ", 1)[1]).group(1).rstrip("."))
        assert mean == pytest.approx(sum(losses[2 * epoch : 2 * epoch + 2]) / 2, rel=1e-3), line
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    saved = read_record(tmp_path / "models/model_autoencoder.pt", "autoencoder", "x")
    assert 0 < saved["scale_factor"] < 1e3 and saved["scale_factor"] != 1.0
    # MONAI's AutoencoderKL state dict, the scale factor in the record beside it
    assert "scale_factor" not in saved["state_dict"] and "encoder.blocks.0.conv.weight" in saved["state_dict"]
    assert len(list((tmp_path / "models/checkpoints/autoencoder").glob("*.pt"))) == 1
    assert any((tmp_path / "logs/autoencoder").iterdir())


def test_stage2_loss_falls_on_cached_latents(tmp_path, tiny_dataset):
    settings = {**tiny_settings(tmp_path, tiny_dataset), "ae_epochs": 1, "diffusion_epochs": 12,
                "diffusion_lr": 2e-3, "diffusion_batch_size": 8, "preview_interval": 6}
    run_bundle("train.json", "train_autoencoder", settings)
    wf = workflow("train.json", "train_diffusion", settings)
    losses = record_losses(wf.parser.get_parsed_content("diffusion_trainer"))
    wf.run()
    assert len(losses) == 12
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
    saved = read_record(tmp_path / "models/model.pt", "diffusion", "x")
    assert saved["ema"] is True and saved["record"]["dino"]["model_name"] == "vit_tiny_patch16_224"
    cache = torch.load(tmp_path / "cache/latents.pt", weights_only=True)
    assert cache["latents"].shape == (8, 2, 16, 16) and cache["tokens"].shape == (8, 1, 192)
    # the latents are scaled to about unit variance by the stored scale factor
    assert 0.5 < float(cache["latents"].std()) < 2.0


def test_snapshots_keep_a_loadable_model_every_n_epochs(tmp_path, tiny_dataset):
    from bundle.models import load_generator

    settings = {**tiny_settings(tmp_path, tiny_dataset), "ae_epochs": 2, "diffusion_epochs": 3, "snapshot_every": 2}
    run_bundle("train.json", "train_autoencoder", settings)
    run_bundle("train.json", "train_diffusion", settings)
    snapshots = sorted(p.name for p in (tmp_path / "models/snapshots").iterdir())
    assert snapshots == ["autoencoder_epoch0002.json", "autoencoder_epoch0002.pt", "diffusion_epoch0002.json",
                         "diffusion_epoch0002.pt"]
    autoencoder = read_record(tmp_path / "models/snapshots/autoencoder_epoch0002.pt", "autoencoder", "x")
    final = read_record(tmp_path / "models/model_autoencoder.pt", "autoencoder", "x")
    assert autoencoder["record"] == final["record"] and autoencoder["scale_factor"] == pytest.approx(final["scale_factor"])
    generator = load_generator(tmp_path / "models/model_autoencoder.pt", tmp_path / "models/snapshots/diffusion_epoch0002.pt")
    snapshot = read_record(tmp_path / "models/snapshots/diffusion_epoch0002.pt", "diffusion", "x")
    last = read_record(tmp_path / "models/model.pt", "diffusion", "x")
    assert snapshot["ema"] is True and snapshot["record"] == last["record"]
    assert any(not torch.equal(snapshot["state_dict"][k], v) for k, v in last["state_dict"].items()), \
        "epoch 2's weights, not the final ones"
    assert all(torch.equal(generator.unet.state_dict()[k], v) for k, v in snapshot["state_dict"].items())
    from bundle.workflow import EpochSnapshots

    with pytest.raises(BundleInputError, match="--snapshot_every -1 must be at least 0"):
        EpochSnapshots(tmp_path, print, "diffusion", every=-1)


def test_latent_cache_is_reused_and_rebuilt_when_an_ingredient_changes(tmp_path, tiny_dataset, caplog):
    settings = tiny_settings(tmp_path, tiny_dataset)
    run_bundle("train.json", "train_autoencoder", settings)
    cache = tmp_path / "cache/latents.pt"

    def build(**changes) -> str:
        caplog.clear()
        with caplog.at_level("INFO", logger="bundle.data"):
            run_bundle("train.json", "cache", {**settings, **changes})
        return caplog.text

    assert "cache written" in build()
    first = torch.load(cache, weights_only=True)
    assert "up to date: reusing it" in build()
    assert "built from other dino: rebuilding" in build(dino_tokens="cls+patch")
    assert torch.load(cache, weights_only=True)["tokens"].shape[1] == 1 + 16

    shutil.rmtree(tmp_path / "models")  # retrain stage 1 from scratch with another seed -> another autoencoder
    run_bundle("train.json", "train_autoencoder", {**settings, "ae_lr": 1e-3})
    assert "built from other autoencoder, dino: rebuilding" in build()
    assert not torch.equal(torch.load(cache, weights_only=True)["latents"], first["latents"])

    # the images count by path and contents, not by time: touched, the cache stays; rewritten in place, it goes
    rows = tiny_dataset.read_text().splitlines()
    source, _, rest = rows[1].partition(",")
    copy = tmp_path / "first.png"
    shutil.copy(source, copy)
    tiny_dataset.write_text("\n".join([rows[0], str(copy) + (f",{rest}" if rest else ""), *rows[2:]]) + "\n")
    assert "built from other images: rebuilding" in build()  # another file in the list
    os.utime(copy, ns=(copy.stat().st_atime_ns, copy.stat().st_mtime_ns + 10**9))  # copied or mounted anew
    assert "up to date: reusing it" in build()
    Image.fromarray(255 - np.asarray(Image.open(copy).convert("L"))).save(copy)  # rewritten in place
    assert "built from other images: rebuilding" in build()


def test_interrupted_training_resumes_from_the_last_epoch(tmp_path, tiny_dataset):
    settings = {**tiny_settings(tmp_path, tiny_dataset), "ae_epochs": 3}
    wf = workflow("train.json", "train_autoencoder", settings)
    trainer = wf.parser.get_parsed_content("ae_trainer")

    def killed(engine):
        raise KeyboardInterrupt("simulated kill during epoch 2")

    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=3), killed)
    with pytest.raises(KeyboardInterrupt):
        wf.run()
    assert not (tmp_path / "models/model_autoencoder.pt").exists()
    checkpoints = list((tmp_path / "models/checkpoints/autoencoder").glob("*.pt"))
    assert [c.name for c in checkpoints] == ["autoencoder_checkpoint_epoch=1.pt"]

    wf = workflow("train.json", "train_autoencoder", settings)
    trainer = wf.parser.get_parsed_content("ae_trainer")
    epochs: list[int] = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs.append(e.state.epoch))
    wf.run()
    assert epochs == [2, 3]
    assert trainer.state.iteration == 3 * 2
    assert (tmp_path / "models/model_autoencoder.pt").exists()

    # a finished stage is skipped on the next run, so re-running the pipeline only does what is missing
    wf = workflow("train.json", "train_autoencoder", settings)
    trainer = wf.parser.get_parsed_content("ae_trainer")
    started: list[int] = []
    trainer.add_event_handler(Events.STARTED, lambda e: started.append(1))
    wf.run()
    assert started == []


def test_prepare_batch_drops_conditions_to_the_null_embedding_and_targets_velocity():
    torch.manual_seed(0)
    batch = {"image": torch.randn(512, 2, 4, 4), "context": torch.randn(512, 1, 8) + 5}
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    latents, target, _, kwargs = LatentDiffusionPrepareBatch(scheduler, condition_dropout=0.25)(batch)
    dropped = (kwargs["condition"] == 0).flatten(1).all(1)
    kept = (kwargs["condition"] == batch["context"]).flatten(1).all(1)
    assert bool((dropped | kept).all()) and 0.18 < float(dropped.float().mean()) < 0.32
    # v = sqrt(abar_t) * noise - sqrt(1 - abar_t) * x0, with abar from the linear betas written out by hand
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[kwargs["timesteps"]]
    abar = abar.view(-1, 1, 1, 1)
    expected = abar.sqrt() * kwargs["noise"].double() - (1 - abar).sqrt() * batch["image"].double()
    torch.testing.assert_close(target.double(), expected, rtol=1e-4, atol=1e-5)
    _, target, _, kwargs = LatentDiffusionPrepareBatch(DDPMScheduler(1000), condition_dropout=0.0)(batch)
    assert torch.equal(target, kwargs["noise"]) and torch.equal(kwargs["condition"], batch["context"])
    with pytest.raises(ValueError, match="outside"):
        LatentDiffusionPrepareBatch(scheduler, condition_dropout=1.5)


def test_yes_no_settings_accept_command_line_spellings():
    from bundle.errors import BundleInputError
    from bundle.workflow import flag

    assert [flag(v) for v in (True, "true", "True", "yes", 1, "1")] == [True] * 6
    assert [flag(v) for v in (False, "false", "FALSE", "no", 0, "0", None)] == [False] * 7
    with pytest.raises(BundleInputError, match="not a yes/no value"):
        flag("maybe")


@pytest.mark.parametrize("size, message", [(63, "--image_size 63 cannot be halved 2 times .* give a multiple of 4, e.g. 60"),
                                           ("abc", "--image_size 'abc' is not a number: give e.g. 64")])
def test_an_image_size_the_networks_cannot_halve_is_refused_before_work(tmp_path, tiny_dataset, size, message):
    settings = {**tiny_settings(tmp_path, tiny_dataset), "image_size": size}
    with pytest.raises(Exception) as err:
        run_bundle("train.json", "train_autoencoder", settings)
    cause = err.value.__cause__ or err.value
    assert isinstance(cause, BundleInputError)
    assert __import__("re").search(message, str(cause)), str(cause)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "models").exists()
