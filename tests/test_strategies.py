"""The strategy registry and job planning (no models needed), then every sampling strategy on real JSRT images
with the tiny trained pipeline; synthetic datasets; DICOM output."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
import torch
from monai.transforms import LoadImage

from bundle.data import read_datalist
from bundle.errors import BundleInputError
from bundle.sampling import plan_jobs, strategy_counts
from bundle.strategies import (STRATEGIES, STRATEGY_PARAMS, Plan, Strategy, box_mask, latent_mask, register,
                               strategy_params)

from .conftest import JSRT, run_bundle, workflow

ALL = {name: 1 for name in STRATEGIES if name != "concept"}  # concepts need learned files: tests/test_concepts.py


def embeddings(n: int = 4, tokens: int = 3, dim: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, tokens, dim, generator=torch.Generator().manual_seed(seed)) * 5


def rows(n: int, labels: list[str]) -> list[dict]:
    return [{"image": f"/data/img{i}.png", "id": f"img{i}", "sex": labels[i % len(labels)]} for i in range(n)]


def test_plan_carries_labels_and_keeps_interpolation_within_a_label():
    pool, e = rows(8, ["F", "M"]), embeddings(8)
    jobs = plan_jobs(pool, e, "interpolation", num_samples=3, label_columns=["sex"], seed=5)
    assert len(jobs) == 24 and [j["seed"] for j in jobs] == list(range(5, 29))
    for job in jobs:
        a, b = job["sources"]
        assert a != b and pool[a]["sex"] == pool[b]["sex"] == job["labels"]["sex"]
        assert 0.25 <= job["params"]["t"] <= 0.75
    assert jobs == plan_jobs(pool, e, "interpolation", num_samples=3, label_columns=["sex"], seed=5)
    across = plan_jobs(pool, e, "interpolation", total_samples=40, label_columns=["sex"],
                       params={"interpolation": {"across_labels": True}})
    assert any(pool[j["sources"][0]]["sex"] != pool[j["sources"][1]]["sex"] for j in across)
    for job in across:  # the label of the nearer end
        nearer = job["sources"][0] if job["params"]["t"] <= 0.5 else job["sources"][1]
        assert job["labels"]["sex"] == pool[nearer]["sex"]
    manifold = plan_jobs(pool, e, "manifold", num_samples=1, label_columns=["sex"])
    assert all({pool[i]["sex"] for i in j["sources"]} == {j["labels"]["sex"]} for j in manifold)
    assert all(len(j["sources"]) == 4 for j in manifold)  # the whole label group fits the Gaussian
    neighbours = plan_jobs(pool, e, "manifold", num_samples=1, label_columns=["sex"],
                           params={"manifold": {"model": "neighbours", "neighbours": 2}})
    for job in neighbours:
        assert len(job["sources"]) == 3 and sum(job["params"]["weights"]) == pytest.approx(1, abs=1e-5)


def test_strategy_mix_is_split_exactly_and_bad_plans_are_refused():
    assert strategy_counts({"reconstruction": 1, "interpolation": 1, "perturbation": 1}, 10) == \
        {"reconstruction": 4, "interpolation": 3, "perturbation": 3}
    assert strategy_counts("img2img", 5) == {"img2img": 5}
    pool, e = rows(4, ["F"]), embeddings(4)
    jobs = plan_jobs(pool, e, {"reconstruction": 3, "img2img": 1}, total_samples=8)
    assert [j["sources"][0] for j in jobs] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert sorted(j["strategy"] for j in jobs).count("img2img") == 2
    assert len({j["name"] for j in jobs}) == 8
    with pytest.raises(BundleInputError, match="not known"):
        plan_jobs(pool, e, "dream", num_samples=1)
    with pytest.raises(BundleInputError, match="Label column 'age'"):
        plan_jobs(pool, e, "reconstruction", num_samples=1, label_columns=["age"])
    with pytest.raises(BundleInputError, match="has one image"):
        plan_jobs(rows(2, ["F", "M"]), e[:2], "manifold", num_samples=1, label_columns=["sex"])
    with pytest.raises(BundleInputError, match="unknown keys"):
        plan_jobs(pool, e, "perturbation", num_samples=1, params={"perturbation": {"sigma": 1}})


def test_box_masks_follow_the_image_axes_and_reach_the_latent_grid():
    mask = box_mask([0.5, 0.0, 1.0, 0.25], (8, 8))  # right half (x), top quarter (y)
    assert mask.shape == (1, 8, 8) and mask.sum() == 4 * 2 and mask[0, 4:, :2].all()
    assert torch.equal(latent_mask(mask, (4, 4))[0, 2:, :1], torch.ones(2, 1)) and latent_mask(mask, (4, 4)).sum() == 2
    with pytest.raises(BundleInputError, match="x0 < x1"):
        box_mask([0.6, 0.0, 0.5, 1.0], (8, 8))


def test_a_registered_strategy_is_planned_with_its_defaults_and_validated(monkeypatch):
    class Mirror(Strategy):
        name = "mirror"
        defaults = {"partner": 1}

        def check(self, params):
            if params["partner"] < 0:
                raise BundleInputError("mirror partner is negative: give a pool index.")

        def plan(self, anchor, params, pool, rng):
            return Plan([anchor, params["partner"]], {"partner": params["partner"]}, params["partner"])

    for registry in (STRATEGIES, STRATEGY_PARAMS):
        monkeypatch.setitem(registry, "mirror", None)  # so that the test's strategy is removed afterwards
    register(Mirror)
    pool, e = rows(3, ["F", "M", "F"]), embeddings(3)
    jobs = plan_jobs(pool, e, {"mirror": 1, "reconstruction": 1}, num_samples=2, label_columns=["sex"])
    mirrored = [j for j in jobs if j["strategy"] == "mirror"]
    assert len(mirrored) == 3 and all(j["sources"][1] == 1 and j["labels"]["sex"] == "M" for j in mirrored)
    assert strategy_params({"mirror": {"partner": 2}})["mirror"] == {"partner": 2}
    with pytest.raises(BundleInputError, match="partner is negative"):
        plan_jobs(pool, e, "mirror", num_samples=1, params={"mirror": {"partner": -1}})
    # the built-in ones: defaults for each, and a bad value refused before any job is planned
    assert set(STRATEGY_PARAMS) == set(STRATEGIES)
    with pytest.raises(BundleInputError, match="Manifold model 'kde'"):
        plan_jobs(pool, e, "manifold", num_samples=1, params={"manifold": {"model": "kde"}})


# ---- each strategy's embedding and batch rendering, without networks ---------------------------------------


def test_each_strategy_conditions_on_the_embedding_it_planned():
    from bundle.manifold import combine, gaussian_sample, perturb, slerp
    from bundle.strategies import _stream

    pool, e = rows(6, ["F", "M"]), embeddings(6)
    original = e.clone()
    job = plan_jobs(pool, e, "reconstruction", num_samples=1)[2]
    context = STRATEGIES["reconstruction"].context(job, e)
    assert torch.equal(context, e[2])
    context += 1  # a job's context is its own: changing it leaves the pool's embeddings alone
    assert torch.equal(e, original)
    assert STRATEGIES["reconstruction"].context({**job, "concept": "tokens"}, e) == "tokens"

    for job in plan_jobs(pool, e, "interpolation", num_samples=2, label_columns=["sex"], seed=3):
        a, b = job["sources"]
        assert torch.equal(STRATEGIES["interpolation"].context(job, e), slerp(e[a], e[b], job["params"]["t"]))

    jobs = plan_jobs(pool, e, "perturbation", num_samples=2, params={"perturbation": {"scale": 0.5}})
    contexts = [STRATEGIES["perturbation"].context(j, e) for j in jobs]
    assert torch.equal(contexts[0], perturb(e[0], 0.5, _stream(jobs[0]["seed"], 1)))
    assert torch.equal(contexts[0], STRATEGIES["perturbation"].context(jobs[0], e)), "the same seed, the same context"
    assert not torch.equal(contexts[0], contexts[1]) and not torch.equal(contexts[0], e[0])
    torch.testing.assert_close(contexts[0].norm(dim=-1), e[0].norm(dim=-1))  # token lengths kept
    still = plan_jobs(pool, e, "perturbation", num_samples=1, params={"perturbation": {"scale": 0.0}})[0]
    torch.testing.assert_close(STRATEGIES["perturbation"].context(still, e), e[0])

    gaussian = plan_jobs(pool, e, "manifold", num_samples=1, label_columns=["sex"],
                         params={"manifold": {"temperature": 0.5}})[1]
    assert gaussian["sources"] == [1, 3, 5] and gaussian["params"] == {"model": "gaussian", "temperature": 0.5}
    assert torch.equal(STRATEGIES["manifold"].context(gaussian, e),
                       gaussian_sample(e[[1, 3, 5]], _stream(gaussian["seed"], 1), 0.5))
    neighbours = plan_jobs(pool, e, "manifold", num_samples=1, label_columns=["sex"],
                           params={"manifold": {"model": "neighbours", "neighbours": 1, "concentration": 2.0}})[4]
    assert neighbours["sources"][0] == 4 and len(neighbours["sources"]) == 2 and neighbours["params"]["model"] == "neighbours"
    assert pool[neighbours["sources"][1]]["sex"] == "F"
    torch.testing.assert_close(STRATEGIES["manifold"].context(neighbours, e),
                               combine(e[neighbours["sources"]], torch.tensor(neighbours["params"]["weights"])))


def test_interpolation_picks_its_weight_and_partner_within_the_settings(caplog):
    pool, e = rows(5, ["F", "M", "F", "F", "M"]), embeddings(5)
    jobs = plan_jobs(pool, e, "interpolation", num_samples=20, label_columns=["sex"],
                     params={"interpolation": {"t_min": 0.6, "t_max": 0.9}})
    ts = [j["params"]["t"] for j in jobs]
    assert all(0.6 <= t <= 0.9 for t in ts) and max(ts) - min(ts) > 0.2 and all(round(t, 6) == t for t in ts)
    assert {j["params"]["across_labels"] for j in jobs} == {False}
    assert all(j["labels"]["sex"] == pool[j["sources"][1]]["sex"] for j in jobs), "t > 0.5: the partner's labels"
    middle = plan_jobs(pool, e, "interpolation", total_samples=1, params={"interpolation": {
        "t_min": 0.5, "t_max": 0.5, "across_labels": True}}, label_columns=["sex"])[0]
    assert middle["params"]["t"] == 0.5 and middle["labels"]["sex"] == pool[middle["anchor"]]["sex"], \
        "halfway: the anchor's labels"
    partners = {j["sources"][1] for j in jobs if j["anchor"] == 0}
    assert partners == {2, 3}, "every other image of the group is a partner, the anchor never"
    caplog.set_level(logging.WARNING, logger="bundle.strategies")
    lonely = plan_jobs(rows(3, ["F", "M", "X"]), e[:3], "interpolation", num_samples=1, label_columns=["sex"])
    assert all(j["sources"] == [j["anchor"]] * 2 for j in lonely)
    assert [r.getMessage() for r in caplog.records] == [
        "Label group(s) [('F',), ('M',), ('X',)] have a single image: their interpolations are reconstructions."]
    caplog.clear()
    plan_jobs(pool, e, "interpolation", num_samples=1, label_columns=["sex"])
    assert not caplog.records


def test_jobs_are_batched_by_what_their_sampling_shares():
    pool, e = rows(2, ["F"]), embeddings(2)
    key = {name: STRATEGIES[name].batch_key(plan_jobs(pool, e, name, num_samples=1)[0])
           for name in ("reconstruction", "interpolation", "perturbation", "manifold", "img2img", "inpainting")}
    assert key["reconstruction"] == key["interpolation"] == key["perturbation"] == key["manifold"] == ("noise",)
    assert key["img2img"] == ("img2img", 0.6) and key["inpainting"] == ("inpainting",)
    strong = plan_jobs(pool, e, "img2img", num_samples=1, params={"img2img": {"strength": 0.9}})[0]
    assert STRATEGIES["img2img"].batch_key(strong) == ("img2img", 0.9)
    from bundle.strategies import concept_key

    job = {"params": {"concepts": {"b": 0.5, "a": 0.5}, "composition": "guidance"}}
    assert concept_key(job) == ('{"a": 0.5, "b": 0.5}', "guidance")
    assert concept_key({"params": {"concepts": {}}}) == () and concept_key({"params": {}}) == ()
    assert STRATEGIES["img2img"].batch_key({"params": {"strength": 0.6, **job["params"]}}) == \
        ("img2img", 0.6, '{"a": 0.5, "b": 0.5}', "guidance")


def test_img2img_and_inpainting_hand_the_sampler_real_latents_and_keep_the_outside():
    pool, e = rows(3, ["F"]), embeddings(3)
    latents = torch.arange(3 * 2 * 4 * 4, dtype=torch.float32).reshape(3, 2, 4, 4)
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    asked = {}

    def sample(**kwargs):
        asked.update(kwargs)
        return torch.full((len(kwargs["init"]), 1, 8, 8), -1.0)

    jobs = plan_jobs(pool, e, "img2img", num_samples=1, params={"img2img": {"strength": 0.3}})[1:]
    assert torch.equal(STRATEGIES["img2img"].render(jobs, sample, latents.half(), images), torch.full((2, 1, 8, 8), -1.0))
    assert torch.equal(asked["init"], latents[1:]) and asked["init"].dtype == torch.float32 and asked["strength"] == 0.3
    STRATEGIES["img2img"].render(jobs[:1], sample, latents, images)  # a batch of one job
    assert asked["strength"] == 0.3 and torch.equal(asked["init"], latents[1:2])

    box = [0.5, 0.0, 1.0, 0.5]  # right half (x), top half (y)
    jobs = plan_jobs(pool, e, "inpainting", num_samples=1, params={"inpainting": {"box": box}})
    assert jobs[0]["params"] == {"box": box, "paste": True}
    out = STRATEGIES["inpainting"].render(jobs, sample, latents, images)
    inside = box_mask(box, (8, 8)).bool().expand(3, 1, 8, 8)
    assert torch.equal(out[inside], torch.full((int(inside.sum()),), -1.0)), "the inside is generated"
    assert torch.equal(out[~inside], images[~inside]), "the outside is the real image's own pixels"
    assert torch.equal(asked["init"], latents) and asked["mask"].shape == (3, 1, 4, 4)
    assert torch.equal(asked["mask"][0, 0], box_mask(box, (4, 4))[0])

    wide = torch.rand(3, 1, 8, 4)  # 8 wide (x), 4 high (y); latents 4 x 2
    out = STRATEGIES["inpainting"].render(jobs, lambda **kw: asked.update(kw) or torch.full((3, 1, 8, 4), -1.0),
                                          latents[..., :2], wide)
    assert torch.equal(asked["mask"][0, 0], box_mask(box, (4, 2))[0]) and torch.equal(out[0, 0, :4], wide[0, 0, :4])

    kept = plan_jobs(pool, e, "inpainting", num_samples=1, params={"inpainting": {"box": box, "paste": False}})
    assert torch.equal(STRATEGIES["inpainting"].render(kept, sample, latents, images), torch.full((3, 1, 8, 8), -1.0))


def test_inpainting_takes_each_rows_mask_file_before_the_box(tmp_path):
    from PIL import Image

    drawing = np.zeros((8, 8), np.uint8)
    drawing[:, :4] = 255  # the left half (x < 4), all rows
    Image.fromarray(drawing).save(tmp_path / "left.png")
    pool = [{"image": "/data/a.png", "mask": str(tmp_path / "left.png")}, {"image": "/data/b.png", "mask": ""}]
    jobs = plan_jobs(pool, embeddings(2), "inpainting", num_samples=1)
    assert jobs[0]["params"] == {"mask": str(tmp_path / "left.png"), "paste": True}
    assert jobs[1]["params"] == {"box": STRATEGY_PARAMS["inpainting"]["box"], "paste": True}
    left = STRATEGIES["inpainting"].pixel_mask(jobs[0], (8, 8))
    assert left[0, :4].all() and not left[0, 4:].any()
    other = plan_jobs([{**pool[0], "roi": pool[0]["mask"]}], embeddings(1), "inpainting", num_samples=1,
                      params={"inpainting": {"mask_column": "roi"}})
    assert other[0]["params"]["mask"] == str(tmp_path / "left.png")


def test_strategy_settings_are_refused_whole_and_defaults_stay_put():
    params = strategy_params({"perturbation": {"scale": 0.9}})
    assert params["perturbation"] == {"scale": 0.9} and STRATEGY_PARAMS["perturbation"] == {"scale": 0.3}
    params["inpainting"]["box"][0] = 0.0
    assert STRATEGY_PARAMS["inpainting"]["box"][0] == 0.55
    with pytest.raises(BundleInputError) as err:
        strategy_params({"dream": {}})
    assert str(err.value) == f"strategy_params names 'dream', which is not a strategy: use {list(STRATEGIES)}."
    with pytest.raises(BundleInputError) as err:
        strategy_params({"manifold": {"temprature": 1, "k": 2}})
    assert str(err.value) == ("strategy_params for 'manifold' has unknown keys ['k', 'temprature']: it takes "
                              "['concentration', 'model', 'neighbours', 'temperature'].")
    assert strategy_params("{'img2img': {'strength': 0.4}}")["img2img"]["strength"] == 0.4, "the command line's text"
    for bad in ("{'img2img': {'strength': }", "{'img2img': 0.4}", "img2img"):  # what the command line passes through
        with pytest.raises(BundleInputError) as err:
            strategy_params(bad)
        shown = repr(bad) if bad != "{'img2img': 0.4}" else "{'img2img': 0.4}"
        assert str(err.value) == (f"strategy_params {shown} is not a dict of {{strategy: {{setting: value}}}}: write it "
                                  "as \"{'img2img': {'strength': 0.4}}\" (quoted for the shell).")
    pool, e = rows(2, ["F", "M"]), embeddings(2)
    with pytest.raises(BundleInputError) as err:
        plan_jobs(pool, e, "manifold", num_samples=1, label_columns=["sex"])
    assert str(err.value) == ("Manifold sampling fits a Gaussian per label group, but group ('F',) has one image: add "
                              "images, drop --label_columns or use model 'neighbours'.")
    with pytest.raises(BundleInputError) as err:
        plan_jobs(pool, e, "manifold", num_samples=1, params={"manifold": {"model": "kde"}})
    assert str(err.value) == "Manifold model 'kde' is not known: use 'gaussian' or 'neighbours'."
    with pytest.raises(BundleInputError) as err:
        plan_jobs(pool, e, "concept", num_samples=1)
    assert str(err.value) == ("The concept strategy needs concepts: e.g. --strategy_params \"{'concept': {'concepts': "
                              "{'pneumonia': 1.0}}}\" (learn them with configs/concept.json).")
    with pytest.raises(BundleInputError) as err:
        plan_jobs(pool, e, "img2img", num_samples=1, params={"img2img": {"concepts": {"pneumonia": 1.0}}})
    assert str(err.value) == "Concepts were asked for, but no concept folder is set: pass --concept_dir."


def test_concept_jobs_carry_their_concepts_weights_and_files(tmp_path):
    """A real concept folder (tokens checked against the generator's two model files), no networks needed."""
    from bundle.concepts import Composition, ConceptBank, generator_fingerprint, save_concept

    (tmp_path / "ae.pt").write_bytes(b"autoencoder")
    (tmp_path / "unet.pt").write_bytes(b"diffusion")
    fingerprint = generator_fingerprint(tmp_path / "ae.pt", tmp_path / "unet.pt")
    tokens = {"pneumonia": torch.full((2, 16), 1.0), "normal": torch.full((2, 16), -1.0)}
    for name, t in tokens.items():
        save_concept(tmp_path / "concepts" / f"{name}.safetensors", t, {"generator": fingerprint})
    bank = ConceptBank(tmp_path / "concepts", tmp_path / "ae.pt", tmp_path / "unet.pt", 16)
    pool, e = rows(3, ["F"]), embeddings(3)
    files = {n: str(tmp_path / "concepts" / f"{n}.safetensors") for n in tokens}

    jobs = plan_jobs(rows(3, ["F", "M"]), e, "concept", num_samples=1, concepts=bank, label_columns=["sex"],
                     params={"concept": {"concepts": {"pneumonia": 3, "normal": 1}}})
    assert [j["sources"] for j in jobs] == [[0], [1], [2]] and [j["anchor"] for j in jobs] == [0, 1, 2]
    assert [j["labels"]["sex"] for j in jobs] == ["F", "M", "F"], "the pool image lends its labels"
    assert jobs[0]["params"] == {"concepts": {"pneumonia": 3.0, "normal": 1.0}, "composition": "mix",
                                 "concept_files": files}
    torch.testing.assert_close(STRATEGIES["concept"].context(jobs[1], e), torch.full((2, 16), 0.5))
    assert STRATEGIES["concept"].batch_key(jobs[0]) == ("noise", '{"normal": 1.0, "pneumonia": 3.0}', "mix")

    guided = plan_jobs(pool, e, "concept", num_samples=1, concepts=bank,
                       params={"concept": {"concepts": {"pneumonia": 1.0, "normal": -0.5}, "composition": "guidance"}})
    composition = STRATEGIES["concept"].context(guided[0], e)
    assert isinstance(composition, Composition) and composition.names == ("pneumonia", "normal")
    assert composition.weights == (1.0, -0.5) and torch.equal(composition.tokens[1], tokens["normal"])
    assert guided[0]["params"]["composition"] == "guidance"

    labelled = plan_jobs(rows(2, ["F", "M"]), e[:2], "img2img", num_samples=1, label_columns=["sex"], concepts=bank,
                         params={"img2img": {"strength": 0.4, "concepts": {"normal": 1.0}}})
    assert labelled[1]["sources"] == [1] and labelled[1]["labels"] == {"sex": "M"}
    assert labelled[1]["params"] == {"strength": 0.4, "concepts": {"normal": 1.0}, "composition": "mix",
                                     "concept_files": {"normal": files["normal"]}}
    torch.testing.assert_close(STRATEGIES["img2img"].context(labelled[1], e), tokens["normal"])
    inpainted = plan_jobs(rows(2, ["F", "M"]), e[:2], "inpainting", num_samples=1, label_columns=["sex"], concepts=bank,
                          params={"inpainting": {"concepts": {"pneumonia": 1.0}}})
    assert inpainted[1]["sources"] == [1] and inpainted[1]["labels"] == {"sex": "M"}
    assert inpainted[1]["params"]["concept_files"] == {"pneumonia": files["pneumonia"]}
    torch.testing.assert_close(STRATEGIES["inpainting"].context(inpainted[1], e), tokens["pneumonia"])
    with pytest.raises(BundleInputError, match="Concept composition 'sum' is not known"):
        plan_jobs(pool, e, "concept", num_samples=1, concepts=bank,
                  params={"concept": {"concepts": {"normal": 1.0}, "composition": "sum"}})


@pytest.mark.parametrize("box", [[0.0, 0.0, 1.0], [0.5, 0.0, 0.5, 1.0], [0.0, 0.5, 1.0, 0.4], [0.0, 0.5, 1.0, 0.5],
                                 [-0.1, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.1]])
def test_impossible_boxes_are_refused_whole(box):
    with pytest.raises(BundleInputError) as err:
        plan_jobs(rows(1, ["F"]), embeddings(1), "inpainting", num_samples=1, params={"inpainting": {"box": box}})
    assert str(err.value) == (f"Inpainting box {box} is not [x0, y0, x1, y1] with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 "
                              "<= 1 (fractions of the image's width and height).")


def test_box_masks_cover_the_whole_image_and_at_least_one_pixel():
    assert box_mask([0.0, 0.0, 1.0, 1.0], (6, 4)).sum() == 24
    thin = box_mask([0.5, 0.5, 0.51, 0.52], (8, 8))
    assert thin.sum() == 1 and thin[0, 4, 4] == 1
    narrow = box_mask([0.75, 0.0, 0.76, 1.0], (8, 4))  # a box narrower than a pixel, on a non-square image
    assert narrow[0, 6].all() and narrow.sum() == 4
    assert box_mask([0.25, 0.5, 0.75, 1.0], (8, 4))[0, 2:6, 2:4].all() and box_mask([0.25, 0.5, 0.75, 1.0], (8, 4)).sum() == 8
    spread = torch.zeros(1, 8, 8)
    spread[0, 0, 0] = spread[0, 7, 7] = 1
    assert latent_mask(spread, (2, 2))[0].tolist() == [[1.0, 0.0], [0.0, 1.0]]


def sample(settings: dict, out, run_id: str = "sample", **extra):
    return run_bundle("inference.json", run_id, {**settings, "output_dir": str(out), "num_inputs": 4, **extra})


def read_manifest(folder) -> list[dict]:
    with open(folder / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_every_strategy_makes_images_of_the_right_shape_and_a_manifest_that_loaders_accept(trained_tiny, tmp_path):
    import pandas as pd

    sample(trained_tiny, tmp_path, strategy=ALL, num_samples=3)
    rows = read_manifest(tmp_path)
    assert len(rows) == 12 and {r["strategy"] for r in rows} == set(ALL)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(r["image"] for r in rows)
    for row in rows:
        image = LoadImage(image_only=True)(str(tmp_path / row["image"]))
        assert tuple(image.shape) == (32, 32) and 0 <= float(image.min()) and float(image.max()) <= 255
        assert float(image.std()) > 0
        n_sources = len(row["source_ids"].split(";"))
        assert n_sources == {"interpolation": 2, "manifold": 4}.get(row["strategy"], 1)
        json.loads(row["params"])
    # the bundle's own loader and pandas both read it; image paths are relative to the manifest
    loaded = read_datalist(tmp_path / "manifest.csv")
    assert all((tmp_path / r["image"]).exists() for r in rows) and all(r["image"].startswith(str(tmp_path)) for r in loaded)
    frame = pd.read_csv(tmp_path / "manifest.csv")
    assert list(frame["seed"]) == list(range(12)) and frame["image"].tolist() == [r["image"] for r in rows]


@pytest.mark.parametrize("strategy", ["interpolation", "perturbation", "manifold", "img2img"])
def test_same_seed_same_image_for_each_strategy(trained_tiny, tmp_path, strategy):
    sample(trained_tiny, tmp_path / "a", strategy=strategy, num_samples=2, sample_batch_size=8)
    sample(trained_tiny, tmp_path / "b", strategy=strategy, num_samples=2, sample_batch_size=3)
    sample(trained_tiny, tmp_path / "c", strategy=strategy, num_samples=2, sample_seed=50)
    names = [r["image"] for r in read_manifest(tmp_path / "a")]
    assert names == [r["image"] for r in read_manifest(tmp_path / "b")]
    for name in names:  # batching does not change an image; another seed does
        a, b = (np.asarray(LoadImage(image_only=True)(str(tmp_path / d / name))) for d in ("a", "b"))
        assert np.abs(a - b).max() <= 1
    c = np.asarray(LoadImage(image_only=True)(str(tmp_path / "c" / names[0])))
    assert np.abs(c - np.asarray(LoadImage(image_only=True)(str(tmp_path / "a" / names[0])))).max() > 1


def test_ddpm_sampler_is_reproducible_per_image_whatever_the_batch(trained_tiny, tmp_path):
    for name, batch in (("a", 8), ("b", 1)):
        sample(trained_tiny, tmp_path / name, sampler="ddpm", num_samples=2, sample_batch_size=batch)
    rows = read_manifest(tmp_path / "a")
    assert {r["sampler"] for r in rows} == {"DDPMScheduler"}
    for row in rows:
        a, b = (np.asarray(LoadImage(image_only=True)(str(tmp_path / d / row["image"]))) for d in ("a", "b"))
        assert np.abs(a - b).max() <= 1
    sample(trained_tiny, tmp_path / "p", sampler="pndm", num_samples=1, strategy="img2img")
    assert len(list((tmp_path / "p").glob("*.png"))) == 4


def test_inpainting_keeps_the_outside_and_changes_the_inside(trained_tiny, tmp_path):
    wf = workflow("inference.json", "sample", {**trained_tiny, "num_inputs": 2})
    images = torch.stack([wf.parser.get_parsed_content("preprocessing")(dict(r))["image"] for r in
                          wf.parser.get_parsed_content("inputs")])
    box = [0.25, 0.25, 0.75, 0.75]
    sample(trained_tiny, tmp_path, strategy="inpainting", num_inputs=2, num_samples=1,
           strategy_params={"inpainting": {"box": box}}, output_formats=["png16"])
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[8:24, 8:24] = True
    for row, real in zip(read_manifest(tmp_path), images):
        out = torch.as_tensor(np.asarray(LoadImage(image_only=True)(str(tmp_path / row["image"]))).astype(np.float32))
        out = out / 65535
        assert json.loads(row["params"])["box"] == box
        torch.testing.assert_close(out[~inside], real[0][~inside].float(), atol=1 / 65535 + 1e-3, rtol=0)
        assert (out[inside] - real[0][inside]).abs().mean() > 0.02


def test_mask_files_from_the_datalist_drive_inpainting(trained_tiny, tmp_path):
    images = sorted((JSRT / "images").glob("*.png"))[:2]
    pool = tmp_path / "pool.csv"
    pool.write_text("image,mask,nodule\n" + "".join(f"{p},{JSRT / 'masks' / 'left_lung' / p.name},1\n" for p in images))
    sample(trained_tiny, tmp_path / "out", input_dir=str(pool), strategy="inpainting", num_samples=1,
           label_columns=["nodule"], output_formats=["png16"])
    rows = read_manifest(tmp_path / "out")
    # pixels change inside the mask file's region only (a transposed or shifted mask would change the other lung)
    from bundle.data import read_mask

    wf = workflow("inference.json", "sample", {**trained_tiny, "input_dir": str(pool), "num_inputs": 2})
    preprocessing = wf.parser.get_parsed_content("preprocessing")
    for row, image in zip(rows, images):
        real = preprocessing({"image": str(image)})["image"][0].float()
        out = torch.as_tensor(np.asarray(LoadImage(image_only=True)(str(tmp_path / "out" / row["image"]))).astype(np.float32))
        inside = read_mask(str(JSRT / "masks" / "left_lung" / image.name), (32, 32))[0].bool()
        grown = torch.nn.functional.max_pool2d(inside[None, None].float(), 3, 1, 1)[0, 0].bool()  # edge of the latent grid
        torch.testing.assert_close(out[~grown] / 65535, real[~grown], atol=1 / 65535 + 1e-3, rtol=0)
        assert (out[inside] / 65535 - real[inside]).abs().mean() > 0.02
    assert [json.loads(r["params"])["mask"] for r in rows] == [str(JSRT / "masks" / "left_lung" / p.name) for p in images]
    assert {r["nodule"] for r in rows} == {"1"}
    pool.write_text(f"image,mask\n{images[0]},{tmp_path / 'missing.png'}\n")
    with pytest.raises(Exception) as err:
        sample(trained_tiny, tmp_path / "bad", input_dir=str(pool), strategy="inpainting", num_samples=1)
    assert "missing.png' does not exist" in str(err.value.__cause__ or err.value)


def test_dicom_secondary_capture_round_trips_and_is_marked_synthetic(trained_tiny, tmp_path, cxr_samples):
    import pydicom

    from bundle.data import DICOM_READER

    source = cxr_samples / "nih_cxr_monochrome2.dcm"
    header = pydicom.dcmread(source, stop_before_pixels=True)
    private = {str(header[k].value) for k in ("PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID",
                                              "SOPInstanceUID") if k in header and str(header[k].value)}
    pool = tmp_path / "pool.csv"
    pool.write_text(f"image\n{source}\n{sorted((JSRT / 'images').glob('*.png'))[0]}\n")
    out = tmp_path / "out"
    sample(trained_tiny, out, input_dir=str(pool), num_samples=1, output_formats=["png", "dicom"])
    uids = set()
    for row in read_manifest(out):
        path = out / row["image"].replace(".png", ".dcm")
        ds = pydicom.dcmread(path)
        assert ds.ConversionType == "SYN" and list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert "synthetic" in ds.SeriesDescription.lower() and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert str(ds.PatientName) == "SYNTHETIC" and ds.pixel_array.shape == (32, 32)
        assert not private & {str(e.value) for e in ds.iterall()}  # nothing of the source's identity
        uids.add(ds.SOPInstanceUID)
        png = np.asarray(LoadImage(image_only=True)(str(out / row["image"]))) / 255
        dcm = np.asarray(LoadImage(image_only=True, reader=DICOM_READER)(str(path))) / 65535
        assert np.abs(png - dcm).max() <= 0.5 / 255 + 1e-4  # same image, same orientation through the bundle's reader
        assert np.abs(ds.pixel_array.T / 65535 - png).max() <= 0.5 / 255 + 1e-4
    assert len(uids) == 2
    # re-running keeps the UIDs (they are derived from the output, not random)
    first = {p.name: pydicom.dcmread(p).SOPInstanceUID for p in out.glob("*.dcm")}
    for p in out.glob("*.dcm"):
        p.unlink()
    sample(trained_tiny, out, input_dir=str(pool), num_samples=1, output_formats=["png", "dicom"])
    assert {p.name: pydicom.dcmread(p).SOPInstanceUID for p in out.glob("*.dcm")} == first


def test_interpolation_strip_and_bad_requests(trained_tiny, tmp_path):
    run_bundle("inference.json", "interpolate", {**trained_tiny, "num_inputs": 3, "interpolation_steps": 3,
                                                 "interpolation_dir": str(tmp_path)})
    rows = read_manifest(tmp_path)
    assert len(rows) == 5 and [json.loads(r["params"])["t"] for r in rows] == [0, 0.5, 1, 0.5, 1]
    strip = LoadImage(image_only=True)(str(tmp_path / "strip.png"))
    assert sorted(strip.shape) == [32, 160]
    for bad, message in (({"strategy": "dream"}, "not known"), ({"output_formats": ["png", "png16"]}, "same file twice"),
                         ({"strategy": "inpainting", "strategy_params": {"inpainting": {"box": [0, 0, 2, 1]}}}, "box"),
                         ({"sampler": "euler"}, "Sampler 'euler'")):
        with pytest.raises(Exception) as err:
            sample(trained_tiny, tmp_path / "bad", num_samples=1, **bad)
        cause = err.value.__cause__ or err.value
        assert isinstance(cause, BundleInputError) and message in str(cause)
