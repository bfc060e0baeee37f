"""Judging generated images against real ones: Fréchet distance, diversity, precision/recall/density/coverage,
memorisation and autoencoder reconstruction quality.

Every number is reported with the feature space it was computed in: a Fréchet distance in the DINO space
that conditioned the generator partly rewards the conditioning itself, so compare spaces side by side.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import FIDMetric, MultiScaleSSIMMetric, PSNRMetric, SSIMMetric
from torch import nn
from tqdm import tqdm

from .compat import ensure_torchvision_importable
from .constants import IMAGENET_MEAN, IMAGENET_STD
from .data import build_datalist, preprocessed_stack
from .errors import BundleInputError
from .io import atomic_write
from .writers import to_display

logger = logging.getLogger(__name__)


# ---- image sets and feature spaces -----------------------------------------------------------------------


def require_image_sets(*sources: str | os.PathLike | None, optional: Sequence[str | os.PathLike | None] = ()) -> None:
    """Stop with one message when an image set is missing, before any model is loaded."""
    for source in [*sources, *(s for s in optional if s not in (None, ""))]:
        if source in (None, "") or not Path(str(source)).exists():
            raise BundleInputError(f"Image set '{source}' does not exist: pass a folder, datalist or sampling "
                                   "manifest (--generated_dir, --real_dir, --train_dir).")


def load_images(source: str | os.PathLike, preprocessing: Callable, limit: int | None = None,
                rows_for: Callable | None = None) -> tuple[torch.Tensor, list[str]]:
    """A folder, datalist or sampling manifest -> ``(N, 1, H, W)`` preprocessed images and their paths;
    ``rows_for`` turns the rows into those the modality takes (a generator's ``datalist``: volumes into slices)."""
    require_image_sets(source)
    rows = build_datalist(source, None)
    rows = (rows_for(rows) if rows_for is not None else rows)[:limit]
    return preprocessed_stack(rows, preprocessing, f"load {Path(str(source)).name}"), [str(r["image"]) for r in rows]


class PixelFeatures(nn.Module):
    """Images downsampled to ``size`` x ``size`` and flattened: a label-free space for near-copy detection."""

    name = "pixels"

    def __init__(self, size: int = 32) -> None:
        super().__init__()
        self.size = size

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images.float(), self.size).flatten(1)


class DinoCLSFeatures(nn.Module):
    """The bundle's DINO extractor reduced to one vector per image: the CLS token, or the mean patch token
    when the extractor gives patch tokens only."""

    def __init__(self, dino: nn.Module) -> None:
        super().__init__()
        self.dino = dino
        pooled = "mean patch" if dino.tokens == "patch" else "CLS"
        self.name = (f"dino:{dino.model_name}({'random' if dino.weights == 'random' else Path(dino.weights).name}, "
                     f"{pooled})")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.dino(images)
        return tokens.mean(1) if self.dino.tokens == "patch" else tokens[:, 0]


class InceptionFeatures(nn.Module):
    """Inception-v3 pool features (2048-d), as FID uses, from a local torchvision weights file.

    torchvision downloads these weights on first use; offline, download ``inception_v3_google-0cc3c7bd.pth``
    elsewhere and pass its path. (FID's reference implementation uses a slightly different TF port, so
    numbers are comparable between runs of this bundle, not with published FIDs.)
    """

    name = "inception_v3"

    def __init__(self, weights: str | os.PathLike | None) -> None:
        super().__init__()
        if not weights or not os.path.isfile(weights):
            raise BundleInputError(
                f"Inception-v3 features need a local weights file, and '{weights}' is not one: download "
                "torchvision's inception_v3_google-0cc3c7bd.pth and pass --inception_weights PATH, or use the "
                "'dino' or 'pixels' feature space."
            )
        ensure_torchvision_importable()
        from torchvision.models import inception_v3  # only once the compatibility shim is in place

        model = inception_v3(weights=None, aux_logits=True, init_weights=False)
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as err:
            raise BundleInputError(f"Inception-v3 weights '{weights}' do not load ({type(err).__name__}: "
                                   f"{str(err).splitlines()[0][:200]}): give torchvision's inception_v3 file.") from None
        model.fc = nn.Identity()
        self.model = model.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float().expand(-1, 3, -1, -1), size=(299, 299), mode="bilinear", align_corners=False)
        return self.model((x - self.mean) / self.std)


def feature_space(name: str, dino: nn.Module | None = None, inception_weights: str | None = None) -> nn.Module:
    if name == "dino":
        if dino is None:
            raise BundleInputError("The 'dino' feature space needs the DINO extractor of the configuration.")
        return DinoCLSFeatures(dino)
    if name == "inception":
        return InceptionFeatures(inception_weights)
    if name == "pixels":
        return PixelFeatures()
    raise BundleInputError(f"Feature space '{name}' is not known: use 'dino', 'inception' or 'pixels'.")


@torch.no_grad()
def extract(extractor: nn.Module, images: torch.Tensor, batch_size: int = 32, device: torch.device | str = "cpu"):
    extractor = extractor.to(device)
    chunks = [extractor(images[i : i + batch_size].to(device)).float().cpu() for i in
              tqdm(range(0, len(images), batch_size), desc=f"features {getattr(extractor, 'name', '')}", leave=False, disable=None)]
    return torch.cat(chunks)


# ---- metrics ---------------------------------------------------------------------------------------------


def frechet_distance(real: torch.Tensor, generated: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (MONAI's ``FIDMetric``)."""
    for name, f in (("real", real), ("generated", generated)):
        if f.ndim != 2 or len(f) < 2:
            raise BundleInputError(f"The {name} set needs at least two images for a Fréchet distance, got {len(f)}.")
    return float(FIDMetric()(generated.double(), real.double()))


def ms_ssim_settings(size: int) -> dict[str, Any]:
    """MS-SSIM scales and window that fit ``size`` pixels (five 11-pixel scales need at least 161 pixels)."""
    weights = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
    kernel = 11 if size >= 161 else 7
    scales = 5
    while scales > 1 and size / 2 ** (scales - 1) < kernel:
        scales -= 1
    return {"kernel_size": kernel, "weights": weights[:scales]}


def diversity(images: torch.Tensor, max_pairs: int = 500, seed: int = 0) -> float:
    """Mean MS-SSIM over (up to ``max_pairs`` random) pairs of different images: 1 means all alike."""
    n = len(images)
    if n < 2:
        raise BundleInputError(f"Diversity needs at least two images, got {n}.")
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if len(pairs) > max_pairs:
        pick = np.random.default_rng(seed).choice(len(pairs), max_pairs, replace=False)
        pairs = [pairs[k] for k in sorted(pick)]
    a = torch.stack([images[i] for i, _ in pairs]).float()
    b = torch.stack([images[j] for _, j in pairs]).float()
    metric = MultiScaleSSIMMetric(spatial_dims=2, data_range=1.0, **ms_ssim_settings(images.shape[-1]))
    return float(metric(a, b).mean())


def prdc(real: torch.Tensor, generated: torch.Tensor, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage (Naeem et al., 2020) with ``k`` nearest neighbours."""
    if len(real) <= k or len(generated) <= k:
        raise BundleInputError(f"PRDC with k={k} needs more than {k} real and generated images "
                               f"(got {len(real)} and {len(generated)}): lower k or add images.")
    real, generated = real.double(), generated.double()
    real_radius = torch.cdist(real, real).kthvalue(k + 1, dim=1).values  # +1: each point is its own nearest
    fake_radius = torch.cdist(generated, generated).kthvalue(k + 1, dim=1).values
    d = torch.cdist(real, generated)  # (R, G)
    inside_real = d < real_radius[:, None]
    return {
        "precision": float(inside_real.any(dim=0).double().mean()),
        "recall": float((d < fake_radius[None, :]).any(dim=1).double().mean()),
        "density": float(inside_real.double().sum(dim=0).mean() / k),
        "coverage": float((d.min(dim=1).values < real_radius).double().mean()),
    }


def memorisation(generated: torch.Tensor, train: torch.Tensor, test: torch.Tensor, quantile: float = 0.05) -> dict:
    """Nearest-training-image distances of generated images against those of real held-out images.

    A generated image closer to its nearest training image than all but ``quantile`` of the real test images
    are to theirs is flagged as a possible copy. Distances are Euclidean in the given feature space.
    """
    gen_to_train = torch.cdist(generated.double(), train.double()).min(dim=1)
    test_to_train = torch.cdist(test.double(), train.double()).min(dim=1).values
    threshold = float(torch.quantile(test_to_train, quantile))
    flagged = (gen_to_train.values < threshold).nonzero().flatten().tolist()
    return {
        "threshold": threshold,
        "quantile": quantile,
        "test_to_train": {"median": float(test_to_train.median()), "min": float(test_to_train.min())},
        "generated_to_train": {"median": float(gen_to_train.values.median()), "min": float(gen_to_train.values.min())},
        "flagged_fraction": len(flagged) / len(generated),
        "flagged": flagged,
        "nearest_train": gen_to_train.indices.tolist(),
        "distance": gen_to_train.values.tolist(),
    }


def divergent(generated: torch.Tensor, generated_features: torch.Tensor, train_features: torch.Tensor,
              test_features: torch.Tensor, real_images: torch.Tensor, margin: float = 1.0) -> dict[str, Any]:
    """Flag samples that no real radiograph resembles: an automatic check for diverged sampling.

    A sample is flagged when any of these holds: (1) it has a non-finite pixel; (2) it is flat, its pixel
    standard deviation below half the smallest one among ``real_images`` (the real held-out images); (3) it is
    noisy, its mean absolute Laplacian (high-frequency energy) above ``margin`` times the largest among
    ``real_images``; (4) it lies off the real manifold, its nearest-training-image distance (in the given
    feature space, e.g. 32x32 pixels) above ``margin`` times the largest nearest-training distance of a real
    held-out image. With ``margin`` >= 1 no real held-out image trips a flag, so each flag is a sample that is
    flatter, noisier or farther from the training data than every real unseen image is.
    """
    if len(test_features) < 2:
        raise BundleInputError(f"The divergence check needs at least two real held-out images, got {len(test_features)}.")
    flat = generated.flatten(1)
    non_finite = ~torch.isfinite(flat).all(dim=1)
    std = torch.nan_to_num(flat.float(), nan=0.0, posinf=0.0, neginf=0.0).std(dim=1)
    floor = 0.5 * float(real_images.flatten(1).float().std(dim=1).min())
    laplacian = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)

    def roughness(images: torch.Tensor) -> torch.Tensor:
        x = torch.nan_to_num(images.float().flatten(0, -3)[:, None])  # every 2-D plane, one channel
        return F.conv2d(x, laplacian).abs().flatten(1).mean(1).view(len(images), -1).amax(1)

    rough_limit = margin * float(roughness(real_images).max())
    test_nn = torch.cdist(test_features.double(), train_features.double()).min(dim=1).values
    limit = margin * float(test_nn.max())
    gen_nn = torch.cdist(torch.nan_to_num(generated_features.double()), train_features.double()).min(dim=1).values
    reasons = {"non_finite": non_finite, "flat": std < floor, "noisy": roughness(generated) > rough_limit,
               "off_manifold": gen_nn > limit}
    flagged = torch.zeros(len(generated), dtype=torch.bool)
    for mask in reasons.values():
        flagged |= mask
    return {"count": int(flagged.sum()), "of": len(generated), "flagged": flagged.nonzero().flatten().tolist(),
            "by_reason": {k: int(v.sum()) for k, v in reasons.items()}, "std_floor": floor,
            "roughness_limit": rough_limit, "distance_limit": limit, "margin": margin,
            "nearest_train_distance": {"generated_max": float(gen_nn.max()), "generated_median": float(gen_nn.median()),
                                       "test_max": float(test_nn.max()), "test_median": float(test_nn.median())}}


def source_retrieval(generated_features: torch.Tensor, pool_features: torch.Tensor, sources: Sequence[int]) -> dict:
    """How often a sample's source image is its nearest (top-1) or among its 5 nearest real images of the pool.

    With conditioning that carries nothing, the source is found at chance: 1/N and 5/N for a pool of N.
    Use a feature space the generator was not conditioned on (e.g. pixels), so the match is not circular.
    """
    sources = torch.as_tensor(list(sources))
    if len(sources) != len(generated_features) or int(sources.max()) >= len(pool_features) or int(sources.min()) < 0:
        raise BundleInputError(f"source_retrieval needs one source index in [0, {len(pool_features)}) per sample.")
    d = torch.cdist(generated_features.double(), pool_features.double())
    rank = (d < d.gather(1, sources[:, None])).sum(dim=1)  # 0 = the source is the nearest
    n = len(pool_features)
    return {"pool": n, "samples": len(sources), "top1": float((rank == 0).double().mean()),
            "top5": float((rank < 5).double().mean()), "chance_top1": 1 / n, "chance_top5": min(1.0, 5 / n),
            "median_rank": float(rank.double().median() + 1)}


@torch.no_grad()
def reconstruction_quality(images: torch.Tensor, codec: nn.Module, batch_size: int = 16,
                           device: torch.device | str = "cpu", features: Mapping[str, nn.Module] | None = None) -> dict:
    """Autoencoder PSNR, SSIM and MS-SSIM on ``images`` (mean and std over images); with ``features`` (name ->
    extractor, e.g. :func:`feature_space`), also ``fd_<name>``: the Fréchet distance of the reconstructions from
    the originals, which says whether what the decoder adds looks like the real thing."""
    recon = torch.cat([codec.decode(codec.encode(images[i : i + batch_size].to(device))).cpu()
                       for i in range(0, len(images), batch_size)]).clamp(0, 1)
    metrics = {
        "psnr_db": PSNRMetric(max_val=1.0),
        "ssim": SSIMMetric(spatial_dims=2, data_range=1.0, win_size=ms_ssim_settings(images.shape[-1])["kernel_size"]),
        "ms_ssim": MultiScaleSSIMMetric(spatial_dims=2, data_range=1.0, **ms_ssim_settings(images.shape[-1])),
    }
    out = {}
    for name, metric in metrics.items():
        values = metric(recon, images.float()).flatten()
        out[name] = {"mean": float(values.mean()), "std": float(values.std())}
    for name, extractor in (features or {}).items():
        out[f"fd_{name}"] = frechet_distance(extract(extractor, images.float()), extract(extractor, recon))
    return out


# ---- the whole evaluation --------------------------------------------------------------------------------


def two_rows_png(top: Sequence[torch.Tensor], bottom: Sequence[torch.Tensor], labels: tuple[str, str], path: Path,
                 titles: Sequence[str] = ()) -> None:
    """A figure of image pairs, column by column: ``top[i]`` above ``bottom[i]``, rows named by ``labels``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # matplotlib is slow to import and only the report figures need it

    fig, axes = plt.subplots(2, len(top), figsize=(1.3 * len(top), 2.9 if titles else 2.7), squeeze=False)
    for col, (upper, lower) in enumerate(zip(top, bottom)):
        axes[0, col].imshow(to_display(upper), cmap="gray", vmin=0, vmax=1)
        axes[1, col].imshow(to_display(lower), cmap="gray", vmin=0, vmax=1)
        if col < len(titles):
            axes[0, col].set_title(titles[col], fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel(labels[0], fontsize=7)
    axes[1, 0].set_ylabel(labels[1], fontsize=7)
    fig.tight_layout(pad=0.2)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def closest_pairs_png(generated: torch.Tensor, train: torch.Tensor, result: Mapping[str, Any], path: Path,
                      count: int = 8) -> None:
    """The ``count`` generated images closest to a training image, each above its nearest training image."""
    order = np.argsort(result["distance"])[:count]
    titles = [f"d={result['distance'][g]:.3g}{' (flagged)' if g in result['flagged'] else ''}" for g in order]
    two_rows_png([generated[g] for g in order], [train[result["nearest_train"][g]] for g in order],
                 ("generated", "nearest train"), path, titles)


def markdown_table(result: Mapping[str, Any]) -> str:
    lines = ["| feature space | FD (generated vs real) | FD (train vs real, reference) | precision | recall | density | coverage |",
             "|---|---|---|---|---|---|---|"]
    for space, r in result["feature_spaces"].items():
        p = r["prdc"]
        ref = r.get("frechet_distance_train_reference")
        lines.append(f"| {space} | {r['frechet_distance']:.4g} | {'' if ref is None else f'{ref:.4g}'} | "
                     f"{p['precision']:.3f} | {p['recall']:.3f} | {p['density']:.3f} | {p['coverage']:.3f} |")
    d = result["diversity_ms_ssim"]
    lines += ["", f"Diversity (mean pairwise MS-SSIM, lower = more varied): generated {d['generated']:.3f}, "
              f"real {d['real']:.3f}."]
    if "memorisation" in result:
        m = result["memorisation"]
        lines.append(f"Memorisation ({m['feature_space']}): {m['flagged_fraction']:.1%} of generated images are closer "
                     f"to a training image than {1 - m['quantile']:.0%} of real test images are (threshold "
                     f"{m['threshold']:.4g}; median distance generated {m['generated_to_train']['median']:.4g}, "
                     f"test {m['test_to_train']['median']:.4g}).")
    if "reconstruction" in result:
        r = result["reconstruction"]
        lines.append(f"Autoencoder reconstruction of the real set: PSNR {r['psnr_db']['mean']:.2f} dB, "
                     f"SSIM {r['ssim']['mean']:.3f}, MS-SSIM {r['ms_ssim']['mean']:.3f}.")
    return "\n".join(lines) + "\n"


def evaluate(
    generated_dir: str | os.PathLike,
    real_dir: str | os.PathLike,
    preprocessing: Callable,
    output_dir: str | os.PathLike,
    feature_spaces: Sequence[str] = ("dino", "pixels"),
    dino: nn.Module | None = None,
    inception_weights: str | None = None,
    train_dir: str | os.PathLike | None = None,
    memorisation_space: str = "pixels",
    memorisation_quantile: float = 0.05,
    codec: nn.Module | None = None,
    k: int = 5,
    max_images: int | None = None,
    device: torch.device | str = "cpu",
    rows_for: Callable | None = None,
    generated_preprocessing: Callable | None = None,
) -> dict[str, Any]:
    """Compare a generated set with a real one and write ``evaluation.json`` and ``evaluation.md``.

    ``rows_for`` turns the real and training sets' rows into those the modality takes (volumes into slices);
    ``generated_preprocessing`` reads the generated images (default: ``preprocessing``).

    ``train_dir`` (the generator's training images) enables the memorisation check and a reference FD of the
    training set against the real set; ``codec`` adds the autoencoder's reconstruction quality on the real set.
    """
    output_dir = Path(output_dir)
    generated, generated_paths = load_images(generated_dir, generated_preprocessing or preprocessing, max_images)
    real, _ = load_images(real_dir, preprocessing, max_images, rows_for)
    train = load_images(train_dir, preprocessing, max_images, rows_for)[0] if train_dir else None
    if generated.shape[1:] != real.shape[1:]:
        raise BundleInputError(f"Generated images are {tuple(generated.shape[1:])} and real ones {tuple(real.shape[1:])}"
                               " after preprocessing: evaluate at one --image_size.")
    result: dict[str, Any] = {"generated": str(generated_dir), "real": str(real_dir), "train": str(train_dir or ""),
                              "counts": {"generated": len(generated), "real": len(real),
                                         "train": 0 if train is None else len(train)},
                              "k": k, "feature_spaces": {}}
    cached: dict[str, tuple] = {}
    for space in dict.fromkeys([*feature_spaces, *([memorisation_space] if train is not None else [])]):
        extractor = feature_space(space, dino, inception_weights)
        feats = tuple(None if x is None else extract(extractor, x, device=device) for x in (generated, real, train))
        cached[space] = feats
        if space not in feature_spaces:
            continue
        g, r, t = feats
        entry = {"name": getattr(extractor, "name", space), "frechet_distance": frechet_distance(r, g), "prdc": prdc(r, g, k)}
        if t is not None:
            entry["frechet_distance_train_reference"] = frechet_distance(r, t)
        result["feature_spaces"][space] = entry
    result["diversity_ms_ssim"] = {"generated": diversity(generated), "real": diversity(real)}
    if train is not None:
        g, r, t = cached[memorisation_space]
        mem = memorisation(g, t, r, memorisation_quantile)
        result["memorisation"] = {"feature_space": memorisation_space, **{k_: v for k_, v in mem.items()
                                                                          if k_ not in ("nearest_train", "distance")},
                                  "flagged_files": [generated_paths[i] for i in mem["flagged"]]}
        closest_pairs_png(generated, train, mem, output_dir / "closest_pairs.png")
    if codec is not None:
        result["reconstruction"] = reconstruction_quality(real, codec.to(device), device=device)
    for name, text in (("evaluation.json", json.dumps(result, indent=2)), ("evaluation.md", markdown_table(result))):
        atomic_write(output_dir / name, lambda tmp, text=text: Path(tmp).write_text(text))
    logger.info("Wrote %s and %s.", output_dir / "evaluation.json", output_dir / "evaluation.md")
    return result
