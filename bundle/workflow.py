"""Running one training stage of the bundle: resume, progress bar, skip when its output already exists."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from ignite.engine import Events
from ignite.handlers import ProgressBar

from . import distributed
from .errors import BundleInputError
from .performance import set_threads  # noqa: F401 (the configs' bundle.workflow.set_threads)
from .validation import flag, number, optional_path  # noqa: F401 (the configs' bundle.workflow.flag)

logger = logging.getLogger(__name__)


def loss_terms(output: dict[str, Any]) -> dict[str, float]:
    """The scalar losses of an iteration output, for logs, TensorBoard and the progress bar."""
    return {k: (v.detach().item() if hasattr(v, "detach") else float(v)) for k, v in output.items() if k.endswith("loss")}


def interactive() -> bool:
    """Whether progress goes to a terminal: bars there; in a log file one line per epoch instead of thousands of
    carriage-return updates (tqdm's ``disable=None`` follows the same rule)."""
    return sys.stderr.isatty()


class EpochLossLog:
    """One log line per epoch with the mean of each loss term over its iterations (what a progress bar shows, for
    logs that are files)."""

    def __init__(self, name: str) -> None:
        self.name, self.sums, self.count, self.started = name, {}, 0, time.perf_counter()

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.add)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.log)

    def reset(self, engine: Any) -> None:
        self.sums, self.count, self.started = {}, 0, time.perf_counter()

    def add(self, engine: Any) -> None:
        for key, value in loss_terms(engine.state.output).items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def log(self, engine: Any) -> None:
        means = ", ".join(f"{k} {v / max(self.count, 1):.4g}" for k, v in self.sums.items())
        logger.info("%s epoch %d/%d: %d iterations in %.1f s, mean %s.", self.name, engine.state.epoch,
                    engine.state.max_epochs, self.count, time.perf_counter() - self.started, means or "no loss")


class TimeBudget:
    """Fits training into ``seconds`` of this run (``None`` = no limit).

    After each epoch it plans how many more epochs fit in what is left of the budget (at the slower of the mean
    and the last epoch time of this run) and lowers ``engine.state.max_epochs`` to that, so the stage ends on time and schedules
    that read ``max_epochs`` (DINO's cosine schedules) run to their end. Attach it after the checkpoint saver:
    the last epoch is saved first, the stage then exports its model as usual, and a later run with the model
    deleted continues from that epoch (with the configured ``max_epochs`` again).
    """

    def __init__(self, seconds: float | str | None = None) -> None:
        value = optional_path(seconds)
        self.seconds = None if value is None else number("max_seconds", value, float, 0, "600, or null", strictly=True)
        self.start = self.last = 0.0
        self.start_epoch = 0

    def attach(self, engine: Any) -> None:
        if self.seconds is None:
            return
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._plan)

    def _started(self, engine: Any) -> None:
        self.start = self.last = time.monotonic()
        self.start_epoch = engine.state.epoch

    def _plan(self, engine: Any) -> None:
        now = time.monotonic()
        elapsed, last_epoch, self.last = now - self.start, now - self.last, now
        # the slower of the mean and the last epoch: epochs get slower when a loss term starts (the autoencoder's
        # discriminator after its warm-up), and planning on the mean alone then overshoots the budget
        per_epoch = max(elapsed / max(1, engine.state.epoch - self.start_epoch), last_epoch)
        fits = engine.state.epoch + int(max(0.0, self.seconds - elapsed) // per_epoch)
        fits = distributed.from_main(fits)  # every process stops at the same epoch
        if fits < engine.state.max_epochs:
            logger.info("Time budget of %.0f s: %.1f s per epoch, so training ends after epoch %d of %d.",
                        self.seconds, per_epoch, fits, engine.state.max_epochs)
            engine.state.max_epochs = fits


class EpochSnapshots:
    """Every ``every`` epochs, ``save(path)`` a complete model file to ``<folder>/<name>_epoch<NNNN>.pt``.

    Checkpoints keep only the newest epoch; snapshots stay, so that a long run can be evaluated along the way
    (quality against training compute) with the same loaders as the final model. ``every`` None or 0: off.
    """

    def __init__(self, folder: str | os.PathLike, save: Callable[[Path], None], name: str,
                 every: int | str | None = None) -> None:
        value = optional_path(every)
        self.every = 0 if value is None else number("snapshot_every", value, int, 0, "10, or 0 for none")
        self.folder, self.save, self.name = Path(folder), save, name

    def attach(self, engine: Any) -> None:
        if self.every:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.every), self)

    def __call__(self, engine: Any) -> None:
        path = self.folder / f"{self.name}_epoch{engine.state.epoch:04d}.pt"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.save(path)
        logger.info("%s snapshot of epoch %d written to %s.", self.name, engine.state.epoch, path)


def load_profile(bundle_root: str | os.PathLike, name: str, device: Any = "cpu") -> dict[str, Any]:
    """The settings of ``configs/profiles/<name>.json``; ``auto`` picks ``gpu128`` with a GPU, else ``cpu64``."""
    folder = Path(str(bundle_root)) / "configs" / "profiles"
    chosen = str(name)
    if chosen == "auto":
        chosen = "gpu128" if torch.device(device).type == "cuda" else "cpu64"
    path = folder / f"{chosen}.json"
    if not path.is_file():
        names = sorted(p.stem for p in folder.glob("*.json"))
        raise BundleInputError(f"profile '{name}' is not one of {names + ['auto']}: choose one of those, or add "
                               f"{path} with the same keys.")
    with open(path) as f:
        settings = _Profile(json.load(f))
    settings.path = str(path)
    logger.info("Profile %s (%s)%s: image size %s, DINO %s.", chosen, path, " chosen for this device"
                if str(name) == "auto" else "", settings.get("image_size"), settings.get("dino_model"))
    return settings


class _Profile(dict):
    """A profile's settings; a key the profile lacks stops with one sentence instead of a KeyError."""

    path = ""

    def __missing__(self, key: str) -> Any:
        raise BundleInputError(f"The profile '{self.path}' does not set '{key}': add it (every profile sets every "
                               "setting that train.json takes from a profile).")


# Shares of a run's time budget, with and without in-domain DINO pre-training first; the rest is for preprocessing,
# the latent cache and the closing report. With DINO, measured on the
# bundled images (docs/results/first_run.md): in the last quarter of each stage the DINO loss had stopped moving
# (6.95 -> 6.94) and the autoencoder's reconstruction loss was flat (0.040-0.043), while the diffusion UNet's FD in
# pixels still fell (13.7 -> 12.8), so the UNet has half of the time.
STAGE_SHARES = {True: {"dino": 0.15, "autoencoder": 0.25, "diffusion": 0.5}, False: {"autoencoder": 0.35, "diffusion": 0.55}}


def stage_seconds(minutes: float | str | None, stage: str, pretrain_dino: bool = False) -> float | None:
    """A stage's share of a whole run's ``time_budget_minutes`` (``None`` = no budget)."""
    value = optional_path(minutes)
    if value is None:
        return None
    total = 60 * number("time_budget_minutes", value, float, 0, "25, or null", strictly=True)
    return total * STAGE_SHARES[bool(pretrain_dino)][stage]


def stage_handlers(name: str, checkpoint_dir: str | os.PathLike, state: dict[str, Any], writer: Any,
                   max_seconds: float | str | None = None, extra: Sequence[Any] = (),
                   output_transform: Callable[[Any], dict[str, float]] = loss_terms) -> list[Any]:
    """The handlers every training stage has, in the order they must run.

    Resume from the newest readable checkpoint in ``checkpoint_dir`` when there is one (model, optimisers,
    trainer state: everything in ``state``), stop at a non-finite loss, save ``state`` there atomically after
    every epoch (keeping the newest), log the epoch loss and every
    iteration's loss terms to TensorBoard, then the stage's ``extra`` handlers, then the time budget (last, so
    the epoch it stops at has been saved).
    """
    from monai.handlers import TensorBoardStatsHandler

    from .checkpoints import AtomicCheckpointSaver, NonFiniteLossGuard, ResumeFromCheckpoint

    from ignite.handlers import EMAHandler

    if not distributed.is_main():  # the other processes of a multi-GPU run: train, resume, keep EMA weights; no output
        return [ResumeFromCheckpoint(checkpoint_dir, state, prefix=name), NonFiniteLossGuard(name),
                *[h for h in extra if isinstance(h, EMAHandler)], TimeBudget(max_seconds)]
    handlers: list[Any] = [
        ResumeFromCheckpoint(checkpoint_dir, state, prefix=name),
        NonFiniteLossGuard(name),
        AtomicCheckpointSaver(checkpoint_dir, state, prefix=name),
        TensorBoardStatsHandler(summary_writer=writer, output_transform=output_transform),
        *[h for h in extra if h is not None],
        TimeBudget(max_seconds),
    ]
    return handlers


def preflight(datalist: Sequence[dict[str, Any]], dino_plan: Any, dino_model: str, dino_kwargs: dict | None = None,
              perceptual_weight: float = 0.0, perceptual_weights: str | None = None,
              work_dir: str | os.PathLike | None = None, image_sizes: Sequence[int] = (),
              networks: Sequence[Callable[[], torch.nn.Module]] = ()) -> None:
    """Check what later stages need from outside before the first one starts, so nothing fails hours in.

    The datalist has been read by now (it is an argument); the DINO plan is said in one line and hub weights are
    fetched into the local cache now; a local file must exist; a perceptual loss needs its weights file; and the
    work dir must have room for the image caches and the checkpoints of ``networks`` (factories).
    """
    if not datalist:
        raise BundleInputError("The training datalist is empty: pass --dataset_dir with images.")
    logger.info("%s", dino_plan.reason)
    weights = str(dino_plan.weights)
    if not dino_plan.pretrain:
        if weights == "hub":
            from .dino import DinoFeatures

            DinoFeatures(dino_model, "hub", model_kwargs=dino_kwargs)
        elif weights != "random" and not os.path.isfile(weights):
            raise BundleInputError(f"dino_weights '{weights}' is not a file: give a local timm weights file, 'auto', "
                                   "'hub', 'pretrain' (train one on these images first) or 'random' (tests only).")
    if float(perceptual_weight) > 0 and perceptual_weights is not None and not os.path.isfile(str(perceptual_weights)):
        raise BundleInputError(f"perceptual_weights '{perceptual_weights}' is not a file: give the ResNet-50 weights "
                               "file, or --perceptual_weights null to download them, or --perceptual_weight 0.")
    if work_dir is not None:
        # float32 bytes per parameter: a checkpoint holds weights, two optimiser moments and EMA (4 copies), two
        # checkpoints exist for a moment while one replaces the other, and the exported model is one more copy
        parameters = sum(p.numel() for factory in networks for p in factory().parameters())
        need = 4 * (2 * 4 + 1) * parameters
        need += sum(len(datalist) * 4 * int(size) ** 2 for size in image_sizes)
        Path(str(work_dir)).mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(str(work_dir)).free
        if free < need:
            raise BundleInputError(f"work_dir '{work_dir}' has {free / 1e9:.2f} GB free, and this run needs about "
                                   f"{need / 1e9:.2f} GB for caches and checkpoints: free some space or choose another "
                                   "--work_dir.")
        logger.info("Preflight: %d images, about %.2f GB needed in %s (%.0f GB free).", len(datalist), need / 1e9,
                    work_dir, free / 1e9)


def train_stage(
    name: str,
    trainer: Any,
    handlers: Sequence[Any],
    output_path: str | os.PathLike,
    export: Callable[[], Any],
    record: dict[str, Any] | None = None,
) -> None:
    """Attach ``handlers`` and run ``trainer``, then ``export()`` the stage's output to ``output_path``.

    A stage whose output already exists is skipped when it was trained with the same settings (its ``record``),
    so re-running the whole pipeline only does what is missing; with other settings the run stops and says
    which, rather than reuse a model silently. A stage interrupted part-way resumes from its last epoch
    checkpoint. Delete ``output_path`` to train the stage again (with a larger max_epochs it continues).
    """
    if os.path.exists(output_path):
        if record is not None:
            from .models import read_record, record_differences

            stored = read_record(output_path, name, "delete it to train it again")["record"]
            diffs = record_differences(stored, record)
            if diffs:
                raise BundleInputError(
                    f"The finished {name} model '{output_path}' was trained with other settings ({'; '.join(diffs[:4])}"
                    f"{'; ...' if len(diffs) > 4 else ''}): delete it (and its checkpoints) or choose another --work_dir "
                    "to train anew, or drop the changed settings to use it."
                )
        logger.info("%s: %s exists and matches these settings: reusing it (delete it to train again).", name, output_path)
        return
    for handler in handlers:
        if handler is not None:
            handler.attach(trainer)
    # Ignite announces "resuming from epoch 0" before the checkpoint loader has run: say where it really starts
    trainer.add_event_handler(Events.STARTED, lambda engine: engine.state.epoch and logger.info(
        "%s: resumed from the checkpoint of epoch %d (iteration %d).", name, engine.state.epoch, engine.state.iteration))
    trainer.add_event_handler(Events.STARTED, lambda engine: logger.info(
        "%s: training from epoch %d to %d.", name, engine.state.epoch + 1, engine.state.max_epochs))
    # the bundle's own lines say when a stage starts, each epoch's losses and time, and when it ends: the engine's
    # per-epoch notes ("Epoch[n] Complete", "Got new best metric") would only repeat them
    trainer.logger.setLevel(logging.WARNING)
    if distributed.is_main():
        if interactive():
            ProgressBar(persist=True, desc=name).attach(trainer, output_transform=loss_terms)
        else:
            EpochLossLog(name).attach(trainer)
    trainer.run()
    if distributed.is_main():  # one process writes the model; the others wait for it before the next stage reads it
        export()
        logger.info("%s: done, wrote %s.", name, output_path)
    distributed.barrier()


def run_config(config_file: str | os.PathLike, run_id: str, **overrides: Any) -> None:
    """Run another of the bundle's configs in this process, as `python -m monai.bundle run` would."""
    from .cli import config_workflow

    config_workflow(str(config_file), run_id, **overrides).run()
