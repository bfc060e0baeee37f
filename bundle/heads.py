"""Few-shot heads on a diffusion-pre-trained UNet: landmark heatmaps and multi-label segmentation.

After Di Via et al. (arXiv 2407.18125): the denoising UNet, pre-trained without labels, is fine-tuned as
a dense regressor. Its time embedding is switched off (every call uses timestep 0, so the embedding is a
constant the fine-tuning can absorb) and its output convolution is replaced by a new 1x1 convolution with
one channel per landmark (Gaussian heatmaps) or per structure (mask logits).

Coordinates follow MONAI's array order: an image array is ``(C, X, Y)`` with X to the right and Y down,
and a landmark is ``(x, y)`` in pixels of that array, the same convention as the JSRT landmark files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .errors import BundleInputError

SDR_THRESHOLDS_PX = (2.0, 2.5, 3.0, 4.0, 6.0, 9.0, 10.0)


class DenseHead(nn.Module):
    """A diffusion UNet with its time embedding fixed to step 0 and a new 1x1 output convolution.

    Images arrive in [0, 1] and are scaled to [-1, 1], the range the denoiser was pre-trained on.
    """

    def __init__(self, unet: nn.Module, out_channels: int) -> None:
        super().__init__()
        last = unet.out[-1]
        if not isinstance(last, nn.Conv2d) and hasattr(last, "conv"):
            last = last.conv
        unet.out[-1] = nn.Conv2d(last.in_channels, out_channels, kernel_size=1)
        self.unet = unet

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        timesteps = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
        return self.unet(images * 2 - 1, timesteps)


def build_head(unet: nn.Module, out_channels: int, pretrained_path: str | os.PathLike | None = None) -> DenseHead:
    """``unet`` with the pre-trained denoiser's weights (or its random initialisation when no path), as a head."""
    if pretrained_path:
        from .autoencoder import load_state

        load_state(unet, pretrained_path, "denoiser", "pre-train it first (configs/heads/pretrain.json) or pass "
                   "--pretrained_path null to train from scratch")
    return DenseHead(unet, out_channels)


class Frame:
    """The geometry between an original image and its preprocessed square (longest side resized, centred pad)."""

    def __init__(self, original_size: Sequence[int], size: int) -> None:
        self.original = np.asarray(original_size[:2], dtype=np.float64)
        self.scale = size / self.original.max()
        self.pad = (size - np.round(self.original * self.scale)) // 2

    def to_image(self, points: np.ndarray) -> np.ndarray:
        return (np.asarray(points, dtype=np.float64) + 0.5) * self.scale - 0.5 + self.pad

    def to_original(self, points: np.ndarray) -> np.ndarray:
        return (np.asarray(points, dtype=np.float64) - self.pad + 0.5) / self.scale - 0.5


def original_size(path: str) -> tuple[int, int]:
    """``(X, Y)`` of an image file as MONAI loads it (header only where the reader allows)."""
    from monai.transforms import LoadImage

    image = LoadImage(image_only=True)(path)
    return tuple(int(v) for v in image.shape[:2])


def landmark_items(rows: Sequence[dict], preprocessing, size: int, groups: Sequence[str] | None, sigma: float,
                   column: str = "landmark_file") -> list[dict]:
    """Dataset items ``{"image", "label": heatmaps (L, S, S), "points": (L, 2) in the image frame, "frame"}``."""
    from .data import apply_to_file

    items = []
    for row in rows:
        if not row.get(column):
            raise BundleInputError(f"Row for '{row['image']}' has no '{column}': give every image a landmark JSON file.")
        frame = Frame(original_size(str(row["image"])), size)
        points = frame.to_image(load_landmarks(row[column], groups))
        image = torch.as_tensor(np.asarray(apply_to_file(preprocessing, dict(row))["image"])).float()
        items.append({"image": image, "label": gaussian_heatmaps(torch.as_tensor(points), (size, size), sigma),
                      "points": points, "frame": frame, "source": str(row["image"])})
    return items


def mask_items(rows: Sequence[dict], preprocessing, size: int, columns: Sequence[str]) -> list[dict]:
    """Dataset items ``{"image", "label": masks (C, S, S)}`` with one binary mask file per structure column."""
    from .data import apply_to_file, read_mask

    items = []
    for row in rows:
        missing = [c for c in columns if not row.get(c)]
        if missing:
            raise BundleInputError(f"Row for '{row['image']}' has no mask in column(s) {missing}.")
        image = torch.as_tensor(np.asarray(apply_to_file(preprocessing, dict(row))["image"])).float()
        masks = torch.cat([read_mask(str(row[c]), (size, size)) for c in columns])
        items.append({"image": image, "label": masks, "source": str(row["image"])})
    return items


def fine_tune(head: nn.Module, items: Sequence[dict], loss: nn.Module, iterations: int = 300, batch_size: int = 8,
              lr: float = 1e-4, seed: int = 0, device: torch.device | str = "cpu") -> list[float]:
    """Train ``head`` for exactly ``iterations`` steps on ``items`` (sampled with replacement) with MONAI's
    ``SupervisedTrainer``; returns the loss of every iteration."""
    from ignite.engine import Events
    from monai.data import DataLoader, Dataset
    from monai.engines import SupervisedTrainer
    from torch.utils.data import RandomSampler

    if not items:
        raise BundleInputError("No labelled images to fine-tune on: give at least one.")
    torch.manual_seed(seed)
    data = [{"image": it["image"], "label": it["label"]} for it in items]
    sampler = RandomSampler(data, replacement=True, num_samples=iterations * min(batch_size, len(data)),
                            generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(Dataset(data), batch_size=min(batch_size, len(data)), sampler=sampler, num_workers=0)
    head = head.to(device)
    trainer = SupervisedTrainer(device=torch.device(device), max_epochs=1, train_data_loader=loader, network=head,
                                optimizer=torch.optim.AdamW(head.parameters(), lr=lr), loss_function=loss,
                                decollate=False)
    losses: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].item()))
    trainer.run()
    head.eval()
    return losses


@torch.no_grad()
def predict(head: nn.Module, images: torch.Tensor, batch_size: int = 16, device: torch.device | str = "cpu") -> torch.Tensor:
    head = head.to(device).eval()
    return torch.cat([head(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)])


def load_landmarks(path: str | os.PathLike, groups: Sequence[str] | None = None) -> np.ndarray:
    """``(L, 2)`` pixel coordinates from a JSON file of ``{"group": [[x, y], ...], ...}`` (the JSRT layout)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise BundleInputError(f"Landmark file '{path}' could not be read ({type(err).__name__}): give a JSON file "
                               'of {"group": [[x, y], ...]} pixel coordinates.') from None
    groups = list(groups or data)
    missing = [g for g in groups if g not in data]
    if missing:
        raise BundleInputError(f"Landmark file '{path}' has no group(s) {missing} (it has {sorted(data)}).")
    return np.asarray([p for g in groups for p in data[g]], dtype=np.float64)


def gaussian_heatmaps(points: torch.Tensor, size: Sequence[int], sigma: float) -> torch.Tensor:
    """``(L, X, Y)`` heatmaps with peak 1 at each ``(x, y)`` point; points outside the image give all-zero maps."""
    xs = torch.arange(size[0], dtype=torch.float32).view(1, -1, 1)
    ys = torch.arange(size[1], dtype=torch.float32).view(1, 1, -1)
    px, py = points[:, 0].float().view(-1, 1, 1), points[:, 1].float().view(-1, 1, 1)
    maps = torch.exp(-((xs - px) ** 2 + (ys - py) ** 2) / (2 * sigma**2))
    inside = (px >= 0) & (px <= size[0] - 1) & (py >= 0) & (py <= size[1] - 1)
    return maps * inside


def decode_heatmaps(heatmaps: torch.Tensor, method: str = "argmax", temperature: float = 0.05) -> torch.Tensor:
    """``(..., L, X, Y)`` heatmaps -> ``(..., L, 2)`` ``(x, y)`` coordinates.

    ``argmax`` returns the hottest pixel; ``soft`` the expectation under a softmax of the heatmap divided by
    ``temperature`` (sub-pixel, differentiable).
    """
    *lead, x_size, y_size = heatmaps.shape
    flat = heatmaps.reshape(-1, x_size * y_size).float()
    if method == "argmax":
        index = flat.argmax(dim=1)
        coords = torch.stack([index // y_size, index % y_size], dim=1).float()
    elif method == "soft":
        weights = torch.softmax(flat / temperature, dim=1).view(-1, x_size, y_size)
        xs = torch.arange(x_size, dtype=torch.float32, device=heatmaps.device)
        ys = torch.arange(y_size, dtype=torch.float32, device=heatmaps.device)
        coords = torch.stack([(weights.sum(2) * xs).sum(1), (weights.sum(1) * ys).sum(1)], dim=1)
    else:
        raise BundleInputError(f"Heatmap decoding '{method}' is not known: use 'argmax' or 'soft'.")
    return coords.view(*lead, 2)


class HeatmapCrossEntropy(nn.Module):
    """Each landmark's output map as a distribution over pixels (softmax) against its normalised Gaussian.

    Plain MSE on small Gaussian heatmaps is minimised early by predicting zeros everywhere (on JSRT at 64 px,
    200 iterations left every landmark at a corner, MRE about 310 px in the 512-pixel frame); a
    per-landmark spatial softmax cannot vanish, so every step moves mass towards the landmark.
    """

    def forward(self, logits: torch.Tensor, heatmaps: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(logits.flatten(2).float(), dim=-1)
        target = heatmaps.flatten(2).float()
        target = target / target.sum(-1, keepdim=True).clamp_min(1e-8)
        return -(target * log_p).sum(-1).mean()


def landmark_metrics(predicted: np.ndarray, true: np.ndarray, thresholds: Sequence[float] = SDR_THRESHOLDS_PX,
                     pixel_spacing: float | None = None) -> dict[str, float]:
    """Mean radial error and success detection rates (share of landmarks within each threshold), in pixels
    and, when ``pixel_spacing`` (mm per pixel) is given, the MRE in millimetres too."""
    predicted, true = np.asarray(predicted, dtype=np.float64), np.asarray(true, dtype=np.float64)
    if predicted.shape != true.shape or predicted.shape[-1] != 2:
        raise BundleInputError(f"Landmark arrays of shapes {predicted.shape} and {true.shape} do not match (..., 2).")
    errors = np.linalg.norm(predicted - true, axis=-1)
    result = {"mre_px": float(errors.mean()), "mre_px_std": float(errors.std())}
    result.update({f"sdr_{t:g}px": float((errors <= t).mean()) for t in thresholds})
    if pixel_spacing is not None:
        result["mre_mm"] = float(errors.mean() * pixel_spacing)
    return result


def dice_and_hausdorff(predicted: torch.Tensor, true: torch.Tensor, names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per-structure Dice and 95th-percentile Hausdorff distance (pixels) of ``(B, C, X, Y)`` binary masks."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    if predicted.shape != true.shape:
        raise BundleInputError(f"Mask shapes {tuple(predicted.shape)} and {tuple(true.shape)} differ.")
    dice = DiceMetric(include_background=True, reduction="none")(predicted.float(), true.float())
    hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(predicted.float(), true.float())
    return {name: {"dice": float(dice[:, c].nanmean()), "hd95_px": float(hd[:, c].nanmean())} for c, name in enumerate(names)}


def resize_points(points: np.ndarray, from_size: Sequence[int], to_size: Sequence[int]) -> np.ndarray:
    """Pixel coordinates scaled between two frames of the same field of view (pixel centres kept aligned)."""
    scale = np.asarray(to_size, dtype=np.float64) / np.asarray(from_size, dtype=np.float64)
    return (np.asarray(points, dtype=np.float64) + 0.5) * scale - 0.5
