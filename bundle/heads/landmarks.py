"""Landmarks: the JSON files that hold them, Gaussian heatmaps as training targets and their decoding back
to points, the heatmap loss, and the radial-error scores."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import BundleInputError

SDR_THRESHOLDS_PX = (2.0, 2.5, 3.0, 4.0, 6.0, 9.0, 10.0)


def _landmark_groups(path: str | os.PathLike, groups: Sequence[str] | None = None) -> dict[str, list]:
    """``{group: [[x, y], ...]}`` of a landmark JSON file, in the order of ``groups`` (default: the file's)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise BundleInputError(f"Landmark file '{path}' could not be read ({type(err).__name__}): give a JSON file "
                               'of {"group": [[x, y], ...]} pixel coordinates.') from None
    groups = list(groups or data)
    missing = [g for g in groups if g not in data]
    if missing:
        raise BundleInputError(f"Landmark file '{path}' has no group(s) {missing} (it has {sorted(data)}).")
    for group in groups:
        for i, point in enumerate(data[group]):
            try:
                finite = len(point) == 2 and all(np.isfinite(float(v)) for v in point)
            except (TypeError, ValueError):
                finite = False
            if not finite:
                raise BundleInputError(f"Landmark file '{path}': point {i} of group '{group}' is {point!r}, not two "
                                       "finite pixel coordinates [x, y]: correct it or leave the image out.")
    return {g: data[g] for g in groups}


def load_landmarks(path: str | os.PathLike, groups: Sequence[str] | None = None) -> np.ndarray:
    """``(L, 2)`` pixel coordinates from a JSON file of ``{"group": [[x, y], ...], ...}`` (the JSRT layout)."""
    return np.asarray([p for points in _landmark_groups(path, groups).values() for p in points], dtype=np.float64)


def landmark_layout(path: str | os.PathLike, groups: Sequence[str] | None = None) -> list[list]:
    """``[[group, count], ...]`` of a landmark file: how the head's channels map back to named groups."""
    return [[g, len(points)] for g, points in _landmark_groups(path, groups).items()]


def group_points(points: np.ndarray, layout: Sequence[Sequence]) -> dict[str, list[list[float]]]:
    """``(L, 2)`` points -> ``{"group": [[x, y], ...]}`` in the order of a :func:`landmark_layout`, rounded to
    0.01 px (the layout of the training files)."""
    grouped, i = {}, 0
    for group, count in layout:
        grouped[group] = [[round(float(x), 2), round(float(y), 2)] for x, y in points[i : i + count]]
        i += count
    return grouped


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


def resize_points(points: np.ndarray, from_size: Sequence[int], to_size: Sequence[int]) -> np.ndarray:
    """Pixel coordinates scaled between two frames of the same field of view (pixel centres kept aligned)."""
    scale = np.asarray(to_size, dtype=np.float64) / np.asarray(from_size, dtype=np.float64)
    return (np.asarray(points, dtype=np.float64) + 0.5) * scale - 0.5
