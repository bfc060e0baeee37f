"""Model Zoo conformance: the repository's metadata against the zoo's schema rules, and a trained tiny generator
packaged as a zoo bundle folder that passes the zoo's checks (run offline), with one clear failure per broken part."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from bundle.errors import BundleInputError
from bundle.zoo import LOCAL_SCHEMA, PACKAGE_SCRIPTS, data_formats, package, sha256, verify

from .conftest import ROOT, workflow


def test_repository_metadata_passes_the_zoo_schema_and_describes_the_default_profile():
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(ROOT / "configs" / "metadata.json"), filepath=str(LOCAL_SCHEMA))
    metadata = json.loads((ROOT / "metadata.json").read_text())
    assert metadata["version"] in metadata["changelog"] and metadata["schema"].endswith("meta_schema_20240725.json")
    wf = workflow("train.json", "training", {"profile": "cpu64", "dino_weights": "random"})
    get = wf.parser.get_parsed_content
    dino = get("dino")
    expected = data_formats(get("image_size"), get("latent_shape"), dino.num_tokens, dino.embed_dim, 1000, get("modality"))
    assert metadata["network_data_format"] == expected["network_data_format"]
    assert metadata["autoencoder_data_format"] == expected["autoencoder_data_format"]


def test_the_schema_rules_refuse_metadata_the_zoo_would_refuse(tmp_path):
    from monai.bundle import verify_metadata

    metadata = json.loads((ROOT / "metadata.json").read_text())
    for broken in ({k: v for k, v in metadata.items() if k != "network_data_format"},
                   {**metadata, "autoencoder_data_format": {"inputs": {"image": {"type": "image"}}, "outputs": {}}}):
        (tmp_path / "m.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match="against schema"):
            verify_metadata(meta_file=str(tmp_path / "m.json"), filepath=str(LOCAL_SCHEMA))


@pytest.fixture(scope="module")
def zoo_bundle(trained_tiny, tmp_path_factory):
    return package(trained_tiny["work_dir"], tmp_path_factory.mktemp("zoo") / "dino_diffusion", "https://example.org/v1")


def test_a_trained_work_dir_packages_into_a_bundle_that_passes_the_zoo_checks(zoo_bundle, trained_tiny):
    found = verify(zoo_bundle)
    assert set(found) == {"large_files", "version", "metadata", "network_def", "weights", "export"}
    assert set(found["export"]) == {"models/model.ts", "models/decoder.ts"} and max(found["export"].values()) < 1e-4
    assert all((zoo_bundle / name).is_file() for name in found["export"])
    assert not (zoo_bundle / "configs" / "metadata.json").is_symlink() and not (zoo_bundle / "docs" / "README.md").is_symlink()
    # what a bundle user needs and nothing of the repository's own evidence, developer tools or demo images
    assert sorted(p.name for p in (zoo_bundle / "scripts").iterdir()) == sorted(PACKAGE_SCRIPTS)
    assert not (zoo_bundle / "bundle" / "default_data").exists() and not (zoo_bundle / "docs" / "results").exists()
    # the README, now at docs/README.md, still reaches the guide pages the package carries
    import re

    links = re.findall(r"\]\((guide/[^)\s]+)\)", (zoo_bundle / "docs" / "README.md").read_text())
    assert len(links) >= 9 and all((zoo_bundle / "docs" / link).is_file() for link in links), links
    listed = (zoo_bundle / "large_files.yml").read_text()
    for rel in ("models/model.pt", "models/model_autoencoder.pt", "models/model.ts", "models/decoder.ts"):
        assert f'path: "{rel}"' in listed and sha256(zoo_bundle / rel) in listed
        assert f"https://example.org/v1/{rel.split('/')[-1]}" in listed
    # the packaged folder is a working bundle: it samples from its own models
    metadata = json.loads((zoo_bundle / "configs" / "metadata.json").read_text())
    unet = workflow("inference.json", "sample", {"work_dir": str(zoo_bundle)}).parser.get_parsed_content("network_def")
    latent = metadata["network_data_format"]["inputs"]["image"]
    out = unet(torch.randn(2, latent["num_channels"], *latent["spatial_shape"]), timesteps=torch.tensor([5, 500]),
               context=torch.randn(2, *metadata["network_data_format"]["inputs"]["context"]["spatial_shape"],
                                   metadata["network_data_format"]["inputs"]["context"]["num_channels"]))
    assert out.shape[1] == metadata["network_data_format"]["outputs"]["pred"]["num_channels"]
    with pytest.raises(BundleInputError, match="exists already"):
        package(trained_tiny["work_dir"], zoo_bundle, "https://example.org/v1")


def test_the_checks_fail_for_each_broken_part(zoo_bundle, tmp_path):
    def broken_copy(name):
        copy = tmp_path / name
        shutil.copytree(zoo_bundle, copy)
        return copy

    no_model = broken_copy("no_model")
    (no_model / "models" / "model.pt").unlink()
    with pytest.raises(BundleInputError, match="models/model.pt"):
        verify(no_model)
    tampered = broken_copy("tampered")
    with open(tampered / "models" / "model_autoencoder.pt", "ab") as f:
        f.write(b"0")
    with pytest.raises(BundleInputError, match="model_autoencoder.pt' of large_files.yml"):
        verify(tampered)
    no_export = broken_copy("no_export")
    (no_export / "models" / "decoder.ts").unlink()
    with pytest.raises(BundleInputError, match="decoder.ts"):
        verify(no_export)
    with pytest.raises(BundleInputError, match="published already"):
        verify(zoo_bundle, known_versions=[json.loads((zoo_bundle / "configs" / "metadata.json").read_text())["version"]])
    wrong_channels = broken_copy("wrong_channels")
    meta_file = wrong_channels / "configs" / "metadata.json"
    metadata = json.loads(meta_file.read_text())
    metadata["network_data_format"]["outputs"]["pred"]["num_channels"] += 1
    meta_file.write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="output channel number"):
        verify(wrong_channels)


def test_packaging_refuses_an_untrained_work_dir_and_writes_nothing(tmp_path):
    with pytest.raises(BundleInputError, match="train it first"):
        package(tmp_path / "empty", tmp_path / "out", "https://example.org")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_monai_ckpt_export_on_the_packaged_bundle_writes_a_torchscript_that_agrees(zoo_bundle, tmp_path):
    """``python -m monai.bundle ckpt_export``, run from another directory on the packaged bundle, loads
    models/model_autoencoder.pt into autoencoder_def (every weight: a plain state dict) and writes a TorchScript
    that agrees with the eager network. Tracing, as MONAI's AutoencoderKL and DiffusionModelUNet fail
    ``torch.jit.script`` in MONAI's own code; the UNet takes three inputs, which ckpt_export cannot trace (it builds
    one), so its TorchScript is the package's own models/model.ts, checked by verify."""
    import subprocess
    import sys

    from monai.bundle import ConfigParser

    size = json.loads((zoo_bundle / "configs" / "metadata.json").read_text())["autoencoder_data_format"]["inputs"]["image"]
    shape = [1, size["num_channels"], *size["spatial_shape"]]
    out = tmp_path / "autoencoder.ts"
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "ckpt_export", "autoencoder_def", "--filepath", str(out),
                           "--ckpt_file", str(zoo_bundle / "models/model_autoencoder.pt"),
                           "--config_file", str(zoo_bundle / "configs/inference.json"),
                           "--meta_file", str(zoo_bundle / "configs/metadata.json"), "--bundle_root", str(zoo_bundle),
                           "--use_trace", "True", "--input_shape", json.dumps(shape)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and out.is_file(), done.stderr[-2000:]
    parser = ConfigParser()
    parser.read_config(str(zoo_bundle / "configs" / "inference.json"))
    eager = parser.get_parsed_content("autoencoder_def")
    eager.load_state_dict(torch.load(zoo_bundle / "models/model_autoencoder.pt", weights_only=True))
    traced = torch.jit.load(str(out))
    x = torch.rand(3, *shape[1:], generator=torch.Generator().manual_seed(1))  # another batch than the trace's
    with torch.no_grad():
        torch.manual_seed(0)
        a = traced(x)
        torch.manual_seed(0)
        b = eager.eval()(x)
    assert all(torch.allclose(p, q, atol=1e-5) for p, q in zip(a, b))
