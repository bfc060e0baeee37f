"""Model files on disk, in MONAI's format: the weights as a plain ``state_dict`` (``models/model.pt``), and beside
them the JSON record of the settings they need (``models/model.json``) naming the weights' SHA-256.

The record sits beside the weights rather than inside the file because MONAI's loaders are strict: any extra key in
the file stops ``CheckpointLoader`` and reads as an unexpected weight. Paths inside a record are relative to the work
dir that holds ``models/`` (a copied work dir or zoo bundle finds its own files). Files of earlier versions (one file
holding ``state_dict`` and ``record``) are converted in place the first time they are read, with one log line.
This module depends on no network code, so every module that writes a model can use it; ``bundle.models`` builds
networks and generators from what it reads.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from .errors import BundleInputError
from .io import atomic_torch_save, atomic_write_json

logger = logging.getLogger("bundle.models")  # one logger name for everything about model files


def record_file(path: str | os.PathLike) -> Path:
    """The JSON record beside a model's weights file (``models/model.pt`` -> ``models/model.json``)."""
    return Path(path).with_suffix(".json")


def owner_folder(path: str | os.PathLike) -> Path:
    """The work dir (or zoo bundle) a model file belongs to: the folder holding its ``models/`` ancestor, else the
    file's own folder. Paths in records are relative to it."""
    folder = Path(os.path.abspath(path)).parent
    return next((q.parent for q in (folder, *folder.parents) if q.name == "models"), folder)


SPECIAL_WEIGHTS = ("hub", "random")


def portable_path(path: str | os.PathLike | None, model_file: str | os.PathLike) -> str | None:
    """``path`` as a record stores it: relative to the owner folder of ``model_file`` when it lies inside it (so
    the work dir can be copied anywhere), else absolute; ``None``, ``hub`` and ``random`` stay as they are."""
    if path is None or str(path).strip().lower() in ("", "null", "none"):
        return None
    if str(path) in SPECIAL_WEIGHTS:
        return str(path)
    absolute = Path(os.path.abspath(path))
    relative = os.path.relpath(absolute, owner_folder(model_file))
    return str(absolute) if relative.startswith("..") else Path(relative).as_posix()


def recorded_path(path: str | None, model_file: str | os.PathLike) -> str | None:
    """A path read from the record of ``model_file``, resolved against that model's owner folder."""
    if path is None or str(path) in SPECIAL_WEIGHTS or os.path.isabs(path):
        return path
    return str(owner_folder(model_file) / path)


def save_model(state_dict: Mapping[str, torch.Tensor], record: Mapping[str, Any], path: str | os.PathLike,
               **outputs: Any) -> None:
    """Write ``state_dict`` to ``path`` (a plain state dict, MONAI's format) and its record beside it.

    ``outputs`` are values training produced that are not settings (the latent scale factor, whether the weights
    are the EMA copy): stored in the record file, not compared when a finished stage is reused. The record is
    written first and names the weights' SHA-256, so a kill between the two writes leaves weights that are either
    absent (the stage runs again) or refused with a message, never described by another model's record.
    """
    from .data import hash_file

    path = Path(path)
    state = {k: v.detach().cpu() for k, v in state_dict.items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.weights")  # one per process: two converting at once
    atomic_torch_save(state, tmp)
    try:
        atomic_write_json(record_file(path), {"record": dict(record), "weights": {"file": path.name,
                          "sha256": hash_file(tmp)}, **outputs})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _convert_single_file(path: Path, saved: dict[str, Any], what: str) -> None:
    """Rewrite a model file of an earlier version ({state_dict, record, ...} in one file) as weights + record."""
    from .data import hash_file

    state = dict(saved["state_dict"])
    outputs = {k: v for k, v in saved.items() if k not in ("state_dict", "record") and k not in saved["record"]}
    if "scale_factor" in state and all(k.startswith("autoencoder.") for k in state if k != "scale_factor"):
        outputs["scale_factor"] = float(state.pop("scale_factor"))  # the codec's buffer: the record keeps it
        state = {k[len("autoencoder."):]: v for k, v in state.items()}
    outputs["sha256_before_conversion"] = hash_file(path)  # what records written before the conversion name
    save_model(state, saved["record"], path, **outputs)
    logger.info("Converted the %s model '%s' from this bundle's earlier one-file format to MONAI's (weights in '%s', "
                "record in '%s').", what, path, path.name, record_file(path).name)


def read_record(path: str | os.PathLike, what: str, remedy: str) -> dict[str, Any]:
    """A model's weights and record, ``{"state_dict", "record", **outputs}``, with one clear message for each way
    the pair can fail. A file of an earlier version is converted to weights + record first."""
    from .data import hash_file

    path = Path(path)
    if not path.is_file():
        raise BundleInputError(f"The {what} model '{path}' does not exist: {remedy}.")
    if path.stat().st_size == 0:
        raise BundleInputError(f"The {what} model '{path}' is empty (an interrupted write?): delete it and {remedy}.")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise BundleInputError(f"The {what} model '{path}' is damaged or not a model file ({type(err).__name__}): "
                               f"delete it and {remedy}.") from None
    if not isinstance(saved, Mapping):
        raise BundleInputError(f"The {what} model '{path}' holds no state dict: it was not written by this bundle.")
    if "state_dict" in saved and isinstance(saved.get("record"), dict):
        _convert_single_file(path, dict(saved), what)
        return read_record(path, what, remedy)
    if "state_dict" in saved:
        raise BundleInputError(
            f"The {what} model '{path}' was saved by an earlier version of this bundle without the record of its "
            "settings: retrain it with this version (delete it, or choose another --work_dir, and run training again)."
        )
    sidecar = record_file(path)
    try:
        meta = json.loads(sidecar.read_text())
        record = meta["record"]
    except FileNotFoundError:
        raise BundleInputError(f"The {what} model '{path}' has no record beside it ('{sidecar.name}', written with "
                               "it): copy that file along with the weights, or delete both and "
                               f"{remedy}.") from None
    except (ValueError, KeyError, TypeError):
        raise BundleInputError(f"The record '{sidecar}' of the {what} model is damaged: delete it and the weights "
                               f"and {remedy}.") from None
    if meta.get("weights", {}).get("sha256") != hash_file(path):
        raise BundleInputError(f"The record '{sidecar}' describes other weights than '{path}' (the weights were "
                               f"replaced or half-written): restore the pair written together, or delete both and "
                               f"{remedy}.")
    outputs = {k: v for k, v in meta.items() if k not in ("record", "weights")}
    return {"state_dict": saved, "record": record, **outputs}


def install_model(src: str | os.PathLike, dst: str | os.PathLike, keep_previous: bool = True) -> Path | None:
    """Put the model written at ``src`` (weights + record, checked) at ``dst``; the model ``dst`` held before is
    kept beside it as ``<name>.previous.pt`` (one version), so a bad retraining can be undone by renaming it back.
    Paths in the record are rewritten relative to ``dst``'s work dir. Returns the previous model's path, if any."""
    src, dst = Path(src), Path(dst)
    saved = read_record(src, "model", "train it again")
    previous = None
    if keep_previous and dst.is_file():
        previous = dst.with_name(f"{dst.stem}.previous{dst.suffix}")
        old = read_record(dst, "model", "train it again")
        save_model(old.pop("state_dict"), old.pop("record"), previous, **old)
    record = {key: portable_path(recorded_path(value, src), dst)
              if isinstance(value, str) and os.path.isfile(recorded_path(value, src) or "") else value
              for key, value in saved.pop("record").items()}
    save_model(saved.pop("state_dict"), record, dst, **saved)
    return previous
