"""Embedding-space operations and job planning (no models needed)."""

from __future__ import annotations

import pytest
import torch

from bundle.errors import BundleInputError
from bundle.manifold import combine, gaussian_sample, nearest, perturb, slerp, slerp_path
from bundle.sampling import box_mask, interpolation_jobs, latent_mask, plan_jobs, strategy_counts


def embeddings(n: int = 4, tokens: int = 3, dim: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, tokens, dim, generator=torch.Generator().manual_seed(seed)) * 5


def test_slerp_endpoints_are_the_sources_and_the_path_stays_on_the_sphere():
    a, b = embeddings()[:2]
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    torch.testing.assert_close(slerp(a, b, 1e-9), a)
    middle = slerp(a, b, 0.5)
    # per token: the length is the mean of the two lengths, the direction halfway along the great circle
    torch.testing.assert_close(middle.norm(dim=-1), (a.norm(dim=-1) + b.norm(dim=-1)) / 2)
    ua, ub, um = (x / x.norm(dim=-1, keepdim=True) for x in (a, b, middle))
    torch.testing.assert_close((um * ua).sum(-1), (um * ub).sum(-1))
    # parallel tokens do not divide by zero
    assert torch.isfinite(slerp(a, 2 * a, 0.3)).all()
    with pytest.raises(BundleInputError, match="shapes"):
        slerp(a, b[:1], 0.5)


def test_slerp_path_through_three_embeddings_passes_through_each():
    e = embeddings(3)
    path = slerp_path(list(e), steps=4)
    assert len(path) == 7
    for k, source in zip((0, 3, 6), e):
        assert torch.equal(path[k], source)
    with pytest.raises(BundleInputError, match="at least two"):
        slerp_path([e[0]], 4)
    jobs = interpolation_jobs(3, 4)
    assert [j["params"]["t"] for j in jobs] == pytest.approx([0, 1 / 3, 2 / 3, 1, 1 / 3, 2 / 3, 1])
    assert [j["sources"] for j in jobs][3:5] == [[0, 1], [1, 2]] and {j["seed"] for j in jobs} == {0}


def test_perturbation_keeps_token_lengths_and_grows_with_scale():
    e = embeddings()[0]
    assert torch.allclose(perturb(e, 0.0, torch.Generator().manual_seed(0)), e, atol=1e-5)
    angles = []
    for scale in (0.1, 0.5, 2.0):
        moved = perturb(e, scale, torch.Generator().manual_seed(0))
        torch.testing.assert_close(moved.norm(dim=-1), e.norm(dim=-1))
        angles.append(float(torch.nn.functional.cosine_similarity(moved, e, dim=-1).mean()))
    assert angles[0] > angles[1] > angles[2]
    torch.testing.assert_close(perturb(e, 0.5, torch.Generator().manual_seed(3)),
                               perturb(e, 0.5, torch.Generator().manual_seed(3)))
    with pytest.raises(BundleInputError, match="negative"):
        perturb(e, -1.0, torch.Generator())


def test_gaussian_draws_follow_the_pool_and_neighbour_mixes_are_convex():
    e = embeddings(6)
    mean = e.double().mean(0)
    at_mean = gaussian_sample(e, torch.Generator().manual_seed(0), temperature=0.0)
    torch.testing.assert_close(at_mean / at_mean.norm(dim=-1, keepdim=True),
                               (mean / mean.norm(dim=-1, keepdim=True)).float())
    draws = torch.stack([gaussian_sample(e, torch.Generator().manual_seed(s)) for s in range(200)])
    torch.testing.assert_close(draws.norm(dim=-1)[0], e.norm(dim=-1).mean(0))
    # draws lie in the span of the pool around its mean
    basis = (e - e.mean(0)).flatten(1).double()
    residual = (draws.double().flatten(1) - draws.double().flatten(1) @ torch.linalg.pinv(basis) @ basis)
    assert residual.norm() / draws.norm() < 0.6  # the only part outside is the length renormalisation
    with pytest.raises(BundleInputError, match="at least two"):
        gaussian_sample(e[:1], torch.Generator())
    one_hot = torch.tensor([0.0, 1.0, 0.0])
    torch.testing.assert_close(combine(e[:3], one_hot), e[1])
    assert nearest(torch.stack([e[0], e[0] * 2, -e[0]]), 0, 1) == [1]


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
