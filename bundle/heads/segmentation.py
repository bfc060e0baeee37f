"""Masks: reading a row's structure masks, writing predicted masks in an image's original frame, and the
Dice/Hausdorff scores."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric

from ..constants import MASK_COLUMN_PREFIX
from ..data import read_mask
from ..errors import BundleInputError
from ..writers import FORMATS, write_image
from .frame import Frame

MASK_FORMATS = ("png", "nifti")


def mask_suffix(mask_format: str) -> str:
    """The file suffix of a mask format, refusing formats that are not for masks."""
    if mask_format not in MASK_FORMATS:
        raise BundleInputError(f"Mask format '{mask_format}' is not supported: use 'png' or 'nifti'.")
    return FORMATS[mask_format]


def mask_folders(names: Sequence[str]) -> list[str]:
    """The output folder of each structure: its name without the datalist's ``mask_`` column prefix
    (``mask_left_lung`` -> ``left_lung``), refusing names that would share a folder."""
    folders = [n.removeprefix(MASK_COLUMN_PREFIX) for n in names]
    if len(set(folders)) < len(folders):
        raise BundleInputError(f"Structures {list(names)} would write to the same folder: give each a distinct name.")
    return folders


def read_masks(row: Mapping, columns: Sequence[str], size: Sequence[int]) -> torch.Tensor:
    """``(C, X, Y)`` binary masks of one datalist row, one per mask column, resized to ``size``."""
    return torch.cat([read_mask(str(row[c]), tuple(size)) for c in columns])


def write_masks(maps: torch.Tensor, frame: Frame, names: Sequence[str], stem: str, output_dir: str | os.PathLike,
                mask_format: str) -> torch.Tensor:
    """``(C, S, S)`` probabilities on the preprocessed square -> binary masks in the original frame, written as
    ``<output_dir>/<structure>/<stem><suffix>`` (PNG 0/255 or NIfTI 0/1, folders by :func:`mask_folders`);
    returns the ``(C, X, Y)`` masks."""
    masks = (frame.maps_to_original(maps) > 0.5).float()
    for folder, mask in zip(mask_folders(names), masks):
        write_image(mask[None], Path(output_dir) / folder / f"{stem}{mask_suffix(mask_format)}", mask_format)
    return masks


def dice_and_hausdorff(predicted: torch.Tensor, true: torch.Tensor, names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per-structure Dice and 95th-percentile Hausdorff distance (pixels) of ``(B, C, X, Y)`` binary masks."""
    if predicted.shape != true.shape:
        raise BundleInputError(f"Mask shapes {tuple(predicted.shape)} and {tuple(true.shape)} differ.")
    dice = DiceMetric(include_background=True, reduction="none")(predicted.float(), true.float())
    hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(predicted.float(), true.float())
    return {name: {"dice": float(dice[:, c].nanmean()), "hd95_px": float(hd[:, c].nanmean())} for c, name in enumerate(names)}
