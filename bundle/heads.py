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
    """A diffusion UNet with its time embedding fixed to step 0 and a new 1x1 output convolution."""

    def __init__(self, unet: nn.Module, out_channels: int) -> None:
        super().__init__()
        last = unet.out[-1]
        if not isinstance(last, (nn.Conv2d,)) and hasattr(last, "conv"):
            last = last.conv
        unet.out[-1] = nn.Conv2d(last.in_channels, out_channels, kernel_size=1)
        self.unet = unet

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        timesteps = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
        return self.unet(images, timesteps)


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
