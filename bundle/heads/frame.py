"""The geometry between an original image and the preprocessed square a head sees, so that outputs
(landmarks, masks) can be written in the input image's own pixel frame."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import LoadImage


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

    def maps_to_original(self, maps: torch.Tensor) -> torch.Tensor:
        """``(C, S, S)`` maps on the preprocessed square -> ``(C, X, Y)`` on the original image (padding cut,
        bilinear resize)."""
        start = self.pad.astype(int)
        stop = start + np.round(self.original * self.scale).astype(int)
        inner = maps[:, start[0] : stop[0], start[1] : stop[1]].float()
        return F.interpolate(inner[None], size=tuple(int(v) for v in self.original), mode="bilinear",
                             align_corners=False)[0]


def original_size(path: str) -> tuple[int, int]:
    """``(X, Y)`` of an image file as MONAI loads it (header only where the reader allows)."""
    image = LoadImage(image_only=True)(path)
    return tuple(int(v) for v in image.shape[:2])


def image_frame(row: dict, size: int) -> Frame:
    """The :class:`Frame` of a datalist row's image at the model's ``size``."""
    return Frame(original_size(str(row["image"])), size)
