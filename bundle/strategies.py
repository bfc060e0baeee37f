"""The sampling strategies, one class each: its default parameters, their validation, how it plans a job
from the pool, the embedding that conditions the job, and how a batch of its jobs is sampled.

- ``reconstruction``: the embedding of a real image, from pure noise;
- ``interpolation``: slerp between the embeddings of two pool images of the same label group;
- ``perturbation``: a real embedding with noise of a chosen scale, tokens kept at their length;
- ``manifold``: a new embedding drawn from the anchor's label group (a Gaussian fitted to the group's
  embeddings, or a random convex mix of an image and its nearest neighbours), no seed image needed;
- ``img2img``: a real image's latent noised to ``strength`` and denoised again under its own embedding;
- ``inpainting``: only the inside of a mask regenerated, the rest kept from the real image;
- ``concept``: learned concept tokens (bundle/concepts.py), one or several with weights; img2img and inpainting
  also take ``concepts`` (e.g. a finding added inside a mask of a normal film).

A new strategy is one new :class:`Strategy` subclass decorated with :func:`register`: planning, the
manifest, the configs' ``strategy``/``strategy_params`` and the error messages all read :data:`STRATEGIES`.
"""

from __future__ import annotations

import ast
import copy
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch

from .data import read_mask
from .errors import BundleInputError
from .manifold import combine, gaussian_sample, nearest, perturb, slerp

logger = logging.getLogger(__name__)


@dataclass
class Pool:
    """What planning sees of the pool: its rows, their DINO embeddings and their label groups."""

    rows: Sequence[Mapping[str, Any]]
    embeddings: torch.Tensor
    groups: list[tuple]  # each row's label tuple
    members: dict[tuple, list[int]]  # the rows of each label tuple
    concepts: Any = None  # a bundle.concepts.ConceptBank, for the strategies that take concepts


@dataclass
class Plan:
    """One job as a strategy plans it: the pool rows it uses, its parameters (as the manifest records them)
    and the row whose labels the output carries."""

    sources: list[int]
    params: dict[str, Any]
    labels_from: int
    concept: Any = None  # the job's concept context (tokens, or a guidance Composition) instead of an embedding


# sample(**keywords of bundle.diffusion.sample_latents) -> the batch's decoded images (B, 1, H, W) on the CPU
Sample = Callable[..., torch.Tensor]


class Strategy:
    """A strategy that conditions on the anchor's own embedding and samples from pure noise; subclasses
    override what differs."""

    name: ClassVar[str]
    defaults: ClassVar[Mapping[str, Any]] = {}

    def check(self, params: Mapping[str, Any]) -> None:
        """Refuse parameter values this strategy cannot use, before any job is planned."""

    def plan(self, anchor: int, params: Mapping[str, Any], pool: Pool, rng: np.random.Generator) -> Plan:
        """The job anchored on pool row ``anchor``; random choices come from the job's own ``rng``."""
        return Plan([anchor], dict(params), anchor)

    def after_plan(self, jobs: Sequence[Mapping[str, Any]], pool: Pool) -> None:
        """Anything to say about the whole plan once every job is planned."""

    def context(self, job: Mapping[str, Any], embeddings: torch.Tensor) -> Any:
        """The conditioning embedding ``(tokens, dim)`` of one job (its concept's, when it has one)."""
        if job.get("concept") is not None:
            return job["concept"]
        return embeddings[job["sources"][0]].clone()

    def batch_key(self, job: Mapping[str, Any]) -> tuple:
        """Jobs with equal keys are sampled in one batch by the :meth:`render` of the batch's first job, so
        strategies that share a key must share :meth:`render`."""
        return ("noise", *concept_key(job))

    def render(self, jobs: Sequence[Mapping[str, Any]], sample: Sample, latents: torch.Tensor,
               images: torch.Tensor) -> torch.Tensor:
        """Decoded images of a batch of jobs, given the pool's cached ``latents`` and preprocessed ``images``."""
        return sample()


def concept_key(job: Mapping[str, Any]) -> tuple:
    """What jobs must share to be batched together: the same concepts, weights and composition."""
    p = job["params"]
    return (json.dumps(p["concepts"], sort_keys=True), p["composition"]) if p.get("concepts") else ()


def with_concepts(plan: Plan, params: Mapping[str, Any], pool: Pool, required: bool = False) -> Plan:
    """Give ``plan`` the concepts of ``params`` (names -> weights, composition), recorded with their files."""
    from .concepts import check_weights

    if not params.get("concepts"):
        if required:
            raise BundleInputError("The concept strategy needs concepts: e.g. --strategy_params "
                                   "\"{'concept': {'concepts': {'pneumonia': 1.0}}}\" (learn them with configs/concept.json).")
        return plan
    if pool.concepts is None:
        raise BundleInputError("Concepts were asked for, but no concept folder is set: pass --concept_dir.")
    weights = check_weights(params["concepts"], params.get("composition", "mix"))
    plan.concept = pool.concepts.compose(weights, params.get("composition", "mix"))
    plan.params.update({"concepts": weights, "composition": params.get("composition", "mix"),
                        "concept_files": {n: str(pool.concepts.path(n)) for n in weights}})
    return plan


STRATEGIES: dict[str, Strategy] = {}
STRATEGY_PARAMS: dict[str, dict[str, Any]] = {}  # every strategy's defaults, the base of the configs' strategy_params


def register(cls: type[Strategy]) -> type[Strategy]:
    """Make ``cls`` a strategy the configs can name, with its defaults in :data:`STRATEGY_PARAMS`."""
    STRATEGIES[cls.name] = cls()
    STRATEGY_PARAMS[cls.name] = copy.deepcopy(dict(cls.defaults))
    return cls


def strategy_params(overrides: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """The default parameters of every strategy, updated with ``overrides`` (unknown names are refused; a command
    line's text that is not such a dict is refused in one sentence)."""
    params = copy.deepcopy(STRATEGY_PARAMS)
    if isinstance(overrides, str):  # the command line passes what Python cannot read as a literal through as text
        try:
            overrides = ast.literal_eval(overrides)
        except (ValueError, SyntaxError):
            pass
    if overrides is not None and not (isinstance(overrides, Mapping) and all(isinstance(v, Mapping)
                                                                             for v in overrides.values())):
        raise BundleInputError(f"strategy_params {overrides!r} is not a dict of {{strategy: {{setting: value}}}}: write "
                               "it as \"{'img2img': {'strength': 0.4}}\" (quoted for the shell).")
    for name, values in (overrides or {}).items():
        if name not in STRATEGIES:
            raise BundleInputError(f"strategy_params names '{name}', which is not a strategy: use {list(STRATEGIES)}.")
        unknown = set(values) - set(params[name])
        if unknown:
            raise BundleInputError(f"strategy_params for '{name}' has unknown keys {sorted(unknown)}: it takes "
                                   f"{sorted(params[name])}.")
        params[name].update(values)
    return params


def _stream(seed: int, purpose: int) -> torch.Generator:
    """A torch generator for one job and one purpose, independent of the latent noise drawn from ``seed``."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, purpose]).generate_state(1)[0]))


def _of_anchors(pool_tensor: torch.Tensor, jobs: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    return torch.stack([pool_tensor[job["anchor"]] for job in jobs]).float()


@register
class Reconstruction(Strategy):
    name = "reconstruction"


@register
class Concept(Strategy):
    """Samples of learned concepts (bundle/concepts.py), alone or several with weights: ``mix`` averages their
    tokens, ``guidance`` sums their guidance directions. Weights (a, 1 - a) interpolate between two concepts.
    The pool image only lends its labels and a seed."""

    name = "concept"
    defaults = {"concepts": {}, "composition": "mix"}

    def plan(self, anchor, params, pool, rng):
        return with_concepts(Plan([anchor], {}, anchor), params, pool, required=True)


@register
class Interpolation(Strategy):
    name = "interpolation"
    defaults = {"t_min": 0.25, "t_max": 0.75, "across_labels": False}

    def plan(self, anchor, params, pool, rng):
        candidates = range(len(pool.rows)) if params["across_labels"] else pool.members[pool.groups[anchor]]
        partners = [i for i in candidates if i != anchor]
        partner = int(rng.choice(partners)) if partners else anchor
        t = float(rng.uniform(params["t_min"], params["t_max"]))
        return Plan([anchor, partner], {"t": round(t, 6), "across_labels": params["across_labels"]},
                    anchor if t <= 0.5 else partner)  # the labels of the nearer end

    def after_plan(self, jobs, pool):
        lonely = {pool.groups[j["anchor"]] for j in jobs if j["strategy"] == self.name and len(set(j["sources"])) == 1}
        if lonely:
            logger.warning("Label group(s) %s have a single image: their interpolations are reconstructions.",
                           sorted(lonely))

    def context(self, job, embeddings):
        a, b = job["sources"]
        return slerp(embeddings[a], embeddings[b], float(job["params"]["t"]))


@register
class Perturbation(Strategy):
    name = "perturbation"
    defaults = {"scale": 0.3}

    def context(self, job, embeddings):
        return perturb(embeddings[job["sources"][0]], float(job["params"]["scale"]), _stream(job["seed"], 1))


@register
class Manifold(Strategy):
    name = "manifold"
    defaults = {"model": "gaussian", "temperature": 1.0, "neighbours": 5, "concentration": 1.0}

    def check(self, params):
        if params["model"] not in ("gaussian", "neighbours"):
            raise BundleInputError(f"Manifold model '{params['model']}' is not known: use 'gaussian' or 'neighbours'.")

    def plan(self, anchor, params, pool, rng):
        group = pool.members[pool.groups[anchor]]
        if params["model"] == "gaussian":
            if len(group) < 2:
                raise BundleInputError(f"Manifold sampling fits a Gaussian per label group, but group {pool.groups[anchor]}"
                                       " has one image: add images, drop --label_columns or use model 'neighbours'.")
            return Plan(list(group), {"model": "gaussian", "temperature": params["temperature"]}, anchor)
        local = nearest(pool.embeddings[group], group.index(anchor), int(params["neighbours"]))
        sources = [anchor] + [group[i] for i in local]
        weights = rng.dirichlet(np.full(len(sources), float(params["concentration"])))
        return Plan(sources, {"model": "neighbours", "weights": [round(float(w), 6) for w in weights]}, anchor)

    def context(self, job, embeddings):
        p, sources = job["params"], job["sources"]
        if p["model"] == "gaussian":
            return gaussian_sample(embeddings[sources], _stream(job["seed"], 1), float(p["temperature"]))
        return combine(embeddings[sources], torch.tensor(p["weights"]))


@register
class Img2Img(Strategy):
    name = "img2img"
    defaults = {"strength": 0.6, "concepts": {}, "composition": "mix"}

    def plan(self, anchor, params, pool, rng):
        return with_concepts(Plan([anchor], {"strength": params["strength"]}, anchor), params, pool)

    def batch_key(self, job):
        return ("img2img", float(job["params"]["strength"]), *concept_key(job))

    def render(self, jobs, sample, latents, images):
        return sample(init=_of_anchors(latents, jobs), strength=float(jobs[0]["params"]["strength"]))


def _check_box(box: Sequence[float]) -> None:
    if len(box) != 4 or not all(0 <= v <= 1 for v in box) or box[0] >= box[2] or box[1] >= box[3]:
        raise BundleInputError(f"Inpainting box {list(box)} is not [x0, y0, x1, y1] with 0 <= x0 < x1 <= 1 and "
                               "0 <= y0 < y1 <= 1 (fractions of the image's width and height).")


def box_mask(box: Sequence[float], size: Sequence[int]) -> torch.Tensor:
    """``(1, X, Y)`` mask, 1 inside ``box`` = [x0, y0, x1, y1] as fractions of width (x, right) and height (y, down)."""
    _check_box(box)
    mask = torch.zeros(1, *size)
    x0, x1 = int(round(box[0] * size[0])), max(int(round(box[2] * size[0])), int(round(box[0] * size[0])) + 1)
    y0, y1 = int(round(box[1] * size[1])), max(int(round(box[3] * size[1])), int(round(box[1] * size[1])) + 1)
    mask[:, x0:x1, y0:y1] = 1
    return mask


def latent_mask(mask: torch.Tensor, latent_size: Sequence[int]) -> torch.Tensor:
    """A pixel mask brought to the latent grid: a latent cell is regenerated if any pixel it covers is."""
    return (torch.nn.functional.adaptive_max_pool2d(mask[None].float(), tuple(latent_size))[0] > 0).float()


@register
class Inpainting(Strategy):
    name = "inpainting"
    defaults = {"mask_column": "mask", "box": [0.55, 0.2, 0.9, 0.75], "paste": True, "concepts": {}, "composition": "mix"}

    def check(self, params):
        _check_box(params["box"])

    def plan(self, anchor, params, pool, rng):
        mask = str(pool.rows[anchor].get(params["mask_column"]) or "")
        p = {"mask": mask} if mask else {"box": list(params["box"])}
        p["paste"] = bool(params["paste"])
        return with_concepts(Plan([anchor], p, anchor), params, pool)

    def batch_key(self, job):
        return ("inpainting", *concept_key(job))

    @staticmethod
    def pixel_mask(job: Mapping[str, Any], size: Sequence[int]) -> torch.Tensor:
        """The job's ``(1, X, Y)`` mask at image ``size``: its mask file, else its box."""
        p = job["params"]
        return read_mask(p["mask"], size) if "mask" in p else box_mask(p["box"], size)

    def render(self, jobs, sample, latents, images):
        pixels = torch.stack([self.pixel_mask(job, tuple(images.shape[-2:])) for job in jobs])
        init = _of_anchors(latents, jobs)
        out = sample(init=init, mask=torch.stack([latent_mask(m, init.shape[-2:]) for m in pixels]))
        paste = torch.tensor([bool(job["params"]["paste"]) for job in jobs]).view(-1, 1, 1, 1)
        return torch.where(paste & (pixels == 0), _of_anchors(images, jobs), out)
