"""The frozen DINO feature extractor: token shapes, local weights files, and offline failures."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from bundle.data import apply_to_file, modality_preprocessing
from bundle.dino import DinoFeatures
from bundle.errors import BundleInputError

from .conftest import ROOT

TINY = {"model_name": "vit_tiny_patch16_224", "input_size": 32, "model_kwargs": {"patch_size": 8, "depth": 2}}


@pytest.fixture
def radiographs(jsrt_images) -> torch.Tensor:
    preprocessing = modality_preprocessing(ROOT / "configs/modality/cxr.json", image_size=48)
    return torch.stack([apply_to_file(preprocessing, {"image": str(p)})["image"] for p in jsrt_images[:3]])


def test_token_shapes_for_each_mode(radiographs):
    for tokens, count in (("cls", 1), ("cls+patch", 1 + 16), ("patch", 16)):
        dino = DinoFeatures(weights="random", tokens=tokens, **TINY)
        out = dino(radiographs)
        assert out.shape == (3, count, dino.embed_dim) == (3, dino.num_tokens, 192)
        assert torch.isfinite(out).all()
    assert not any(p.requires_grad for p in dino.parameters())
    assert not dino.train().vit.training


def test_random_weights_are_seeded_and_tokens_depend_on_the_image(radiographs):
    a = DinoFeatures(weights="random", seed=3, **TINY)(radiographs)
    b = DinoFeatures(weights="random", seed=3, **TINY)(radiographs)
    c = DinoFeatures(weights="random", seed=4, **TINY)(radiographs)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert not torch.allclose(a[0], a[1])


def test_local_weights_file_loads_and_reproduces_tokens(tmp_path, radiographs):
    trained = DinoFeatures(weights="random", seed=7, **TINY)
    with torch.no_grad():  # make the weights distinguishable from any seeded initialisation
        for p in trained.vit.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in trained.vit.state_dict().items()}, str(path))

    loaded = DinoFeatures(weights=str(path), **TINY)
    torch.testing.assert_close(loaded(radiographs), trained(radiographs))
    assert loaded.fingerprint() != DinoFeatures(weights="random", seed=7, **TINY).fingerprint()


def test_weights_that_do_not_fit_or_do_not_exist_are_refused(tmp_path):
    with pytest.raises(BundleInputError, match="is not a file"):
        DinoFeatures(weights=str(tmp_path / "missing.safetensors"), **TINY)
    path = tmp_path / "other.safetensors"
    save_file({"something.else": torch.zeros(3)}, str(path))
    with pytest.raises(BundleInputError, match="does not load into 'vit_tiny_patch16_224'"):
        DinoFeatures(weights=str(path), **TINY)
    with pytest.raises(BundleInputError, match="dino_tokens 'all'"):
        DinoFeatures(weights="random", tokens="all", **TINY)


def test_hub_download_failure_says_how_to_work_offline(monkeypatch):
    import timm

    def offline(*args, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        raise AssertionError("not reached")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(BundleInputError, match="could not be downloaded.*--dino_weights PATH"):
        DinoFeatures(weights="hub", **TINY)


@pytest.mark.parametrize(
    "name, patches",
    [("vit_small_patch16_224.dino", 9), ("vit_small_patch14_dinov2.lvd142m", 16), ("vit_small_patch14_reg4_dinov2", 16)],
)
def test_dino_v1_and_v2_architectures_register_tokens_excluded(radiographs, name, patches):
    size = 48 if "patch16" in name else 56
    dino = DinoFeatures(model_name=name, weights="random", tokens="cls+patch", input_size=size,
                        model_kwargs={"depth": 1})
    out = dino(radiographs)
    assert out.shape == (3, 1 + patches, 384) and dino.num_tokens == 1 + patches
