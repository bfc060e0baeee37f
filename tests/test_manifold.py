"""Embedding-space operations: slerp, perturbation, Gaussian draws and neighbour mixes (no models needed)."""

from __future__ import annotations

import pytest
import torch

from bundle.errors import BundleInputError
from bundle.manifold import combine, gaussian_sample, nearest, perturb, slerp, slerp_path
from bundle.sampling import interpolation_jobs


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
