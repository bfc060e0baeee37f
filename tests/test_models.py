"""Self-describing models: records rebuild the networks, contradictions and stale models are refused."""

from __future__ import annotations

import json
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


def test_a_model_without_its_record_gets_one_clear_message(trained_tiny, tmp_path):
    import shutil

    weights = f"{trained_tiny['work_dir']}/models/model.pt"
    saved = read_record(weights, "diffusion", "x")
    old = tmp_path / "old.pt"  # the earliest files: a state_dict and no record at all
    torch.save({"state_dict": saved["state_dict"]}, old)
    with pytest.raises(BundleInputError, match="earlier version of this bundle without the record"):
        read_record(old, "diffusion", "x")
    alone = tmp_path / "alone.pt"  # weights copied without the record beside them
    shutil.copy(weights, alone)
    with pytest.raises(BundleInputError, match=r"has no record beside it \('alone.json'"):
        read_record(alone, "diffusion", "x")
    shutil.copy(f"{trained_tiny['work_dir']}/models/model_autoencoder.json", tmp_path / "alone.json")
    with pytest.raises(BundleInputError, match="describes other weights than"):
        read_record(alone, "diffusion", "x")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(BundleInputError, match="is empty"):
        read_record(tmp_path / "empty.pt", "diffusion", "train it")


def test_model_files_load_with_monai_own_loaders_from_any_directory(trained_tiny, tmp_path, monkeypatch):
    """models/model.pt is a plain state dict: CheckpointLoader and monai.bundle.load put every weight into the
    bundle's network_def, and ckpt_export writes a TorchScript that agrees with the eager network."""
    import shutil

    from ignite.engine import Engine
    from monai.bundle import ConfigParser, load
    from monai.handlers import CheckpointLoader

    from .conftest import ROOT

    work = trained_tiny["work_dir"]
    generator = load_generator(f"{work}/models/model_autoencoder.pt", f"{work}/models/model.pt")
    parser = ConfigParser()
    parser.read_config(ROOT / "configs/inference.json")
    parser.update({"bundle_root": str(ROOT), "work_dir": work})
    net = parser.get_parsed_content("network_def")
    assert not all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), generator.unet.state_dict().values()))
    CheckpointLoader(load_path=f"{work}/models/model.pt", load_dict={"model": net}, strict=True)(Engine(lambda e, b: None))
    assert all(torch.equal(net.state_dict()[k], v) for k, v in generator.unet.state_dict().items())
    autoencoder = parser.get_parsed_content("autoencoder_def")
    CheckpointLoader(load_path=f"{work}/models/model_autoencoder.pt", load_dict={"model": autoencoder},
                     strict=True)(Engine(lambda e, b: None))
    assert all(torch.equal(autoencoder.state_dict()[k], v) for k, v in generator.codec.autoencoder.state_dict().items())
    # monai.bundle.load on a packaged bundle folder, from another working directory
    from bundle.zoo import package

    package(work, tmp_path / "zoo" / "dino_diffusion_cxr", base_url="https://example.org/w", source_root=ROOT)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with monkeypatch.context() as m:
        m.setattr("monai.bundle.scripts.download", lambda **kw: pytest.fail("nothing is downloaded"))
        loaded = load("dino_diffusion_cxr", bundle_dir=str(tmp_path / "zoo"), workflow_type="inference", device="cpu")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in generator.unet.state_dict().items())
    shutil.rmtree(tmp_path / "zoo")


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


def _work_dir_with_a_dino_file(trained_tiny, folder):
    """A copy of the tiny work dir whose diffusion model was conditioned on a DINO weights file in the work dir
    (models/dino/teacher.safetensors), as the bundle's own DINO pre-training writes it."""
    import shutil

    from safetensors.torch import save_file

    from bundle.diffusion import export_diffusion
    from bundle.dino import DinoFeatures

    shutil.copytree(f"{trained_tiny['work_dir']}/models", folder / "models", ignore=shutil.ignore_patterns("checkpoints"))
    teacher = folder / "models/dino/teacher.safetensors"
    teacher.parent.mkdir(parents=True)
    vit = DinoFeatures("vit_tiny_patch16_224", "random", input_size=32, model_kwargs=trained_tiny["dino_kwargs"], seed=7).vit
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(teacher))
    (folder / "models/dino/teacher.safetensors.json").write_text(json.dumps(  # as DINO pre-training writes it
        {"model_name": "vit_tiny_patch16_224", "img_size": 32, "model_kwargs": trained_tiny["dino_kwargs"],
         "weights": "teacher.safetensors"}))
    path = folder / "models/model.pt"
    saved = read_record(path, "diffusion", "x")
    dino = DinoFeatures("vit_tiny_patch16_224", str(teacher), input_size=32, model_kwargs=trained_tiny["dino_kwargs"])
    unet = build_network(saved["record"]["network"])
    unet.load_state_dict(saved["state_dict"])
    export_diffusion(unet, path, {**saved["record"], "dino": dino.record(path)})
    return folder


def test_a_copied_work_dir_loads_its_own_files_never_the_original(trained_tiny, tmp_path):
    """Paths in records are relative to the work dir: a copy elsewhere uses its own DINO file, with the original
    hidden, and a copied heads work dir is not judged trained with other settings."""
    import shutil

    original = _work_dir_with_a_dino_file(trained_tiny, tmp_path / "original")
    assert read_record(original / "models/model.pt", "diffusion", "x")["record"]["dino"]["weights"] == \
        "models/dino/teacher.safetensors"
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(original, copy)
    original.rename(tmp_path / "hidden")
    generator = load_generator(copy / "models/model_autoencoder.pt", copy / "models/model.pt")
    assert generator.dino.weights == str(copy / "models/dino/teacher.safetensors")
    # a zoo bundle packaged from the copy carries the teacher with its note and loads its own files
    from bundle.zoo import package

    from .conftest import ROOT

    zoo = package(copy, tmp_path / "zoo" / "dino_diffusion_cxr", "https://example.org/w", source_root=ROOT)
    copy.rename(tmp_path / "copy_hidden")
    assert (zoo / "models/dino/teacher.safetensors.json").is_file() and (zoo / "models/model.json").is_file()
    generator = load_generator(zoo / "models/model_autoencoder.pt", zoo / "models/model.pt")
    assert generator.dino.weights == str(zoo / "models/dino/teacher.safetensors")
    (tmp_path / "copy_hidden").rename(copy)
    # a record of an earlier version (absolute path to the original) still prefers the copy's own file
    (tmp_path / "hidden").rename(original)
    saved = read_record(copy / "models/model.pt", "diffusion", "x")
    from bundle.diffusion import export_diffusion

    unet = build_network(saved["record"]["network"])
    unet.load_state_dict(saved["state_dict"])
    dino = {**saved["record"]["dino"], "weights": str(original / "models/dino/teacher.safetensors")}
    export_diffusion(unet, copy / "models/model.pt", {**saved["record"], "dino": dino})
    generator = load_generator(copy / "models/model_autoencoder.pt", copy / "models/model.pt")
    assert generator.dino.weights == str(copy / "models/dino/teacher.safetensors")


def test_a_work_dir_of_the_one_file_format_is_converted_once_and_samples_the_same(trained_tiny, tmp_path, caplog):
    """Files of earlier versions ({state_dict, record} in one .pt, the codec's keys prefixed, the scale factor a
    buffer) load after a one-line conversion, into weights + record, with the same networks."""
    import logging

    from bundle.data import hash_file

    work = tmp_path / "old"
    (work / "models").mkdir(parents=True)
    src = trained_tiny["work_dir"]
    reference = load_generator(f"{src}/models/model_autoencoder.pt", f"{src}/models/model.pt")
    ae = read_record(f"{src}/models/model_autoencoder.pt", "autoencoder", "x")
    codec_state = {f"autoencoder.{k}": v for k, v in ae["state_dict"].items()}
    codec_state["scale_factor"] = torch.tensor(ae["scale_factor"])
    torch.save({"state_dict": codec_state, "scale_factor": ae["scale_factor"], "record": ae["record"]},
               work / "models/model_autoencoder.pt")
    diffusion = read_record(f"{src}/models/model.pt", "diffusion", "x")
    record = {**diffusion["record"], "autoencoder_sha256": hash_file(work / "models/model_autoencoder.pt")}
    torch.save({"state_dict": diffusion["state_dict"], "ema": True, "record": record}, work / "models/model.pt")
    with caplog.at_level(logging.INFO, logger="bundle.models"):
        generator = load_generator(work / "models/model_autoencoder.pt", work / "models/model.pt")
        again = load_generator(work / "models/model_autoencoder.pt", work / "models/model.pt")
    conversions = [m for m in caplog.messages if m.startswith("Converted the")]
    assert len(conversions) == 2 and "earlier one-file format to MONAI's" in conversions[0]
    assert sorted(p.name for p in (work / "models").iterdir()) == ["model.json", "model.pt", "model_autoencoder.json",
                                                                    "model_autoencoder.pt"]
    assert isinstance(torch.load(work / "models/model.pt", weights_only=True)["time_embed.0.weight"], torch.Tensor)
    for g in (generator, again):
        assert float(g.codec.scale_factor) == pytest.approx(float(reference.codec.scale_factor))
        for a, b in ((g.unet, reference.unet), (g.codec, reference.codec)):
            assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_record_paths_are_relative_to_the_work_dir_that_holds_models(tmp_path):
    from bundle.model_files import portable_path, recorded_path

    head = tmp_path / "work/models/heads/landmarks.pt"
    assert portable_path(tmp_path / "work/models/heads/denoiser.pt", head) == "models/heads/denoiser.pt"
    assert recorded_path("models/heads/denoiser.pt", head) == str(tmp_path / "work/models/heads/denoiser.pt")
    assert portable_path(tmp_path / "other/denoiser.pt", head) == str(tmp_path / "other/denoiser.pt")
    assert [portable_path(v, head) for v in (None, "null", "hub", "random")] == [None, None, "hub", "random"]
    snapshot = tmp_path / "work/models/snapshots/diffusion_epoch0010.pt"  # snapshots share the final model's record
    assert recorded_path("models/dino/teacher.safetensors", snapshot) == str(tmp_path / "work/models/dino/teacher.safetensors")
