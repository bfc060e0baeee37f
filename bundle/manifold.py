"""Moving around the DINO embedding space: interpolation, perturbation and new embeddings from a pool.

Embeddings are ``(tokens, dim)`` tensors (the CLS token alone, or CLS + patch tokens). DINO tokens leave
the ViT through a final LayerNorm, so their length carries little meaning and their direction carries
the content: every operation here works per token on directions and keeps token lengths where the
sources had them, which keeps new embeddings inside the region the diffusion model was trained on.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .errors import BundleInputError

_EPS = 1e-8


def _norms(x: torch.Tensor) -> torch.Tensor:
    return x.norm(dim=-1, keepdim=True).clamp_min(_EPS)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation per token: directions along the great circle, lengths linearly.

    ``t`` = 0 returns ``a`` and ``t`` = 1 returns ``b`` exactly. Nearly parallel tokens fall back to the
    linear path, where the two agree.
    """
    if a.shape != b.shape:
        raise BundleInputError(f"Cannot interpolate embeddings of shapes {tuple(a.shape)} and {tuple(b.shape)}.")
    if t == 0:
        return a.clone()
    if t == 1:
        return b.clone()
    a64, b64 = a.double(), b.double()
    na, nb = _norms(a64), _norms(b64)
    ua, ub = a64 / na, b64 / nb
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    linear = sin.abs() < 1e-6
    wa = torch.where(linear, torch.full_like(theta, 1 - t), torch.sin((1 - t) * theta) / torch.where(linear, 1, sin))
    wb = torch.where(linear, torch.full_like(theta, t), torch.sin(t * theta) / torch.where(linear, 1, sin))
    direction = wa * ua + wb * ub
    direction = direction / _norms(direction)
    return (direction * ((1 - t) * na + t * nb)).to(a.dtype)


def slerp_path(embeddings: Sequence[torch.Tensor], steps: int) -> list[torch.Tensor]:
    """``steps`` embeddings per segment along consecutive pairs of two or more embeddings, ends included.

    With ``k`` embeddings the path has ``(k - 1) * (steps - 1) + 1`` points; each source is on it exactly.
    """
    if len(embeddings) < 2:
        raise BundleInputError(f"Interpolation needs at least two images, got {len(embeddings)}: pass more inputs.")
    if steps < 2:
        raise BundleInputError(f"interpolation_steps must be at least 2 (the two ends), got {steps}.")
    path = [embeddings[0].clone()]
    for a, b in zip(embeddings[:-1], embeddings[1:]):
        path += [slerp(a, b, k / (steps - 1)) for k in range(1, steps)]
    return path


def perturb(embedding: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise with standard deviation ``scale`` times the token's RMS, then each token back to its length.

    ``scale`` is thus a noise-to-signal ratio: 0 returns the embedding, 0.3 moves each token direction by
    about 17 degrees, large values approach a random direction of the same length.
    """
    if scale < 0:
        raise BundleInputError(f"perturbation scale {scale} is negative: give a noise-to-signal ratio >= 0.")
    noise = torch.randn(embedding.shape, generator=generator, dtype=torch.float64)
    e = embedding.double()
    norms = _norms(e)
    moved = e + scale * norms / e.shape[-1] ** 0.5 * noise
    return (moved / _norms(moved) * norms).to(embedding.dtype)


def combine(embeddings: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A convex combination of ``(n, tokens, dim)`` embeddings, each token set to the weighted mean length."""
    weights = weights.double() / weights.sum()
    e = embeddings.double()
    mixed = torch.einsum("n,ntd->td", weights, e)
    length = torch.einsum("n,ntd->td", weights, _norms(e))
    return (mixed / _norms(mixed) * length).to(embeddings.dtype)


def gaussian_sample(embeddings: torch.Tensor, generator: torch.Generator, temperature: float = 1.0) -> torch.Tensor:
    """One draw from the Gaussian with the pool's mean and sample covariance, tokens at the pool's mean lengths.

    The covariance is used through its square root ``(X - mean) / sqrt(n - 1)``, so a pool of ``n`` images
    in a space of any dimension needs no inversion: draws lie in the span of the pool around its mean.
    ``temperature`` scales the spread (0 gives the mean embedding).
    """
    n = embeddings.shape[0]
    if n < 2:
        raise BundleInputError(f"A Gaussian needs at least two embeddings to fit, got {n}: use a larger pool or group.")
    e = embeddings.double()
    mean = e.mean(0)
    z = torch.randn(n, generator=generator, dtype=torch.float64)
    draw = mean + temperature * torch.einsum("n,ntd->td", z, e - mean) / (n - 1) ** 0.5
    length = _norms(e).mean(0)
    return (draw / _norms(draw) * length).to(embeddings.dtype)


def nearest(embeddings: torch.Tensor, index: int, k: int) -> list[int]:
    """Indices of the ``k`` embeddings most similar (cosine, all tokens) to ``embeddings[index]``, itself excluded."""
    flat = embeddings.flatten(1).double()
    flat = flat / _norms(flat)
    similarity = flat @ flat[index]
    similarity[index] = -float("inf")
    k = min(k, embeddings.shape[0] - 1)
    return similarity.topk(k).indices.tolist() if k > 0 else []
