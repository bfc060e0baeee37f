"""Fine-tuning a head: labelled datalist rows into dataset items, and a fixed budget of training steps
whatever the number of labelled images."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedTrainer
from torch import nn
from torch.utils.data import RandomSampler

from ..data import apply_to_file, read_datalist
from ..errors import BundleInputError
from ..performance import amp_enabled, amp_kwargs, training_network
from ..workflow import optional_path
from .frame import image_frame
from .landmarks import gaussian_heatmaps, load_landmarks
from .segmentation import read_masks


def labelled_rows(datalist: str | os.PathLike | None, num_labelled: int | str | None, columns: Sequence[str]) -> list[dict]:
    """The first ``num_labelled`` rows (``all``/``None``: every row) of a datalist that has every label column."""
    if optional_path(datalist) is None:
        raise BundleInputError(f"No labelled data: pass --labelled_dir, a CSV/JSON datalist with an image column and "
                               f"the label column(s) {list(columns)}.")
    rows = read_datalist(datalist)
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise BundleInputError(f"Datalist '{datalist}' has no column(s) {missing}: add them (label files per image).")
    if num_labelled not in (None, "all"):
        if int(num_labelled) < 1:
            raise BundleInputError(f"num_labelled is {num_labelled}: fine-tuning needs at least one labelled image.")
        if int(num_labelled) > len(rows):
            raise BundleInputError(f"num_labelled is {num_labelled} but datalist '{datalist}' has {len(rows)} labelled "
                                   f"rows: give at most {len(rows)}, or 'all'.")
        rows = rows[: int(num_labelled)]
    return rows


def recipe_setting(recipe: Sequence[dict], labelled: int, key: str, given=None):
    """The fine-tuning setting ``key`` for ``labelled`` films: ``given`` when it is set (a user's choice wins), else
    ``key`` of the first ``recipe`` entry whose ``up_to`` (``None``: no limit) is at least ``labelled``."""
    if given is not None:
        return given
    for entry in recipe:
        if entry.get("up_to") is None or int(labelled) <= int(entry["up_to"]):
            if key not in entry:
                raise BundleInputError(f"head_recipe entry {entry} has no '{key}': give it one, or set head_{key}.")
            return entry[key]
    raise BundleInputError(f"head_recipe has no entry for {labelled} labelled films: end it with an entry whose "
                           "up_to is null, or set head_lr and head_iterations.")


def _preprocessed(row: dict, preprocessing) -> torch.Tensor:
    return torch.as_tensor(np.asarray(apply_to_file(preprocessing, dict(row))["image"])).float()


def landmark_items(rows: Sequence[dict], preprocessing, size: int, groups: Sequence[str] | None, sigma: float,
                   column: str = "landmark_file") -> list[dict]:
    """Dataset items ``{"image", "label": heatmaps (L, S, S), "points": (L, 2) in the image frame, "frame"}``."""
    items = []
    for row in rows:
        if not row.get(column):
            raise BundleInputError(f"Row for '{row['image']}' has no '{column}': give every image a landmark JSON file.")
        frame = image_frame(row, size)
        points = frame.to_image(load_landmarks(row[column], groups))
        items.append({"image": _preprocessed(row, preprocessing),
                      "label": gaussian_heatmaps(torch.as_tensor(points), (size, size), sigma),
                      "points": points, "frame": frame, "source": str(row["image"])})
    return items


def mask_items(rows: Sequence[dict], preprocessing, size: int, columns: Sequence[str]) -> list[dict]:
    """Dataset items ``{"image", "label": masks (C, S, S)}`` with one binary mask file per structure column."""
    items = []
    for row in rows:
        missing = [c for c in columns if not row.get(c)]
        if missing:
            raise BundleInputError(f"Row for '{row['image']}' has no mask in column(s) {missing}.")
        items.append({"image": _preprocessed(row, preprocessing), "label": read_masks(row, columns, (size, size)),
                      "source": str(row["image"])})
    return items


def fixed_iteration_loader(items: Sequence[dict], iterations: int, batch_size: int = 8, seed: int = 0) -> DataLoader:
    """A loader of exactly ``iterations`` batches of ``min(batch_size, len(items))`` image/label pairs drawn
    with replacement (seeded): one "epoch" is the whole fine-tuning budget, whatever N is."""
    if not items:
        raise BundleInputError("No labelled images to fine-tune on: give at least one (num_labelled >= 1).")
    data = [{"image": it["image"], "label": it["label"], "source": it.get("source", "")} for it in items]
    batch = min(int(batch_size), len(data))
    sampler = RandomSampler(data, replacement=True, num_samples=int(iterations) * batch,
                            generator=torch.Generator().manual_seed(int(seed)))
    return DataLoader(Dataset(data), batch_size=batch, sampler=sampler, num_workers=0)


def fine_tune(head: nn.Module, items: Sequence[dict], loss: nn.Module, iterations: int = 300, batch_size: int = 8,
              lr: float = 1e-4, seed: int = 0, device: torch.device | str = "cpu", amp: str | None = "auto") -> list[float]:
    """Train ``head`` for exactly ``iterations`` steps on ``items`` (sampled with replacement) with MONAI's
    ``SupervisedTrainer``, under ``amp`` as the heads' configs run it (``auto``: bf16 autocast where the device
    has bf16 arithmetic; weights and losses stay float32); returns the loss of every iteration."""
    torch.manual_seed(seed)
    loader = fixed_iteration_loader(items, iterations, batch_size, seed)
    head = head.to(device)
    trainer = SupervisedTrainer(device=torch.device(device), max_epochs=1, train_data_loader=loader,
                                network=training_network(head, amp, device),
                                optimizer=torch.optim.AdamW(head.parameters(), lr=lr), loss_function=loss,
                                decollate=False, amp=amp_enabled(amp, device), amp_kwargs=amp_kwargs(amp, device))
    losses: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].item()))
    trainer.run()
    head.eval()
    return losses
