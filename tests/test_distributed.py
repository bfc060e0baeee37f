"""Multi-process training with torchrun on CPUs (gloo): configs/multi_gpu_train.json over configs/train.json, the
tiny networks on real JSRT images, two processes that each train on half of every epoch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bundle.models import load_generator, model_path, read_record

from .conftest import ROOT, tiny_settings, write_datalist


def cli(settings: dict) -> list[str]:
    args = []
    for key, value in settings.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return args


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
def test_two_processes_train_the_whole_pipeline_each_on_half_of_every_epoch(tmp_path, jsrt_images):
    work = tmp_path / "work"
    settings = {**tiny_settings(work, write_datalist(tmp_path / "train.csv", jsrt_images[:8])), "report_count": 2,
                "torch_threads": 1}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "monai.bundle",
               "run", "training", "--config_file", "['configs/train.json','configs/multi_gpu_train.json']", *cli(settings)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "process 0 of 2 (gloo)" in log and "process 1 of 2 (gloo)" in log
    generator = load_generator(model_path(work, "autoencoder"), model_path(work, "diffusion"), bundle_root=ROOT)
    assert generator.latent_shape == [2, 16, 16] and (work / "report" / "samples_grid.png").is_file()
    # 8 images, 2 processes, batch 4: one iteration per epoch and process (two on one device)
    for stage in ("autoencoder", "diffusion"):
        saved = sorted((work / "models" / "checkpoints" / stage).glob("*.pt"))
        assert len(saved) == 1, saved
        state = torch.load(saved[0], weights_only=False)["trainer"]
        assert state["epoch_length"] == 1 and state["iteration"] == 2, state


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
def test_two_processes_pre_train_the_heads_denoiser_and_write_one_model(tmp_path, jsrt_images):
    work = tmp_path / "work"
    settings = {"dataset_dir": str(write_datalist(tmp_path / "train.csv", jsrt_images[:8])), "work_dir": str(work),
                "image_size": 32, "denoiser_channels": [8, 16], "denoiser_attention_levels": [False, True],
                "denoiser_head_channels": 8, "denoiser_epochs": 2, "denoiser_batch_size": 2, "torch_threads": 1}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "monai.bundle",
               "run", "training", "--config_file", "['configs/heads/pretrain.json','configs/heads/multi_gpu_pretrain.json']",
               *cli(settings)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "process 0 of 2 (gloo)" in log and "process 1 of 2 (gloo)" in log
    assert read_record(model_path(work, "denoiser"), "denoiser", "x")["record"]["image_size"] == 32
    # 8 images, 2 processes, batch 2: two iterations per epoch and process, one checkpoint kept
    (saved,) = sorted((work / "models" / "checkpoints" / "denoiser").glob("*.pt"))
    state = torch.load(saved, weights_only=False)["trainer"]
    assert state["epoch_length"] == 2 and state["iteration"] == 4, state
