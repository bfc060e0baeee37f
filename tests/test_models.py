"""Self-describing models: records rebuild the networks, contradictions and stale models are refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bundle.errors import BundleInputError
from bundle.models import build_network, load_generator, model_path, network_record, read_record

from .conftest import ROOT, run_bundle, tiny_settings, workflow


def test_network_record_rebuilds_the_same_network():
    from functools import partial

    from monai.networks.nets import AutoencoderKL

    factory = partial(AutoencoderKL, spatial_dims=2, in_channels=1, out_channels=1, channels=[8, 16], latent_channels=2,
                      num_res_blocks=1, norm_num_groups=8, attention_levels=[False, False],
                      with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)
    record = network_record(factory)
    assert record["_target_"] == "monai.networks.nets.autoencoderkl.AutoencoderKL" and record["channels"] == [8, 16]
    a, b = factory(), build_network(record)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(a.state_dict()[k].shape == b.state_dict()[k].shape for k in a.state_dict())


def test_trained_models_carry_their_settings(trained_tiny):
    work = trained_tiny["work_dir"]
    ae = read_record(f"{work}/models/model_autoencoder.pt", "autoencoder", "x")["record"]
    assert ae["image_size"] == 32 and ae["latent_shape"] == [2, 16, 16] and ae["network"]["channels"] == [8, 16]
    diffusion = read_record(f"{work}/models/model.pt", "diffusion", "x")["record"]
    assert diffusion["noise_schedule"]["prediction_type"] == "v_prediction"  # the cpu64 profile's
    assert diffusion["dino"]["model_name"] == "vit_tiny_patch16_224" and diffusion["dino"]["weights"] == "random"
    generator = load_generator(f"{work}/models/model_autoencoder.pt", f"{work}/models/model.pt", bundle_root=ROOT)
    assert generator.image_size == 32 and generator.latent_shape == [2, 16, 16]
    assert generator.sampler("ddim").prediction_type == "v_prediction"


def test_sampling_from_another_directory_needs_no_network_settings(trained_tiny, tmp_path):
    out = tmp_path / "samples"
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "sample", "--config_file", str(ROOT / "configs/inference.json"),
         "--bundle_root", str(ROOT), "--work_dir", trained_tiny["work_dir"], "--input_dir", trained_tiny["dataset_dir"],
         "--num_inputs", "2", "--num_samples", "1", "--num_inference_steps", "2", "--output_dir", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    images = sorted(out.glob("*.png"))
    assert len(images) == 2 and (out / "manifest.csv").is_file()
    from PIL import Image

    assert Image.open(images[0]).size == (32, 32)


def test_a_setting_that_contradicts_the_model_is_refused(trained_tiny, tmp_path):
    for key, value, stored in (("image_size", 64, 32), ("prediction_type", "epsilon", "v_prediction")):
        with pytest.raises(Exception) as err:
            run_bundle("inference.json", "sample", {**trained_tiny, key: value, "output_dir": str(tmp_path / "x")})
        cause = err.value.__cause__ or err.value
        assert isinstance(cause, BundleInputError)
        assert f"--{key} {value} contradicts the diffusion model" in str(cause) and f"{key} {stored}" in str(cause)
    assert not (tmp_path / "x").exists()


def test_a_finished_model_with_other_settings_is_not_reused(trained_tiny):
    with pytest.raises(Exception) as err:
        run_bundle("train.json", "train_autoencoder", {**trained_tiny, "autoencoder_channels": [8, 8]})
    cause = err.value.__cause__ or err.value
    assert isinstance(cause, BundleInputError)
    assert "was trained with other settings (network.channels [8, 16] -> [8, 8])" in str(cause)
    assert "delete it" in str(cause)


def test_a_model_without_a_record_gets_one_clear_message(trained_tiny, tmp_path):
    old = tmp_path / "old.pt"
    saved = torch.load(f"{trained_tiny['work_dir']}/models/model.pt", weights_only=True)
    torch.save({k: v for k, v in saved.items() if k != "record"}, old)
    with pytest.raises(BundleInputError, match="earlier version of this bundle without the record"):
        read_record(old, "diffusion", "x")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(BundleInputError, match="is empty"):
        read_record(tmp_path / "empty.pt", "diffusion", "train it")



def test_a_truncated_autoencoder_is_called_damaged_not_another_model(trained_tiny, tmp_path):
    import shutil

    work = tmp_path / "work"
    shutil.copytree(trained_tiny["work_dir"], work, ignore=shutil.ignore_patterns("cache", "logs", "checkpoints"))
    autoencoder = model_path(work, "autoencoder")
    data = Path(autoencoder).read_bytes()
    Path(autoencoder).write_bytes(data[: len(data) // 2])  # a copy cut short
    with pytest.raises(BundleInputError) as err:
        load_generator(autoencoder, model_path(work, "diffusion"))
    assert str(err.value).startswith(f"The autoencoder model '{autoencoder}' is damaged or not a model file (")
    assert str(err.value).endswith("): delete it and train it (run ID train_autoencoder).")


def test_time_budget_stops_at_an_epoch_end_and_exports(tmp_path, tiny_dataset):
    from ignite.engine import Events

    settings = {**tiny_settings(tmp_path, tiny_dataset), "ae_epochs": 50, "ae_max_seconds": 0.01}
    wf = workflow("train.json", "train_autoencoder", settings)
    trainer = wf.parser.get_parsed_content("ae_trainer")
    epochs: list[int] = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: epochs.append(e.state.epoch))
    wf.run()
    assert epochs == [1]
    assert (tmp_path / "models/model_autoencoder.pt").is_file()
    assert [p.name for p in (tmp_path / "models/checkpoints/autoencoder").glob("*.pt")] == ["autoencoder_checkpoint_epoch=1.pt"]


def test_missing_dino_weights_stop_the_run_before_stage_one(tmp_path, tiny_dataset):
    settings = {**tiny_settings(tmp_path, tiny_dataset), "dino_weights": str(tmp_path / "missing.safetensors")}
    with pytest.raises(Exception) as err:
        run_bundle("train.json", "training", settings)
    assert "missing.safetensors' is not a file" in str(err.value.__cause__ or err.value)
    assert not (tmp_path / "models").exists()


def test_model_files_have_the_model_zoo_names_and_old_work_dirs_keep_theirs(tmp_path):
    assert model_path(tmp_path, "diffusion") == str(tmp_path / "models/model.pt")
    assert model_path(tmp_path, "autoencoder") == str(tmp_path / "models/model_autoencoder.pt")
    (tmp_path / "models").mkdir()
    (tmp_path / "models/diffusion.pt").write_bytes(b"x")  # a work dir of an earlier version
    assert model_path(tmp_path, "diffusion") == str(tmp_path / "models/diffusion.pt")
    assert model_path(tmp_path, "autoencoder") == str(tmp_path / "models/model_autoencoder.pt")
    (tmp_path / "models/model.pt").write_bytes(b"x")
    assert model_path(tmp_path, "diffusion") == str(tmp_path / "models/model.pt")
    with pytest.raises(BundleInputError, match="not a model of this bundle"):
        model_path(tmp_path, "vae")
