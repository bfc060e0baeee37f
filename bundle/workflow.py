"""Running one training stage of the bundle: resume, progress bar, skip when its output already exists."""

from __future__ import annotations

import glob
import logging
import os
from typing import Any, Callable, Sequence

from ignite.handlers import ProgressBar

from .errors import BundleInputError

logger = logging.getLogger(__name__)


def latest_checkpoint(folder: str | os.PathLike) -> str | None:
    """The most recent ``*.pt`` checkpoint in ``folder`` (by modification time), or ``None``."""
    files = glob.glob(os.path.join(str(folder), "*.pt"))
    return max(files, key=os.path.getmtime) if files else None


def flag(value: Any) -> bool:
    """A yes/no setting as configs and the command line give it (``true``/``false``, ``yes``/``no``, ``1``/``0``).

    The command line passes ``--use_ema false`` as the string "false", which Python would take as true.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1", "1.0"):
        return True
    if text in ("false", "no", "off", "0", "0.0", "none", "null", ""):
        return False
    raise BundleInputError(f"'{value}' is not a yes/no value: use true or false.")


def optional_path(value: Any) -> str | None:
    """A path setting that may be switched off: ``None``, or the command line's ``null``/``none``/empty string."""
    if value is None or str(value).strip().lower() in ("", "none", "null"):
        return None
    return str(value)


def loss_terms(output: dict[str, Any]) -> dict[str, float]:
    """The scalar losses of an iteration output, for logs, TensorBoard and the progress bar."""
    return {k: (v.detach().item() if hasattr(v, "detach") else float(v)) for k, v in output.items() if k.endswith("loss")}


def train_stage(
    name: str,
    trainer: Any,
    handlers: Sequence[Any],
    output_path: str | os.PathLike,
    export: Callable[[], Any],
) -> None:
    """Attach ``handlers`` and run ``trainer``, then ``export()`` the stage's output to ``output_path``.

    A stage whose output already exists is skipped, so re-running the whole pipeline only does what is
    missing; a stage interrupted part-way resumes from its last epoch checkpoint (its CheckpointLoader).
    Delete ``output_path`` to train the stage again (with a larger max_epochs it continues from there).
    """
    if os.path.exists(output_path):
        logger.info("%s: %s exists, skipping this stage (delete it to train the stage again).", name, output_path)
        return
    for handler in handlers:
        if handler is not None:
            handler.attach(trainer)
    ProgressBar(persist=True, desc=name).attach(trainer, output_transform=loss_terms)
    trainer.run()
    export()
    logger.info("%s: done, wrote %s.", name, output_path)


def run_config(config_file: str | os.PathLike, run_id: str, **overrides: Any) -> None:
    """Run another of the bundle's configs in this process, as `python -m monai.bundle run` would."""
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(config_file=str(config_file), workflow_type=None, run_id=run_id, logging_file=False,
                              **overrides)
    workflow.initialize()
    workflow.run()
