"""Concept embeddings: learning K tokens with the generator frozen, the concept file, and its refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from bundle.concepts import (ConceptConditioned, ConceptTokens, filter_rows, fixed_draw_loss, initial_tokens,
                             list_concepts, load_concept, save_concept)
from bundle.errors import BundleInputError

from .conftest import run_bundle, workflow, write_datalist


def test_initial_tokens_start_from_the_images_mean_and_differ_when_repeated():
    contexts = torch.randn((20, 1, 6), generator=torch.Generator().manual_seed(0)) + 3.0
    tokens = initial_tokens(contexts, 4, "mean", seed=0)
    assert tokens.shape == (4, 6)
    assert torch.allclose(tokens[0], contexts.mean(0)[0])
    assert torch.allclose(tokens[1:], contexts.mean(0)[0].expand(3, -1), atol=0.1) and not torch.equal(tokens[1], tokens[2])
    random = initial_tokens(contexts, 64, "random", seed=0)
    assert random.shape == (64, 6) and (random.mean(0) - contexts.mean((0, 1))).abs().max() < 0.5  # 4 sigma
    with pytest.raises(BundleInputError, match="at least 1"):
        initial_tokens(contexts, 0)
    with pytest.raises(BundleInputError, match="'mean' or 'random'"):
        initial_tokens(contexts, 2, "zeros")


def test_concept_rows_filter_by_label_and_refuse_too_few():
    rows = [{"image": f"{i}.png", "label": "pneumonia" if i % 2 else "normal"} for i in range(12)]
    assert [r["image"] for r in filter_rows(rows, "label", "pneumonia", 5)] == [f"{i}.png" for i in range(1, 12, 2)]
    with pytest.raises(BundleInputError, match="6 images with label = pneumonia, fewer than min_concept_images = 10"):
        filter_rows(rows, "label", "pneumonia", 10)
    with pytest.raises(BundleInputError, match="concept_label_column 'finding' is not a column"):
        filter_rows(rows, "finding", "x", 1)


def test_only_the_concept_tokens_learn_and_the_batch_context_is_ignored():
    from monai.networks.nets import DiffusionModelUNet

    unet = DiffusionModelUNet(spatial_dims=2, in_channels=2, out_channels=2, channels=[16, 32], attention_levels=[False, True],
                              num_res_blocks=1, num_head_channels=16, norm_num_groups=8, with_conditioning=True,
                              cross_attention_dim=6)
    with torch.no_grad():  # MONAI zero-initialises output and attention projections: give every weight a value
        for p in unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    concept = ConceptTokens(torch.randn(3, 6))
    network = ConceptConditioned(unet, concept).train()
    assert not unet.training, "the frozen UNet stays in eval mode"
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([10, 500])
    a = network(x, t, context=torch.randn(2, 1, 6))
    b = network(x, t, context=torch.zeros(2, 1, 6))
    assert torch.equal(a, b), "the batch's own context is replaced by the concept"
    a.square().mean().backward()
    assert concept.tokens.grad is not None and concept.tokens.grad.abs().sum() > 0
    assert all(p.grad is None for p in unet.parameters())


def test_concept_file_round_trip_size_and_refusals(tmp_path):
    tokens = torch.randn(64, 384)
    path = tmp_path / "pneumonia.safetensors"
    save_concept(path, tokens, {"generator": "abc", "images": 100, "steps": 600, "final_loss": 0.1})
    assert path.stat().st_size < 1 << 20
    loaded, info = load_concept(path, fingerprint="abc", token_dim=384)
    assert torch.equal(loaded, tokens) and info["num_tokens"] == 64 and info["token_dim"] == 384
    assert [r["name"] for r in list_concepts(tmp_path)] == ["pneumonia"]
    with pytest.raises(BundleInputError, match="learned for another generator"):
        load_concept(path, fingerprint="xyz")
    with pytest.raises(BundleInputError, match="384-wide tokens, but this generator's context is 192 wide"):
        load_concept(path, fingerprint="abc", token_dim=192)
    with pytest.raises(BundleInputError, match="would take .* bytes"):
        save_concept(tmp_path / "big.safetensors", torch.randn(1024, 384), {})
    assert not (tmp_path / "big.safetensors").exists(), "nothing half-written"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(BundleInputError, match="cannot be read .* damaged"):
        load_concept(path)
    with pytest.raises(BundleInputError, match="is missing"):
        load_concept(tmp_path / "absent.safetensors")


def context_sensitive_copy(trained_tiny, folder) -> str:
    """The tiny trained generator, its attention output projections nudged off zero (MONAI starts them at zero and
    a few training steps barely move them), so that its context, and with it a concept, changes what it predicts."""
    import shutil

    from bundle.diffusion import export_diffusion
    from bundle.models import load_network, model_path

    shutil.copytree(f"{trained_tiny['work_dir']}/models", folder / "models", ignore=shutil.ignore_patterns("checkpoints"))
    path = model_path(folder, "diffusion")
    unet, saved = load_network(path, "diffusion", "")
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "proj_out" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    export_diffusion(unet, path, saved["record"])
    return str(folder)


def test_learning_a_concept_lowers_its_loss_on_real_images(trained_tiny, jsrt_images, tmp_path, capsys):
    from bundle.concepts import generator_fingerprint
    from bundle.models import load_generator, model_path

    work = context_sensitive_copy(trained_tiny, tmp_path / "generator")
    concept_images = write_datalist(tmp_path / "concept.csv", jsrt_images[20:28])
    settings = {"work_dir": work, "concept_images": str(concept_images), "concept_name": "nodules",
                "concept_dir": str(tmp_path / "concepts"), "concept_tokens": 2, "concept_init": "random",
                "concept_steps": 40, "concept_batch_size": 4, "concept_lr": 0.05, "preview_interval": 5}
    wf = run_bundle("concept.json", "learn_concept", settings)
    path = tmp_path / "concepts" / "nodules.safetensors"
    generator = load_generator(model_path(work, "autoencoder"), model_path(work, "diffusion"))
    tokens, info = load_concept(path, generator_fingerprint(model_path(work, "autoencoder"), model_path(work, "diffusion")),
                                generator.context_dim)
    assert tokens.shape[0] == 2 and info["images"] == 8 and info["steps"] >= 40 and info["init"] == "random"
    latents = wf.parser.get_parsed_content("concept_latents")["latents"]
    scheduler = generator.sampler("ddpm")
    start = initial_tokens(wf.parser.get_parsed_content("concept_latents")["tokens"], 2, "random", seed=0)
    before = fixed_draw_loss(generator.unet, scheduler, latents, start)
    after = fixed_draw_loss(generator.unet, scheduler, latents, tokens)
    step = (tokens - start).norm()
    direction = torch.randn(start.shape, generator=torch.Generator().manual_seed(1))
    moved = fixed_draw_loss(generator.unet, scheduler, latents, start + step * direction / direction.norm())
    assert after < before, f"learning did not lower the concept's diffusion loss ({before:.5f} -> {after:.5f})"
    assert before - after > 3 * abs(before - moved), f"a random move of the same size changed it as much ({before:.5f} -> {moved:.5f}, learned {after:.5f})"
    assert (tmp_path / "concepts" / ".work" / "nodules" / "logs").is_dir()
    # learned under bf16 autocast where the CPU has it (concept_amp: auto), the tokens float32
    from bundle.performance import Autocast, cpu_has_bf16
    network = wf.parser.get_parsed_content("concept_trainer").network
    assert isinstance(network, Autocast) == cpu_has_bf16() and tokens.dtype == torch.float32
    # the command-line listing and inspection
    run_bundle("concept.json", "list_concepts", {"concept_dir": str(tmp_path / "concepts")})
    run_bundle("concept.json", "inspect_concept", {"concept_dir": str(tmp_path / "concepts"), "concept_name": "nodules"})
    out = capsys.readouterr().out
    assert "nodules" in out and json.loads(out[out.index("{"):])["num_tokens"] == 2
    # a second run finds the concept and leaves it as it is
    mtime = path.stat().st_mtime_ns
    run_bundle("concept.json", "learn_concept", settings)
    assert path.stat().st_mtime_ns == mtime


def test_too_few_concept_images_stop_with_one_message(trained_tiny, jsrt_images, tmp_path):
    concept_images = write_datalist(tmp_path / "concept.csv", jsrt_images[:3])
    with pytest.raises(Exception) as err:
        workflow("concept.json", "learn_concept", {"work_dir": trained_tiny["work_dir"], "concept_images": str(concept_images),
                                                   "concept_dir": str(tmp_path / "c")}).run()
    assert "has 3 images, fewer than min_concept_images = 5" in str(err.value.__cause__ or err.value)
    assert not (tmp_path / "c" / "concept.safetensors").exists()


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/abs", ".hidden", "a b", ""])
def test_a_concept_name_that_is_not_a_plain_file_name_is_refused_before_anything_is_written(trained_tiny, jsrt_images,
                                                                                           tmp_path, name):
    (tmp_path / "in").mkdir()
    concept_images = write_datalist(tmp_path / "in" / "concept.csv", jsrt_images[:6])
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(Exception) as err:
        workflow("concept.json", "learn_concept", {"work_dir": trained_tiny["work_dir"], "concept_name": name,
                                                   "concept_images": str(concept_images),
                                                   "concept_dir": str(tmp_path / "c" / "d")}).run()
    assert str(err.value.__cause__ or err.value) == (f"concept_name '{name}' is not a usable file name: use letters, "
                                                     "digits, '-' or '_'.")
    assert sorted(tmp_path.rglob("*")) == before and not Path("/tmp/abs").exists(), "nothing written anywhere"


@pytest.fixture(scope="module")
def concept_generator(trained_tiny, tmp_path_factory):
    """The context-sensitive tiny generator with two saved concepts, 'a' and 'b' (random tokens, K = 2)."""
    from bundle.concepts import generator_fingerprint
    from bundle.models import load_generator, model_path

    work = context_sensitive_copy(trained_tiny, tmp_path_factory.mktemp("concept_generator"))
    generator = load_generator(model_path(work, "autoencoder"), model_path(work, "diffusion"))
    fingerprint = generator_fingerprint(model_path(work, "autoencoder"), model_path(work, "diffusion"))
    g = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        save_concept(f"{work}/concepts/{name}.safetensors", 3 * torch.randn((2, generator.context_dim), generator=g),
                     {"generator": fingerprint})
    return work


def sample_concepts(work, jsrt_images, out, params, strategy="concept", **extra):
    import numpy as np
    from PIL import Image

    inputs = write_datalist(out.parent / f"{out.name}_inputs.csv", jsrt_images[:2])
    run_bundle("inference.json", "sample", {"work_dir": work, "input_dir": str(inputs), "num_samples": 1,
                                            "strategy": strategy, "strategy_params": {strategy: params},
                                            "num_inference_steps": 4, "output_dir": str(out), **extra})
    import csv

    with open(out / "manifest.csv", newline="") as f:
        rows = [json.loads(r["params"]) for r in csv.DictReader(f)]
    images = np.stack([np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))]).astype(float)
    return images, rows


def test_concepts_compose_by_mixing_and_by_guidance(concept_generator, jsrt_images, tmp_path):
    work = concept_generator
    a, rows = sample_concepts(work, jsrt_images, tmp_path / "a", {"concepts": {"a": 1.0}})
    assert rows[0]["concepts"] == {"a": 1.0} and rows[0]["composition"] == "mix"
    assert rows[0]["concept_files"]["a"].endswith("concepts/a.safetensors")
    b, _ = sample_concepts(work, jsrt_images, tmp_path / "b", {"concepts": {"b": 1.0}})
    assert np.abs(a - b).mean() > 0.1, "two different concepts give different images"
    mixed, _ = sample_concepts(work, jsrt_images, tmp_path / "mix10", {"concepts": {"a": 1.0, "b": 0.0}})
    assert np.array_equal(mixed, a), "mixing with weights (1, 0) is concept a"
    guided_single, _ = sample_concepts(work, jsrt_images, tmp_path / "g1", {"concepts": {"a": 1.0}, "composition": "guidance"})
    guided, _ = sample_concepts(work, jsrt_images, tmp_path / "g10", {"concepts": {"a": 1.0, "b": 0.0}, "composition": "guidance"})
    assert np.array_equal(guided, guided_single), "guidance with weights (1, 0) is concept a alone"
    halfway, _ = sample_concepts(work, jsrt_images, tmp_path / "half", {"concepts": {"a": 0.5, "b": 0.5}})
    assert not np.array_equal(halfway, a) and not np.array_equal(halfway, b)


def test_concepts_inside_an_inpainting_box_change_only_the_box(concept_generator, jsrt_images, tmp_path):
    work = concept_generator
    box = [0.25, 0.25, 0.75, 0.75]
    plain, _ = sample_concepts(work, jsrt_images, tmp_path / "plain", {"box": box}, strategy="inpainting")
    with_a, rows = sample_concepts(work, jsrt_images, tmp_path / "with_a", {"box": box, "concepts": {"a": 1.0}},
                                   strategy="inpainting")
    inside = np.zeros(plain.shape[1:], dtype=bool)
    inside[8:24, 8:24] = True  # the box on the 32-pixel images
    assert np.array_equal(plain[:, ~inside], with_a[:, ~inside]), "outside the box both keep the real image"
    assert np.abs(plain[:, inside] - with_a[:, inside]).mean() > 0.1, "inside, the concept changes what is generated"
    assert rows[0]["concepts"] == {"a": 1.0} and rows[0]["box"] == box


def test_concept_sampling_refuses_unknown_foreign_and_badly_weighted_concepts(concept_generator, trained_tiny, jsrt_images,
                                                                            tmp_path):
    work = concept_generator
    def refused(out, params, message, **extra):
        with pytest.raises(Exception) as err:
            sample_concepts(extra.pop("work", work), jsrt_images, tmp_path / out, params, **extra)
        assert re.search(message, str(err.value.__cause__ or err.value)), str(err.value.__cause__ or err.value)

    refused("c", {"concepts": {"c": 1.0}}, r"Concept 'c' is not in .* \(it has \['a', 'b'\]\)")
    refused("zero", {"concepts": {"a": 0.5, "b": -0.5}}, "sum to more than 0")
    refused("none", {}, "needs concepts")
    # the original tiny generator differs from the copy the concepts were made for
    refused("foreign", {"concepts": {"a": 1.0}}, "learned for another generator", work=trained_tiny["work_dir"],
            concept_dir=f"{work}/concepts")
    assert not list((tmp_path / "foreign").glob("*.png")), "nothing written"
