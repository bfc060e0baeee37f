"""A trained head on a folder of images: outputs written in each image's original frame, and scores for
the rows that carry the truth.

Output layout: one folder per kind of prediction, so ``metrics.json`` is never among them:
``<output_dir>/landmarks/<stem>.json``, ``<output_dir>/<structure>/<stem>.png`` (or ``.nii.gz``) and
``<output_dir>/metrics.json``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..data import output_stems, preprocessed_stack
from ..errors import BundleInputError
from ..io import atomic_write_json
from .frame import image_frame
from .landmarks import decode_heatmaps, group_points, landmark_metrics, load_landmarks
from .segmentation import dice_and_hausdorff, mask_suffix, read_masks, write_masks

LANDMARK_FOLDER = "landmarks"


@torch.no_grad()
def predict(head: nn.Module, images: torch.Tensor, batch_size: int = 16, device: torch.device | str = "cpu") -> torch.Tensor:
    head = head.to(device).eval()
    return torch.cat([head(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)])


def _scores(task: str, scored: list[tuple], names: Sequence, pixel_spacing: float | None) -> dict:
    """Scores over the ``(predicted, truth)`` pairs of every row that carried the truth, in the original frames."""
    if task == "landmarks":
        predicted, true = (np.concatenate([pair[i] for pair in scored]) for i in (0, 1))
        return {"images": len(scored), **landmark_metrics(predicted, true, pixel_spacing=pixel_spacing)}
    per = [dice_and_hausdorff(p[None], t[None], names) for p, t in scored]
    return {"images": len(per), **{n: {k: float(np.nanmean([d[n][k] for d in per])) for k in ("dice", "hd95_px")}
                                   for n in names}}


@torch.no_grad()
def infer(head: nn.Module, saved: dict, rows: Sequence[dict], preprocessing, output_dir: str | os.PathLike,
          decode: str = "argmax", mask_format: str = "png", pixel_spacing: float | None = None,
          batch_size: int = 8, device: torch.device | str = "cpu") -> dict:
    """Run a trained head on every row and write its outputs in each image's original frame.

    Landmarks: ``<output_dir>/landmarks/<stem>.json`` as ``{"group": [[x, y], ...]}`` (the layout of the
    training files). Masks: ``<output_dir>/<structure>/<stem>.png`` (0/255) or ``.nii.gz`` (0/1), the
    structure named without its datalist ``mask_`` prefix. Rows that carry the truth (``landmark_file`` or the
    structures' mask columns) are scored in the original frame; the scores go to ``<output_dir>/metrics.json``.
    Returns the scores (empty when no row has a truth).
    """
    task, names, size = saved["task"], saved["names"], saved["image_size"]
    mask_suffix(mask_format)
    if not rows:
        raise BundleInputError("No images to run the head on: check input_dir.")
    out, stems = Path(output_dir), output_stems(rows)
    head = head.to(device).eval()
    scored: list[tuple] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        outputs = head(preprocessed_stack(chunk, preprocessing, desc="head").to(device)).cpu()
        for row, stem, output in zip(chunk, stems[start : start + batch_size], outputs):
            frame = image_frame(row, size)
            if task == "landmarks":
                points = frame.to_original(decode_heatmaps(output, decode).numpy())
                atomic_write_json(out / LANDMARK_FOLDER / f"{stem}.json", group_points(points, names), indent=None)
                if row.get("landmark_file"):
                    scored.append((points, load_landmarks(row["landmark_file"], [g for g, _ in names])))
            else:
                masks = write_masks(torch.sigmoid(output), frame, names, stem, out, mask_format)
                if all(row.get(n) for n in names):
                    scored.append((masks, read_masks(row, names, masks.shape[1:])))
    metrics = _scores(task, scored, names, pixel_spacing) if scored else {}
    if metrics:
        atomic_write_json(out / "metrics.json", metrics)
    return metrics
