"""Fine-tuning a head: labelled datalist rows into dataset items, and a fixed budget of training steps
whatever the number of labelled images."""

from __future__ import annotations

import os
from pathlib import Path
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


def fixed_iteration_loader(items: Sequence[dict], iterations: int, batch_size: int = 8, seed: int = 0,
                           skip: int = 0) -> DataLoader:
    """A loader of exactly ``iterations`` batches of ``min(batch_size, len(items))`` image/label pairs drawn
    with replacement (seeded): one "epoch" is the whole fine-tuning budget, whatever N is. ``skip`` leaves out the
    first batches of that same draw (a resumed fine-tune sees the batches it would have seen)."""
    if not items:
        raise BundleInputError("No labelled images to fine-tune on: give at least one (num_labelled >= 1).")
    data = [{"image": it["image"], "label": it["label"], "source": it.get("source", "")} for it in items]
    batch = min(int(batch_size), len(data))
    sampler = RandomSampler(data, replacement=True, num_samples=int(iterations) * batch,
                            generator=torch.Generator().manual_seed(int(seed)))
    if skip:
        sampler = list(sampler)[int(skip) * batch:]
    return DataLoader(Dataset(data), batch_size=batch, sampler=sampler, num_workers=0)


def fine_tune(head: nn.Module, items: Sequence[dict], loss: nn.Module, iterations: int = 300, batch_size: int = 8,
              lr: float = 1e-4, seed: int = 0, device: torch.device | str = "cpu", amp: str | None = "auto",
              checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 25) -> list[float]:
    """Train ``head`` for exactly ``iterations`` steps on ``items`` (sampled with replacement) with MONAI's
    ``SupervisedTrainer``, under ``amp`` as the heads' configs run it (``auto``: bf16 autocast where the device
    has bf16 arithmetic; weights and losses stay float32); returns the loss of every iteration.

    With ``checkpoint`` (a file path), the head, the optimiser and the losses so far are written there every
    ``checkpoint_every`` iterations and at the end, and a fine-tune that finds the file goes on from it with the
    batches it had not yet seen: an interrupted run resumes instead of starting again. The file names the
    settings it was written with; other settings are refused. The caller deletes it once the head is kept."""
    torch.manual_seed(seed)
    head = head.to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr)
    settings = {"iterations": int(iterations), "batch_size": int(batch_size), "lr": float(lr), "seed": int(seed),
                "amp": str(amp), "images": [str(it.get("source", "")) for it in items]}
    losses: list[float] = []
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        if state.get("settings") != settings:
            raise BundleInputError(f"Fine-tuning checkpoint '{checkpoint}' was written with other settings or "
                                   "images: delete it to start this fine-tune again.")
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        losses = [float(v) for v in state["losses"]]

    def save(engine=None) -> None:
        tmp = checkpoint.with_name(checkpoint.name + ".tmp")
        torch.save({"settings": settings, "head": head.state_dict(), "optimizer": optimizer.state_dict(),
                    "losses": losses}, tmp)
        os.replace(tmp, checkpoint)  # whole or absent, never half-written

    if len(losses) < int(iterations):
        loader = fixed_iteration_loader(items, iterations, batch_size, seed, skip=len(losses))
        trainer = SupervisedTrainer(device=torch.device(device), max_epochs=1, train_data_loader=loader,
                                    network=training_network(head, amp, device), optimizer=optimizer,
                                    loss_function=loss, decollate=False, amp=amp_enabled(amp, device),
                                    amp_kwargs=amp_kwargs(amp, device))
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].item()))
        if checkpoint is not None:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            trainer.add_event_handler(Events.ITERATION_COMPLETED(every=max(1, int(checkpoint_every))), save)
            trainer.add_event_handler(Events.COMPLETED, save)
        trainer.run()
    head.eval()
    return losses
