"""Shared fixtures: the real images (in $DINO_DIFFUSION_DATA, by default the data folder CI provides beside the
repository), tiny network settings, and running bundle configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the same setting the scripts read (bundle.cli.DATA_ENV); scripts the tests start inherit it
DATA = Path(os.environ.setdefault("DINO_DIFFUSION_DATA", str(ROOT.parent / "shared" / "data")))
JSRT = DATA / "jsrt"

os.environ.setdefault("OMP_NUM_THREADS", "2")

# a noise schedule unlike MONAI's default, so that a sampler built on the default would be noticed
SCHEDULE = dict(num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195)


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs the real images in {path} (set DINO_DIFFUSION_DATA to the data folder), absent here")
    return path


@pytest.fixture
def jsrt_images() -> list[Path]:
    return sorted(require(JSRT / "images").glob("*.png"))


@pytest.fixture
def cxr_samples() -> Path:
    return require(DATA / "cxr_samples")


@pytest.fixture(autouse=True)
def _run_from_repo_root(monkeypatch):
    """Configs reference each other relative to the repository root, as `python -m monai.bundle` is run there."""
    monkeypatch.chdir(ROOT)


def jsrt_datalist(folder: Path, split: str = "train") -> tuple[Path, list[dict]]:
    """The JSRT datalist of one split written by scripts/jsrt_datalist.py into ``folder``, and its rows."""
    import subprocess
    import sys

    from bundle.data import read_datalist

    require(JSRT / "images")
    path = folder / f"{split}.csv"
    subprocess.run([sys.executable, "-m", "scripts.jsrt_datalist", "--split", split, "--out", str(path)],
                   check=True, capture_output=True, cwd=ROOT)
    return path, read_datalist(path)


def write_datalist(path: Path, images: list[Path]) -> Path:
    path.write_text("image,index\n" + "".join(f"{img},{i}\n" for i, img in enumerate(images)))
    return path


def tiny_settings(work_dir: Path, dataset_dir: Path | str) -> dict:
    """Overrides that make every network tiny, so the real configs run on the CPU in seconds."""
    return {
        "dataset_dir": str(dataset_dir),
        "work_dir": str(work_dir),
        "image_size": 32,
        "autoencoder_channels": [8, 16],
        "latent_channels": 2,
        "unet_channels": [16, 32],
        "unet_attention_levels": [False, True],
        "unet_res_blocks": 1,
        "unet_head_channels": 16,
        "dino_model": "vit_tiny_patch16_224",
        "dino_weights": "random",
        "dino_input_size": 32,
        "dino_kwargs": {"patch_size": 8, "depth": 2},
        "ae_epochs": 2,
        "diffusion_epochs": 2,
        "ae_batch_size": 4,
        "diffusion_batch_size": 4,
        "adv_warmup_epochs": 1,
        "preview_interval": 1,
        "preview_count": 2,
        "num_inference_steps": 4,
        "report_count": 4,
    }


def workflow(config: str, run_id: str, settings: dict):
    """A ConfigWorkflow exactly as `python -m monai.bundle run RUN_ID --config_file configs/CONFIG` builds it."""
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=f"configs/{config}", workflow_type=None, run_id=run_id, logging_file=False,
                        **settings)
    wf.initialize()
    return wf


def run_bundle(config: str, run_id: str, settings: dict):
    wf = workflow(config, run_id, settings)
    wf.run()
    return wf


@pytest.fixture
def tiny_dataset(tmp_path, jsrt_images) -> Path:
    return write_datalist(tmp_path / "train.csv", jsrt_images[:8])


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory):
    """A tiny pipeline trained once on 8 real JSRT images, shared by the sampling and cache tests."""
    images = sorted(require(JSRT / "images").glob("*.png"))[:8]
    work = tmp_path_factory.mktemp("trained")
    settings = tiny_settings(work, write_datalist(work / "train.csv", images))
    os.chdir(ROOT)
    run_bundle("train.json", "training", settings)
    return settings


PIPELINE_FIXTURES = {"trained_tiny", "tiny_dataset"}


def pytest_collection_modifyitems(config, items):
    """Tests that train a tiny pipeline through the configs are marked ``pipeline`` (pytest.ini), so that
    ``-m "not pipeline"`` runs the fast tests alone (devtools/mutation_testing.py does, for its slower modules)."""
    for item in items:
        if PIPELINE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.pipeline)
