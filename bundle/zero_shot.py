"""Zero-shot segmentation from a diffusion UNet's self-attention (after DiffSeg, Tian et al., CVPR 2024).

No labels are used: the image (noised to one timestep) goes through the trained UNet once, every
self-attention layer's map is recorded, the maps are brought to one resolution and averaged, and the
attention of a grid of anchor pixels is merged by symmetric KL distance into a few proposals. Each pixel
takes the proposal that attends to it most, which gives a label map of clusters.

Which clusters are lungs is decided by a fixed rule on the image itself (:func:`lung_clusters`), never by
a mask; :func:`oracle_clusters` uses the true mask and only gives an upper bound for the clustering.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import compute_dice
from monai.networks.blocks import SABlock
from monai.networks.schedulers import DDPMScheduler
from monai.transforms import FillHoles, KeepLargestConnectedComponent
from torch import nn

from .constants import LUNG_MASK_COLUMNS
from .data import modality_preprocessing, output_stems, preprocessed_stack
from .errors import BundleInputError
from .heads.frame import image_frame
from .heads.networks import load_denoiser
from .heads.segmentation import mask_suffix, read_masks, write_masks
from .io import atomic_write_json
from .models import build_network, load_generator, model_path, read_record, recorded_value


class SelfAttentionRecorder:
    """Within ``with``, every MONAI ``SABlock`` of ``network`` keeps its attention matrix; the head-averaged
    ``(B, N, N)`` maps of each call are appended to :attr:`maps` in call order."""

    def __init__(self, network: nn.Module) -> None:
        self.blocks = [m for m in network.modules() if isinstance(m, SABlock)]
        if not self.blocks:
            raise BundleInputError("This network has no self-attention layer: train the UNet with attention_levels "
                                   "that include at least one true level.")
        self.maps: list[torch.Tensor] = []
        self._saved: list[tuple[bool, bool]] = []
        self._hooks: list = []

    def __enter__(self) -> SelfAttentionRecorder:
        for block in self.blocks:
            self._saved.append((block.save_attn, block.use_flash_attention))
            block.save_attn, block.use_flash_attention = True, False
            self._hooks.append(block.register_forward_hook(lambda m, i, o: self.maps.append(m.att_mat.float().mean(1))))
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        for block, (save, flash) in zip(self.blocks, self._saved):
            block.save_attn, block.use_flash_attention = save, flash
            block.att_mat = torch.Tensor()


def _noised(inputs: torch.Tensor, timestep: int, scheduler=None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``inputs`` noised to ``timestep`` with one seeded noise draw (the clean inputs at 0), and the timesteps."""
    t = torch.full((inputs.shape[0],), int(timestep), dtype=torch.long, device=inputs.device)
    if timestep > 0:
        if scheduler is None:
            raise BundleInputError("A timestep above 0 needs the training noise scheduler to noise the inputs.")
        # the same seeded noise for every image, so an image's result does not depend on its batch
        noise = torch.randn(inputs.shape[1:], generator=torch.Generator().manual_seed(seed)).expand_as(inputs)
        noise = noise.to(inputs.device)
        inputs = scheduler.add_noise(original_samples=inputs, noise=noise, timesteps=t)
    return inputs, t


@torch.no_grad()
def unet_internals(unet: nn.Module, inputs: torch.Tensor, timestep: int, scheduler=None, context=None, seed: int = 0,
                   attention: bool = True, features: bool = True, feature_block: int = -1
                   ) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
    """One UNet call on ``inputs`` noised to ``timestep`` (one seeded noise draw; ``timestep`` 0 uses the clean
    inputs), and what it shows: the head-averaged self-attention maps ``(B, N, N)`` of every layer in call order, and
    the output ``(B, C, X, Y)`` of the MONAI ``DiffusionModelUNet``'s up block ``feature_block`` (-1: the last, the
    finest decoder level just before the output convolution, which mostly carries the predicted noise; -2: the
    block before it, whose output is already upsampled to the same grid, with more channels); either is ``None`` when
    not asked for."""
    blocks = getattr(unet, "up_blocks", None)
    if features and not blocks:
        raise BundleInputError("This network has no decoder blocks (up_blocks): feature clustering needs a MONAI "
                               "DiffusionModelUNet.")
    if features and not -len(blocks) <= int(feature_block) < len(blocks):
        raise BundleInputError(f"feature_block {feature_block} is not a decoder block of this UNet: it has "
                               f"{len(blocks)}, so use -{len(blocks)} to {len(blocks) - 1} (-1 the finest).")
    inputs, t = _noised(inputs, timestep, scheduler, seed)
    kept: list[torch.Tensor] = []
    hook = blocks[int(feature_block)].register_forward_hook(lambda m, i, o: kept.append(o.float())) if features else None
    try:
        with SelfAttentionRecorder(unet) if attention else contextlib.nullcontext() as recorder:
            unet(inputs, t, context=context) if context is not None else unet(inputs, t)
    finally:
        if hook is not None:
            hook.remove()
    return (recorder.maps if attention else None), (kept[-1] if features else None)


def self_attention(unet: nn.Module, inputs: torch.Tensor, timestep: int, scheduler=None, context=None,
                   seed: int = 0) -> list[torch.Tensor]:
    """The self-attention maps of :func:`unet_internals`."""
    return unet_internals(unet, inputs, timestep, scheduler, context, seed, features=False)[0]


def decoder_features(unet: nn.Module, inputs: torch.Tensor, timestep: int, scheduler=None, context=None,
                     seed: int = 0, feature_block: int = -1) -> torch.Tensor:
    """The decoder features of :func:`unet_internals`."""
    return unet_internals(unet, inputs, timestep, scheduler, context, seed, attention=False,
                          feature_block=feature_block)[1]


@dataclasses.dataclass
class ZeroShotUNet:
    """A trained UNet whose internals zero-shot segmentation reads, and how an image batch reaches it.

    ``encode`` takes preprocessed images in [0, 1] to the UNet's inputs; ``context`` is the cross-attention
    condition (the generator's null condition, as DiffSeg runs Stable Diffusion without a prompt; ``None`` for an
    unconditioned UNet). Made by :func:`load_zero_shot_unet`.
    """

    model: str
    path: str
    unet: nn.Module
    scheduler: Any
    preprocessing: Any
    image_size: int
    encode: Callable[[torch.Tensor], torch.Tensor]
    context: torch.Tensor | None = None

    def internals(self, images: torch.Tensor, timestep: int, seed: int = 0, attention: bool = True,
                  features: bool = True, feature_block: int = -1):
        """:func:`unet_internals` of a batch of preprocessed images."""
        inputs = self.encode(images)
        context = None if self.context is None else self.context.to(inputs).expand(len(inputs), -1, -1)
        return unet_internals(self.unet, inputs, timestep, self.scheduler, context, seed, attention, features,
                              feature_block)


ZERO_SHOT_MODELS = ("denoiser", "generator")


def load_zero_shot_unet(model: str, work_dir: str | os.PathLike, bundle_root: str | os.PathLike = ".",
                        device: torch.device | str = "cpu", sdpa_attention: bool = True,
                        image_size: int | None = None, modality: str | None = None,
                        path: str | os.PathLike | None = None) -> ZeroShotUNet:
    """The UNet of ``work_dir`` that zero-shot segmentation reads: ``denoiser``, the label-free image-space
    denoiser (configs/heads/pretrain.json; inputs scaled to [-1, 1]), or ``generator``, the latent UNet of the
    trained generator (configs/train.json; inputs encoded by its autoencoder in ``work_dir``, null condition).
    ``path``: the UNet's file (e.g. a snapshot); ``None`` takes the model's file in ``work_dir``. ``image_size`` and
    ``modality``: ``None`` takes the model's; another value must match it."""
    if model not in ZERO_SHOT_MODELS:
        raise BundleInputError(f"zero_shot_model '{model}' is not known: use one of {ZERO_SHOT_MODELS}.")
    if model == "generator":
        path = str(path or model_path(work_dir, "diffusion"))
        generator = load_generator(model_path(work_dir, "autoencoder"), path,
                                   requested={"image_size": image_size, "modality": modality},
                                   bundle_root=bundle_root, device=device)
        null = torch.zeros(1, generator.dino.num_tokens, generator.dino.embed_dim, device=device)
        return ZeroShotUNet(model, path, generator.unet.eval(), generator.sampler("ddpm"), generator.preprocessing,
                            generator.image_size, lambda images: generator.codec.encode(images.to(device)), null)
    path = str(path or model_path(work_dir, "denoiser"))
    record = read_record(path, "denoiser", "pre-train it first: run training with configs/heads/pretrain.json")["record"]
    size = recorded_value(record, "image_size", image_size, path, "denoiser")
    modality = recorded_value(record, "modality", modality, path, "denoiser")
    unet = load_denoiser(build_network(record["network"], use_flash_attention=sdpa_attention), path).to(device)
    preprocessing = modality_preprocessing(str(Path(bundle_root) / "configs" / "modality" / f"{modality}.json"),
                                           image_size=size)
    return ZeroShotUNet(model, path, unet, DDPMScheduler(**record["noise_schedule"]), preprocessing, int(size),
                        lambda images: images.to(device) * 2 - 1)


def kmeans_labels(features: torch.Tensor, clusters: int = 6, iterations: int = 30, seed: int = 0,
                  restarts: int = 4) -> torch.Tensor:
    """One image's feature map ``(C, X, Y)`` -> ``(X, Y)`` cluster labels by k-means on the per-pixel feature vectors
    as the UNet gives them (no per-channel rescaling, which would raise near-constant channels to the level of the
    informative ones): ``restarts`` seeded k-means++ starts, the one with the lowest within-cluster sum of squares."""
    c, x, y = features.shape
    points = features.reshape(c, -1).T.double()
    generator = torch.Generator().manual_seed(int(seed))
    best, best_cost = None, float("inf")
    for _ in range(max(1, int(restarts))):
        centres = points[torch.randint(len(points), (1,), generator=generator)]
        for _ in range(1, min(int(clusters), len(points))):
            nearest = torch.cdist(points, centres).amin(1) ** 2
            if float(nearest.sum()) == 0:  # fewer distinct points than clusters
                break
            centres = torch.cat([centres, points[torch.multinomial(nearest / nearest.sum(), 1, generator=generator)]])
        for _ in range(int(iterations)):
            labels = torch.cdist(points, centres).argmin(1)
            moved = torch.stack([points[labels == k].mean(0) if (labels == k).any() else centres[k]
                                 for k in range(len(centres))])
            if torch.allclose(moved, centres):
                break
            centres = moved
        distances = torch.cdist(points, centres)
        labels, cost = distances.argmin(1), float((distances.amin(1) ** 2).sum())
        if cost < best_cost:
            best, best_cost = labels, cost
    return best.reshape(x, y)


def feature_segment(features: torch.Tensor, images: torch.Tensor, clusters: int = 6, seed: int = 0,
                    rule: Mapping[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder features ``(B, C, x, y)`` and the ``(B, 1, X, Y)`` images -> (k-means cluster labels ``(B, X, Y)``,
    lung masks by :func:`lung_clusters` with the keywords of ``rule``): the label-free alternative to attention
    clustering."""
    size = images.shape[-2:]
    labels = []
    for f in features.cpu():
        label = kmeans_labels(f, clusters, seed=seed)
        if tuple(label.shape) != tuple(size):
            label = F.interpolate(label[None, None].float(), size=tuple(size), mode="nearest")[0, 0].long()
        labels.append(label)
    labels = torch.stack(labels)
    return labels, lung_masks(labels, images, rule)


def pixel_labels(images: torch.Tensor) -> torch.Tensor:
    """``(B, 1, X, Y)`` images -> ``(B, X, Y)`` labels with every pixel its own cluster: the ``intensity`` method,
    :func:`lung_clusters` on single pixels with no network."""
    b, _, x, y = images.shape
    return torch.arange(x * y).reshape(1, x, y).expand(b, -1, -1)


def aggregate_attention(maps: Sequence[torch.Tensor], grids: Sequence[int] | None = None) -> torch.Tensor:
    """Maps of square token grids (``(B, r*r, r*r)``, any r) -> ``(B, R*R, R, R)`` at the largest r = R.

    Each query's key map is upsampled bilinearly and renormalised; queries are repeated (nearest) to the
    R x R grid; maps are averaged with weights proportional to r, as in DiffSeg. ``grids``: only the layers whose
    grid side is listed (e.g. ``[32]``, the finest); ``None`` takes every layer.
    """
    sides = []
    for m in maps:
        side = math.isqrt(m.shape[-1])
        if side * side != m.shape[-1]:
            raise BundleInputError(f"A self-attention map over {m.shape[-1]} tokens is not a square grid: "
                                   "zero-shot segmentation needs square images.")
        sides.append(side)
    if grids:
        chosen = [(m, side) for m, side in zip(maps, sides) if side in {int(g) for g in grids}]
        if not chosen:
            raise BundleInputError(f"attention_grids {list(grids)} match no self-attention layer of this UNet (its "
                                   f"grids: {sorted(set(sides))}): choose among those, or null for every layer.")
        maps, sides = [m for m, _ in chosen], [side for _, side in chosen]
    big = max(sides)
    total = torch.zeros(maps[0].shape[0], big * big, big, big)
    for m, side in zip(maps, sides):
        b = m.shape[0]
        keys = m.reshape(b * side * side, 1, side, side).cpu()
        keys = F.interpolate(keys, size=(big, big), mode="bilinear", align_corners=False) if side != big else keys
        keys = keys / keys.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
        keys = keys.reshape(b, side, side, big * big).permute(0, 3, 1, 2)  # queries as channels
        keys = F.interpolate(keys, size=(big, big), mode="nearest") if side != big else keys
        total += side * keys.permute(0, 2, 3, 1).reshape(b, big * big, big, big)
    return total / sum(sides)


def symmetric_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Pairwise ``(KL(p||q) + KL(q||p)) / 2`` between the rows of ``p (K, D)`` and ``q (M, D)`` (distributions)."""
    log_p, log_q = p.clamp_min(1e-12).log(), q.clamp_min(1e-12).log()
    p_ent, q_ent = (p * log_p).sum(-1), (q * log_q).sum(-1)
    return (p_ent[:, None] - p @ log_q.T + q_ent[None, :] - log_p @ q.T) / 2


def merge_attention(attention: torch.Tensor, grid: int = 16, threshold: float = 0.2, iterations: int = 3) -> torch.Tensor:
    """One image's aggregated attention ``(R*R, R, R)`` -> proposals ``(K, R, R)``.

    Anchors are the queries on a ``grid`` x ``grid`` lattice. In each iteration every proposal not yet taken
    absorbs all untaken proposals within the merge distance of it (in order), and the group is averaged: a
    greedy, non-overlapping form of DiffSeg's iterative merging. The merge distance is ``threshold`` times
    the median symmetric KL between this image's anchors: the attention of a small UNet is close to uniform
    (entropy within 1% of log N on JSRT), so DiffSeg's absolute KL thresholds do not carry over.
    """
    side = attention.shape[-1]
    steps = torch.linspace(0, side - 1, min(grid, side)).round().long()
    anchors = (steps[:, None] * side + steps[None, :]).flatten()
    proposals = attention.reshape(side * side, side * side)[anchors]
    threshold = threshold * float(symmetric_kl(proposals, proposals).median())
    for _ in range(iterations):
        distance = symmetric_kl(proposals, proposals)
        taken = torch.zeros(len(proposals), dtype=torch.bool)
        merged = []
        for i in range(len(proposals)):
            if taken[i]:
                continue
            group = (distance[i] < threshold) & ~taken
            group[i] = True
            merged.append(proposals[group].mean(0))
            taken |= group
        if len(merged) == len(proposals):
            break
        proposals = torch.stack(merged)
    return proposals.reshape(-1, side, side)


def merge_attention_diffseg(attention: torch.Tensor, grid: int = 16, thresholds: Sequence[float] = (1.1, 1.1, 1.1)
                            ) -> torch.Tensor:
    """One image's aggregated attention ``(R*R, R, R)`` -> proposals ``(K, R, R)``, merged as DiffSeg publishes it.

    Absolute symmetric-KL thresholds, one per iteration (DiffSeg's default: 1.1 three times). First iteration:
    each anchor of the ``grid`` x ``grid`` lattice becomes the mean attention of every query pixel within the
    threshold of it (proposals may overlap). Later iterations: each proposal becomes the mean of the proposals
    within the threshold of it, and identical groups are kept once. Pixels then take the proposal attending to
    them most (:func:`cluster_labels`). :func:`merge_attention` is this bundle's earlier variant (a threshold
    relative to each image's median KL, greedy non-overlapping groups among anchors only).
    """
    side = attention.shape[-1]
    rows = attention.reshape(side * side, side * side)
    steps = torch.linspace(0, side - 1, min(grid, side)).round().long()
    anchors = (steps[:, None] * side + steps[None, :]).flatten()
    near = symmetric_kl(rows[anchors], rows) < float(thresholds[0])  # (K, N)
    near[torch.arange(len(anchors)), anchors] = True
    proposals = (near.float() @ rows) / near.sum(1, keepdim=True)
    for threshold in thresholds[1:]:
        groups = symmetric_kl(proposals, proposals) < float(threshold)
        groups = torch.unique(groups, dim=0)  # proposals that gather the same group are one
        proposals = (groups.float() @ proposals) / groups.sum(1, keepdim=True)
    return proposals.reshape(-1, side, side)


def cluster_labels(proposals: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(K, R, R)`` proposals -> ``(X, Y)`` label map: each pixel takes the proposal attending to it most."""
    maps = F.interpolate(proposals[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    return maps.argmax(0)


LUNG_THRESHOLDS = ("mean", "otsu")


def lung_rule(threshold: str, scale: Any) -> dict[str, Any]:
    """The lung rule's settings, checked: ``{"threshold": one of LUNG_THRESHOLDS, "scale": a positive float}``."""
    if threshold not in LUNG_THRESHOLDS:
        raise BundleInputError(f"lung_threshold '{threshold}' is not known: use one of {LUNG_THRESHOLDS}.")
    try:
        value = float(scale)
    except (TypeError, ValueError):
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise BundleInputError(f"lung_scale {scale!r} is not a positive number: give a factor on the threshold such "
                               "as 1.05.")
    return {"threshold": threshold, "scale": value}


def lung_threshold(image: torch.Tensor, edge: torch.Tensor, threshold: str = "mean", scale: float = 1.0) -> float:
    """The intensity below which a cluster counts as dark: ``scale`` times the image's mean (``mean``) or times
    Otsu's threshold of the pixels inside the outer band (``otsu``, scikit-image's ``threshold_otsu``; the band
    is mostly collimation and air, which would pull the split away from lung against soft tissue)."""
    threshold, scale = lung_rule(threshold, scale).values()
    if threshold == "mean":
        return scale * float(image.double().mean())
    from skimage.filters import threshold_otsu

    inner = image[~edge].double().numpy()
    return scale * float(threshold_otsu(inner) if inner.min() < inner.max() else inner.mean())


def lung_clusters(labels: torch.Tensor, image: torch.Tensor, border: float = 0.2, components: int | None = 2,
                  threshold: str = "mean", scale: float = 1.0) -> torch.Tensor:
    """The label-free lung choice: dark clusters that lie mostly inside.

    A cluster is taken when its mean intensity is below :func:`lung_threshold` (``threshold``: the image's mean
    or Otsu's threshold inside the outer band, times ``scale``; air-filled lung is radiolucent, so dark in a
    radiograph with MONOCHROME2 display) and no more than ``border`` of its pixels lie in the outer eighth of
    the image on any side (dark air outside the body reaches the border; the lungs do not). Then the
    ``components`` largest connected regions are kept (two lungs; ``None`` keeps every region) and their holes
    filled (MONAI's ``KeepLargestConnectedComponent`` and ``FillHoles``). Every cluster being one pixel
    (:func:`pixel_labels`) makes it a plain intensity rule. Returns a boolean ``(X, Y)`` mask.
    """
    image = image.reshape(labels.shape).float()
    x, y = labels.shape
    edge = torch.zeros_like(labels, dtype=torch.bool)
    ex, ey = max(1, x // 8), max(1, y // 8)
    edge[:ex], edge[-ex:], edge[:, :ey], edge[:, -ey:] = True, True, True, True
    _, index = labels.flatten().unique(return_inverse=True)
    count = torch.bincount(index).double()
    darkness = torch.bincount(index, weights=image.flatten().double()) / count
    outer = torch.bincount(index, weights=edge.flatten().double()) / count
    mask = ((darkness < lung_threshold(image, edge, threshold, scale)) & (outer <= border))[index].reshape(labels.shape)
    if components and mask.any():
        mask = KeepLargestConnectedComponent(num_components=int(components), connectivity=1)(mask[None])[0]
        mask = FillHoles()(mask[None])[0]
    return torch.as_tensor(mask).bool()


def lung_masks(labels: torch.Tensor, images: torch.Tensor, rule: Mapping[str, Any] | None = None) -> torch.Tensor:
    """``(B, X, Y)`` cluster labels and their ``(B, 1, X, Y)`` images -> ``(B, X, Y)`` lung masks by
    :func:`lung_clusters` with the keywords of ``rule`` (``threshold``, ``scale``)."""
    return torch.stack([lung_clusters(l, im.cpu(), **(rule or {})) for l, im in zip(labels, images)])


def oracle_clusters(labels: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Upper bound that uses the true mask: the clusters with more than half of their pixels inside it."""
    truth = truth.reshape(labels.shape).bool()
    _, index = labels.flatten().unique(return_inverse=True)
    inside = torch.bincount(index, weights=truth.flatten().double()) / torch.bincount(index).double()
    return (inside > 0.5)[index].reshape(labels.shape)


MERGES = ("relative", "diffseg")
METHODS = ("attention", "features", "intensity")


def segment(maps: Sequence[torch.Tensor], images: torch.Tensor, grid: int = 16, threshold: float = 0.2,
            iterations: int = 3, merge: str = "relative", grids: Sequence[int] | None = None,
            rule: Mapping[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention maps of a batch and its ``(B, 1, X, Y)`` images -> (cluster labels ``(B, X, Y)``,
    lung masks ``(B, X, Y)`` by :func:`lung_clusters`). ``merge``: ``relative`` (:func:`merge_attention`,
    ``threshold`` a fraction of the median KL) or ``diffseg`` (:func:`merge_attention_diffseg`, ``threshold`` in
    nats, the same at each of the ``iterations``); ``grids``: the attention layers used (:func:`aggregate_attention`);
    ``rule``: keywords of :func:`lung_clusters`."""
    if merge not in MERGES:
        raise BundleInputError(f"merge '{merge}' is not known: use one of {MERGES}.")
    attention = aggregate_attention(maps, grids)
    size = images.shape[-2:]

    def proposals(a: torch.Tensor) -> torch.Tensor:
        if merge == "diffseg":
            return merge_attention_diffseg(a, grid, [threshold] * iterations)
        return merge_attention(a, grid, threshold, iterations)

    labels = torch.stack([cluster_labels(proposals(a), size) for a in attention])
    return labels, lung_masks(labels, images, rule)


def dice(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    """Dice of two binary masks of one image (MONAI's ``compute_dice``; 1 when both are empty)."""
    predicted = predicted.float().reshape(1, 1, *predicted.shape[-2:])
    return float(compute_dice(predicted, truth.float().reshape(predicted.shape), ignore_empty=False))


@torch.no_grad()
def segment_folder(model: ZeroShotUNet, rows: Sequence[dict], output_dir, timestep: int = 100,
                   threshold: float = 0.1, grid: int = 16, mask_format: str = "png",
                   truth_columns: Sequence[str] = LUNG_MASK_COLUMNS, batch_size: int = 8, seed: int = 0,
                   merge: str = "relative", method: str = "attention", clusters: int = 6,
                   grids: Sequence[int] | None = None, feature_block: int = -1, lung_threshold: str = "mean",
                   lung_scale: float = 1.0) -> dict:
    """Zero-shot lung masks for every row from the internals of ``model`` (:func:`load_zero_shot_unet`).

    ``method``: ``attention`` (self-attention merged into clusters, :func:`segment`; ``grids`` picks its layers),
    ``features`` (k-means with ``clusters`` centres on the decoder features of up block ``feature_block``,
    :func:`feature_segment`) or ``intensity`` (every pixel its own cluster, no UNet call: the rule alone, at the
    model's image size and preprocessing); either way the lungs are chosen by :func:`lung_clusters` with
    ``lung_threshold`` and ``lung_scale``.

    Writes ``<output_dir>/lungs/<stem>.png`` (0/255) or ``.nii.gz`` in each image's original frame. Rows that
    carry all ``truth_columns`` are scored at the model's image size: Dice of the label-free choice and, as an
    upper bound that looks at the truth, of :func:`oracle_clusters`; scores go to ``<output_dir>/metrics.json``
    with the settings used.
    """
    mask_suffix(mask_format)
    if method not in METHODS:
        raise BundleInputError(f"zero_shot_method '{method}' is not known: use one of {METHODS}.")
    if not rows:
        raise BundleInputError("No images to segment: check input_dir.")
    rule = lung_rule(lung_threshold, lung_scale)
    out, stems, scores = Path(output_dir), output_stems(rows), []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        images = preprocessed_stack(chunk, model.preprocessing, desc="zero-shot")
        if method == "features":
            features = model.internals(images, timestep, seed, attention=False, feature_block=feature_block)[1]
            labels, lungs = feature_segment(features, images, clusters, seed=seed, rule=rule)
        elif method == "intensity":
            labels = pixel_labels(images)
            lungs = lung_masks(labels, images, rule)
        else:
            maps = model.internals(images, timestep, seed, features=False)[0]
            labels, lungs = segment(maps, images, grid, threshold, merge=merge, grids=grids, rule=rule)
        size = images.shape[-1]
        for row, stem, label, lung in zip(chunk, stems[start : start + batch_size], labels, lungs):
            write_masks(lung[None].float(), image_frame(row, size), ["lungs"], stem, out, mask_format)
            if truth_columns and all(row.get(c) for c in truth_columns):
                truth = read_masks(row, truth_columns, (size, size)).amax(0).bool()
                scores.append({"image": str(row["image"]), "clusters": int(label.unique().numel()),
                               "dice": dice(lung, truth), "oracle_dice": dice(oracle_clusters(label, truth), truth)})
    by_method = {"features": {"timestep": int(timestep), "clusters": int(clusters), "feature_block": int(feature_block)},
                 "attention": {"timestep": int(timestep), "merge": merge, "threshold": float(threshold),
                               "grid": int(grid), "attention_grids": list(grids) if grids else "all"},
                 "intensity": {}}
    settings = {"model": model.model, "model_path": str(model.path), "method": method,
                "image_size": int(model.image_size), "seed": int(seed), **by_method[method],
                "lung_threshold": rule["threshold"], "lung_scale": rule["scale"]}
    metrics: dict = {"images": len(rows), "settings": settings}
    if scores:
        metrics.update({"scored_images": len(scores), "dice": float(np.mean([s["dice"] for s in scores])),
                        "dice_std": float(np.std([s["dice"] for s in scores])),
                        "oracle_dice_upper_bound": float(np.mean([s["oracle_dice"] for s in scores])),
                        "mean_clusters": float(np.mean([s["clusters"] for s in scores])), "per_image": scores})
    atomic_write_json(out / "metrics.json", metrics)
    return metrics
