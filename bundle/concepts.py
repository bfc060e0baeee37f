"""Concept embeddings: a few learned context tokens that stand for one concept, in the DINO conditioning space of a
frozen generator (textual inversion, as de Wilde et al., arXiv 2303.13430, do with text tokens).

A concept is learned from images of it with the autoencoder and the diffusion UNet frozen: only its ``K`` tokens
(``K x D``, D the generator's context width) are optimised, with the diffusion loss on the images' latents. It is
saved as ``<name>.safetensors`` (the tokens, well under 1 MB) with a ``<name>.safetensors.json`` sidecar naming the
generator it belongs to; another generator refuses it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .data import hash_file, hash_json
from .errors import BundleInputError
from .io import atomic_path, atomic_write_json

logger = logging.getLogger(__name__)

MAX_CONCEPT_BYTES = 1 << 20
SUFFIX = ".safetensors"


def generator_fingerprint(autoencoder_path: str | os.PathLike, diffusion_path: str | os.PathLike) -> str:
    """Changes whenever either model file of the generator changes."""
    return hash_json([hash_file(autoencoder_path), hash_file(diffusion_path)])


def initial_tokens(contexts: torch.Tensor, num_tokens: int, init: str = "mean", seed: int = 0) -> torch.Tensor:
    """The starting ``(num_tokens, D)`` tokens from the concept images' DINO contexts ``(N, T, D)``.

    ``mean``: the images' mean tokens, repeated to ``num_tokens`` rows, each copy after the first nudged by a
    little noise (1% of the tokens' spread) so that the copies can learn different things. ``random``: Gaussian
    tokens with the per-dimension mean and spread of the images' tokens.
    """
    if num_tokens < 1:
        raise BundleInputError(f"concept_tokens {num_tokens} must be at least 1.")
    if init not in ("mean", "random"):
        raise BundleInputError(f"concept_init '{init}' is not known: choose 'mean' or 'random'.")
    contexts = contexts.float()
    flat = contexts.reshape(-1, contexts.shape[-1])
    spread = flat.std(0) if len(flat) > 1 else torch.ones(flat.shape[-1])
    g = torch.Generator().manual_seed(seed)
    if init == "random":
        return flat.mean(0) + spread * torch.randn((num_tokens, flat.shape[-1]), generator=g)
    mean = contexts.mean(0)
    tokens = mean[torch.arange(num_tokens) % len(mean)].clone()
    if num_tokens > len(mean):
        nudge = 0.01 * spread * torch.randn(tokens[len(mean):].shape, generator=g)
        tokens[len(mean):] += nudge
    return tokens


class ConceptTokens(nn.Module):
    """The learnable tokens of one concept, ``(K, D)``."""

    def __init__(self, tokens: torch.Tensor) -> None:
        super().__init__()
        self.tokens = nn.Parameter(tokens.detach().float().clone())


class ConceptConditioned(nn.Module):
    """A frozen diffusion UNet whose context is always the concept's tokens, whatever context it is called with.

    This is the network the concept trainer optimises: MONAI's ``DiffusionInferer`` passes the batch's context,
    which is replaced here by the concept tokens (one copy per sample); only those tokens have gradients. The UNet
    stays in eval mode.
    """

    def __init__(self, unet: nn.Module, concept: ConceptTokens) -> None:
        super().__init__()
        self.unet, self.concept = unet.requires_grad_(False).eval(), concept

    def train(self, mode: bool = True) -> ConceptConditioned:
        self.training = mode
        self.concept.train(mode)
        self.unet.eval()
        return self

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None, **kwargs):
        tokens = self.concept.tokens.to(x.dtype)
        return self.unet(x=x, timesteps=timesteps, context=tokens.expand(x.shape[0], -1, -1), **kwargs)


def checked_name(name: Any) -> str:
    """A concept name that is safe as a file name inside the concept folder (letters, digits, '-', '_'), or one
    sentence; every path built from a name goes through here before anything is read or written."""
    text = str(name)
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,100}", text):
        raise BundleInputError(f"concept_name '{name}' is not a usable file name: use letters, digits, '-' or '_'.")
    return text


def concept_path(folder: str | os.PathLike, name: str) -> Path:
    return Path(folder) / f"{checked_name(name)}{SUFFIX}"


def save_concept(path: str | os.PathLike, tokens: torch.Tensor, info: Mapping[str, Any]) -> None:
    """Write the tokens and their sidecar atomically; refuse a file of 1 MB or more."""
    from safetensors.torch import save_file

    path = Path(path)
    tokens = tokens.detach().float().cpu().contiguous()
    if tokens.ndim != 2:
        raise BundleInputError(f"Concept tokens must be (K, D), got shape {tuple(tokens.shape)}.")
    if tokens.numel() * 4 >= MAX_CONCEPT_BYTES:
        raise BundleInputError(f"A concept of {tuple(tokens.shape)} tokens would take {tokens.numel() * 4} bytes, over "
                               f"{MAX_CONCEPT_BYTES}: lower concept_tokens.")
    with atomic_path(path) as tmp:
        save_file({"tokens": tokens}, tmp)
    atomic_write_json(path.with_name(path.name + ".json"),
                      {**info, "num_tokens": tokens.shape[0], "token_dim": tokens.shape[1], "file": path.name})


def load_concept(path: str | os.PathLike, fingerprint: str | None = None, token_dim: int | None = None
                 ) -> tuple[torch.Tensor, dict[str, Any]]:
    """``(tokens (K, D), info)`` of a saved concept, checked against the generator that will use it."""
    path = Path(path)
    sidecar = path.with_name(path.name + ".json")
    remedy = "learn it again (run ID learn_concept)"
    if not path.is_file() or not sidecar.is_file():
        raise BundleInputError(f"Concept '{path}' is missing (it needs {path.name} and "
                               f"{sidecar.name}): {remedy} or pass the right concept_dir.")
    try:
        from safetensors.torch import load_file

        info = json.loads(sidecar.read_text())
        tokens = load_file(str(path))["tokens"].float()
    except Exception as error:  # safetensors and json raise several types for a damaged file
        raise BundleInputError(f"Concept '{path}' cannot be read ({type(error).__name__}: {error}): it is damaged; "
                               f"{remedy}.") from None
    if tokens.ndim != 2 or not torch.isfinite(tokens).all():
        raise BundleInputError(f"Concept '{path}' holds no usable (K, D) finite tokens: {remedy}.")
    if fingerprint is not None and info.get("generator") != fingerprint:
        raise BundleInputError(f"Concept '{path}' was learned for another generator (its autoencoder or diffusion "
                               f"model differs from the one loaded): learn it again with this generator.")
    if token_dim is not None and tokens.shape[1] != token_dim:
        raise BundleInputError(f"Concept '{path}' has {tokens.shape[1]}-wide tokens, but this generator's context "
                               f"is {token_dim} wide: learn it again with this generator.")
    return tokens, info


def list_concepts(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """One row per saved concept in ``folder``: name, tokens, images, steps, final loss, size, generator."""
    rows = []
    for path in sorted(Path(folder).glob(f"*{SUFFIX}")):
        sidecar = path.with_name(path.name + ".json")
        info = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        rows.append({"name": path.name[: -len(SUFFIX)], "num_tokens": info.get("num_tokens"),
                     "token_dim": info.get("token_dim"), "images": info.get("images"), "steps": info.get("steps"),
                     "final_loss": info.get("final_loss"), "bytes": path.stat().st_size,
                     "generator": str(info.get("generator", ""))[:12]})
    return rows


def filter_rows(rows: Sequence[Mapping[str, Any]], column: str | None, value: Any, minimum: int) -> list[dict]:
    """The datalist rows of the concept (those whose ``column`` equals ``value``, when a column is given)."""
    rows = [dict(r) for r in rows]
    if column:
        if rows and column not in rows[0]:
            raise BundleInputError(f"concept_label_column '{column}' is not a column of the concept datalist: it has "
                                   f"{sorted(rows[0])}.")
        rows = [r for r in rows if str(r.get(column)) == str(value)]
    if len(rows) < minimum:
        which = f" with {column} = {value}" if column else ""
        raise BundleInputError(f"The concept has {len(rows)} images{which}, fewer than min_concept_images = {minimum}: "
                               "pass more images of it (about 100 work well).")
    return rows


def epochs_for(steps: int, num_images: int, batch_size: int) -> int:
    """Epochs that give at least ``steps`` optimiser steps over ``num_images`` images."""
    return max(1, math.ceil(steps / max(1, math.ceil(num_images / batch_size))))


def print_concepts(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Print a table of the concepts in ``folder`` (run ID list_concepts)."""
    rows = list_concepts(folder)
    if not rows:
        print(f"No concepts in {folder}: learn one with run ID learn_concept.")
        return rows
    print(f"{'name':24} {'tokens':>6} {'dim':>5} {'images':>6} {'steps':>6} {'loss':>8} {'bytes':>8}  generator")
    for r in rows:
        loss = "-" if r["final_loss"] is None else f"{r['final_loss']:.4f}"
        print(f"{r['name']:24} {r['num_tokens'] or '-':>6} {r['token_dim'] or '-':>5} {r['images'] or '-':>6} "
              f"{r['steps'] or '-':>6} {loss:>8} {r['bytes']:>8}  {r['generator']}")
    return rows


def print_concept(path: str | os.PathLike) -> dict[str, Any]:
    """Print one concept's sidecar and its tokens' norms (run ID inspect_concept)."""
    tokens, info = load_concept(path)
    info = {**info, "token_norms": [round(float(n), 3) for n in tokens.norm(dim=1)]}
    print(json.dumps(info, indent=2))
    return info


@torch.no_grad()
def fixed_draw_loss(unet: nn.Module, scheduler: Any, latents: torch.Tensor, tokens: torch.Tensor, draws: int = 8,
                    seed: int = 0) -> float:
    """The diffusion loss of ``tokens`` as every image's context, on fixed noise and timesteps (``draws`` per image):
    a number that compares two sets of tokens without the noise of training batches."""
    g = torch.Generator().manual_seed(seed)
    x = latents.float().repeat_interleave(draws, 0)
    noise = torch.randn(x.shape, generator=g)
    t = torch.randint(0, scheduler.num_train_timesteps, (len(x),), generator=g)
    noisy = scheduler.add_noise(x, noise, t)
    target = scheduler.get_velocity(x, noise, t) if scheduler.prediction_type == "v_prediction" else noise
    context = tokens.float().expand(len(x), -1, -1) if tokens.ndim == 2 else tokens.float().repeat_interleave(draws, 0)
    losses = [torch.nn.functional.mse_loss(unet(x=noisy[i : i + 64], timesteps=t[i : i + 64], context=context[i : i + 64]),
                                           target[i : i + 64], reduction="sum") for i in range(0, len(x), 64)]
    return float(sum(losses) / target.numel())


COMPOSITIONS = ("mix", "guidance")


class Composition:
    """Several concepts with weights, to be combined by summing guidance directions (composable diffusion):
    ``prediction = null + scale * sum_i w_i (prediction_i - null)``. ``tokens[i]`` is concept i's ``(K_i, D)``."""

    def __init__(self, names: Sequence[str], tokens: Sequence[torch.Tensor], weights: Sequence[float]) -> None:
        self.names, self.tokens, self.weights = tuple(names), tuple(tokens), tuple(float(w) for w in weights)

    def key(self) -> tuple:
        return ("guidance", self.names, self.weights)


def check_weights(weights: Mapping[str, float], composition: str) -> dict[str, float]:
    """Concept weights as floats, refused when empty, non-finite, or not summing to a positive number."""
    if composition not in COMPOSITIONS:
        raise BundleInputError(f"Concept composition '{composition}' is not known: choose 'mix' (weighted mean of the "
                               "tokens) or 'guidance' (weighted sum of guidance directions).")
    if not isinstance(weights, Mapping) or not weights:
        raise BundleInputError("No concepts were named: give them with weights, e.g. {'concepts': {'pneumonia': 1.0}}.")
    try:
        values = {str(k): float(v) for k, v in weights.items()}
    except (TypeError, ValueError):
        raise BundleInputError(f"Concept weights {dict(weights)} must be numbers.") from None
    if not all(math.isfinite(v) for v in values.values()) or sum(values.values()) <= 0:
        raise BundleInputError(f"Concept weights {values} must be finite and sum to more than 0 (e.g. 0.7 and 0.3; a "
                               "negative weight steers away from a concept, but the sum must stay positive).")
    return values


class ConceptBank:
    """The concepts of ``folder``, loaded on first use and checked against the generator of the two model files."""

    def __init__(self, folder: str | os.PathLike, autoencoder_path: str | os.PathLike,
                 diffusion_path: str | os.PathLike, token_dim: int | None = None) -> None:
        self.folder, self.paths, self.token_dim = Path(folder), (autoencoder_path, diffusion_path), token_dim
        self._fingerprint: str | None = None
        self._tokens: dict[str, torch.Tensor] = {}

    def path(self, name: str) -> Path:
        return concept_path(self.folder, name)

    def tokens(self, name: str) -> torch.Tensor:
        if name not in self._tokens:
            if not self.path(name).is_file():
                known = [r["name"] for r in list_concepts(self.folder)] if self.folder.is_dir() else []
                raise BundleInputError(f"Concept '{name}' is not in {self.folder} (it has {known or 'none'}): learn it "
                                       "with run ID learn_concept, or pass --concept_dir.")
            if self._fingerprint is None:
                self._fingerprint = generator_fingerprint(*self.paths)
            self._tokens[name] = load_concept(self.path(name), self._fingerprint, self.token_dim)[0]
        return self._tokens[name]

    def compose(self, weights: Mapping[str, float], composition: str = "mix") -> torch.Tensor | Composition:
        """``mix``: the weights-normalised mean of the concepts' tokens (they must have as many tokens each);
        ``guidance``: a :class:`Composition` for sampling to sum their guidance directions."""
        weights = check_weights(weights, composition)
        tokens = [self.tokens(name) for name in weights]
        if composition == "guidance":
            return Composition(list(weights), tokens, list(weights.values()))
        if len({t.shape for t in tokens}) > 1:
            raise BundleInputError(f"Concepts {list(weights)} have different numbers of tokens "
                                   f"({[t.shape[0] for t in tokens]}): mixing needs equal ones; use composition 'guidance'.")
        total = sum(weights.values())
        return sum(w / total * t for w, t in zip(weights.values(), tokens))
