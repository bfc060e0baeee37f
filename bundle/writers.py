"""Writing generated images. Arrays arrive in MONAI's (x, y) orientation and values in [0, 1]."""

from __future__ import annotations

import os

import numpy as np
import torch

from .io import atomic_path


def to_display(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(1, H, W)`` or ``(H, W)`` in MONAI's (x, y) order -> row-major ``(rows, cols)`` float array in [0, 1]."""
    array = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image, dtype=np.float32)
    array = array.reshape(array.shape[-2:])
    return np.clip(array.T, 0.0, 1.0)


def write_png(image: torch.Tensor | np.ndarray, path: str | os.PathLike, bit_depth: int = 8) -> None:
    from PIL import Image

    rows = to_display(image)
    if bit_depth == 8:
        pil = Image.fromarray(np.round(rows * 255).astype(np.uint8))
    elif bit_depth == 16:
        pil = Image.fromarray(np.round(rows * 65535).astype(np.uint16))
    else:
        raise ValueError(f"PNG bit depth {bit_depth} is not supported: use 8 or 16.")
    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG")


def write_nifti(image: torch.Tensor | np.ndarray, path: str | os.PathLike) -> None:
    """A 2D NIfTI in MONAI's own (x, y) order, so ``LoadImage`` reads back exactly the array written."""
    import nibabel as nib

    array = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image, dtype=np.float32)
    array = np.clip(array.reshape(array.shape[-2:]), 0.0, 1.0)
    with atomic_path(path) as tmp:
        nib.save(nib.Nifti1Image(array, np.eye(4)), tmp + ".nii.gz")
        os.replace(tmp + ".nii.gz", tmp)


WRITERS = {"png": (write_png, ".png"), "nifti": (write_nifti, ".nii.gz")}
