"""Epoch checkpoints that survive a kill at any moment: written atomically, pruned across restarts, and on
resume the newest readable one is used (an unreadable newest file is skipped with one warning).

MONAI's ``CheckpointSaver`` writes in place (``atomic=False``) after Ignite has deleted the previous file, so
a kill during the write left only a truncated checkpoint; these two handlers replace it and its loader.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from ignite.engine import Events

from .errors import BundleInputError
from .io import atomic_torch_save

logger = logging.getLogger(__name__)
EPOCH = re.compile(r"_checkpoint_epoch=(\d+)\.pt$")


def checkpoint_files(folder: str | os.PathLike, prefix: str | None = None) -> list[Path]:
    """Epoch checkpoints in ``folder`` (``<prefix>_checkpoint_epoch=<N>.pt``), oldest epoch first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := EPOCH.search(p.name)) and (prefix is None or p.name.startswith(f"{prefix}_"))]
    return [p for _, p in sorted(found)]


def _state_dicts(state: Mapping[str, Any]) -> dict[str, Any]:
    return {key: obj.state_dict() for key, obj in state.items()}


def non_finite(state: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors in the state dicts of ``state`` that hold NaN or infinity."""
    bad = []
    for key, obj in state.items():
        if isinstance(obj, torch.nn.Module):
            bad += [f"{key}.{name}" for name, t in obj.state_dict().items()
                    if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    return bad


class AtomicCheckpointSaver:
    """Save ``state`` (objects with ``state_dict``) after every epoch to ``<prefix>_checkpoint_epoch=<N>.pt``,
    atomically, then delete all but the ``n_saved`` newest epochs of the folder (older runs' files included).
    A state with non-finite weights is never saved: the stage stops with one sentence instead."""

    def __init__(self, save_dir: str | os.PathLike, state: Mapping[str, Any], prefix: str, n_saved: int = 1) -> None:
        self.save_dir, self.state, self.prefix, self.n_saved = Path(save_dir), state, prefix, max(1, int(n_saved))

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        bad = non_finite(self.state)
        if bad:
            raise BundleInputError(
                f"{self.prefix}: the weights became non-finite by epoch {engine.state.epoch} ({bad[0]}"
                f"{' and more' if len(bad) > 1 else ''}); nothing was saved for this epoch: check the images for "
                "NaN values and lower the learning rate, then run the same command to resume from the last good epoch."
            )
        path = self.save_dir / f"{self.prefix}_checkpoint_epoch={engine.state.epoch}.pt"
        atomic_torch_save(_state_dicts(self.state), path)
        for old in checkpoint_files(self.save_dir, self.prefix)[:-self.n_saved]:
            if old != path:
                old.unlink(missing_ok=True)


class ResumeFromCheckpoint:
    """On start, load the newest readable checkpoint of ``folder`` into ``state`` (weights-only).

    An unreadable file (truncated, empty, not a checkpoint) is skipped with one warning naming it, and the
    previous one is tried; a readable checkpoint that does not fit the networks stops with one sentence naming
    the first key that differs. The configured ``max_epochs`` is kept (the checkpoint's may be smaller)."""

    def __init__(self, folder: str | os.PathLike, state: Mapping[str, Any], prefix: str | None = None) -> None:
        self.folder, self.state, self.prefix = Path(folder), state, prefix
        self.loaded: Path | None = None

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Any) -> None:
        from ignite.handlers import Checkpoint

        for path in reversed(checkpoint_files(self.folder, self.prefix)):
            try:
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
                if not isinstance(checkpoint, dict) or not set(self.state) <= set(checkpoint):
                    raise ValueError(f"holds {sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint)}"
                                     f", not {sorted(self.state)}")
            except Exception as err:
                logger.warning("Skipping checkpoint %s: it cannot be read (%s: %s); trying the one before it.", path,
                               type(err).__name__, str(err).strip().splitlines()[0] if str(err).strip() else "empty")
                continue
            prior_max_epochs = engine.state.max_epochs
            try:
                Checkpoint.load_objects(to_load=self.state, checkpoint=checkpoint)
            except (RuntimeError, KeyError, ValueError) as err:
                lines = [line.strip() for line in str(err).splitlines() if line.strip()]
                # torch's first line only names the module class; the next one names the key that differs
                detail = next((line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))),
                              lines[0] if lines else type(err).__name__)
                raise BundleInputError(
                    f"Checkpoint '{path}' does not fit this stage's networks ({detail[:300]}): it was written with "
                    f"other settings; delete {self.folder} to start the stage over, or run with the settings it was "
                    "written with."
                ) from None
            if prior_max_epochs is not None:
                if engine.state.epoch > prior_max_epochs:
                    raise BundleInputError(
                        f"Checkpoint '{path}' is at epoch {engine.state.epoch}, beyond the {prior_max_epochs} epochs "
                        "asked for: give more epochs, or delete the checkpoints to train anew."
                    )
                engine.state.max_epochs = prior_max_epochs
            self.loaded = path
            return
        if checkpoint_files(self.folder, self.prefix):
            logger.warning("No readable checkpoint in %s: the stage starts from its first epoch.", self.folder)


class NonFiniteLossGuard:
    """Stop a stage at the first iteration whose loss is NaN or infinite, naming the stage, the iteration and
    the batch's source files (where the batch carries them), before anything of it is saved. ``resumable``: the
    stage keeps epoch checkpoints (the generator's stages), so the same command goes on from the last good one;
    otherwise (a head's single run) it starts again."""

    def __init__(self, name: str, resumable: bool = True) -> None:
        self.name, self.resumable = name, bool(resumable)

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        output = engine.state.output
        loss = output.get("loss") if isinstance(output, dict) else output
        try:
            value = float(loss.detach() if isinstance(loss, torch.Tensor) else loss)
        except (TypeError, ValueError, RuntimeError):
            return
        if math.isfinite(value):
            return
        batch = engine.state.batch
        sources = batch.get("source") if isinstance(batch, dict) else None
        files = f" (batch files: {', '.join(map(str, list(sources)[:4]))}{', ...' if len(sources) > 4 else ''})" if sources else ""
        raise BundleInputError(
            f"{self.name}: the loss is {value} at iteration {engine.state.iteration}, epoch {engine.state.epoch}{files}; "
            "nothing of this epoch was saved: check those images for NaN or constant values and lower the learning "
            "rate, then run the same command " + ("to resume from the last good epoch." if self.resumable else "again.")
        )
