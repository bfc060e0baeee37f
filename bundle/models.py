"""Self-describing models: networks, the generator and the heads' starting points rebuilt from the records
written beside their weights (``bundle.model_files``: a plain state dict in MONAI's format, ``models/model.json``
beside ``models/model.pt``). The record holds the network's factory and arguments, image size and modality, and for
the diffusion model its noise schedule, its DINO condition and the autoencoder it was trained on. Sampling,
evaluation, heads and export rebuild everything from it, so a trained work dir needs no network settings on the
command line, and a setting that contradicts the record is refused.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from pydoc import locate
from torch import nn

from .errors import BundleInputError
from .model_files import owner_folder, read_record, record_file, recorded_path

# The diffusion UNet is the primary network (models/model.pt, the Model Zoo's name); the autoencoder is named as the
# zoo's latent diffusion bundles name theirs.
MODEL_FILES = {
    "autoencoder": "models/model_autoencoder.pt",
    "diffusion": "models/model.pt",
    "dino": "models/dino/teacher.safetensors",
    "denoiser": "models/heads/denoiser.pt",
    "landmarks": "models/heads/landmarks.pt",
    "segmentation": "models/heads/segmentation.pt",
}


# Names of bundle versions before 0.4.0: a work dir that has a model under its old name keeps using it.
LEGACY_MODEL_FILES = {"autoencoder": "models/autoencoder.pt", "diffusion": "models/diffusion.pt"}


def model_path(work_dir: str | os.PathLike, name: str) -> str:
    """Where the model ``name`` lives in ``work_dir`` (the one definition of every model file name). A work dir
    trained by an earlier version keeps its file where it is (read and written under the old name)."""
    if name not in MODEL_FILES:
        raise BundleInputError(f"'{name}' is not a model of this bundle: choose from {sorted(MODEL_FILES)}.")
    path = Path(work_dir) / MODEL_FILES[name]
    legacy = Path(work_dir) / LEGACY_MODEL_FILES.get(name, MODEL_FILES[name])
    return str(legacy if legacy.is_file() and not path.is_file() else path)


def network_record(factory: functools.partial) -> dict[str, Any]:
    """The ``{"_target_": ..., **arguments}`` of a network factory (a config entry with ``"_mode_": "callable"``)."""
    if not isinstance(factory, functools.partial):
        raise TypeError(f"network_record needs a functools.partial (a config entry with _mode_ callable), got {factory!r}.")
    func = factory.func
    return {"_target_": f"{func.__module__}.{func.__qualname__}", **factory.keywords}


def build_network(record: Mapping[str, Any], **runtime: Any) -> nn.Module:
    """Instantiate the network a :func:`network_record` describes. ``runtime`` settings that change how it computes
    but not its weights (e.g. ``use_flash_attention``: PyTorch's fused attention in MONAI's diffusion UNet) override
    the record where the network takes them and are ignored where it does not."""
    args = dict(record)
    target = locate(str(args.pop("_target_")))
    if not callable(target):
        raise BundleInputError(f"The network '{record['_target_']}' recorded in a model file cannot be imported here: "
                               "install the packages the model was trained with.")
    accepted = inspect.signature(target).parameters
    args.update({k: v for k, v in runtime.items() if k in accepted})
    return target(**args)


def recorded_network(path: str | os.PathLike, what: str = "diffusion") -> nn.Module:
    """The untrained network a model file's record describes (the bundle's ``network_def`` for MONAI's tools,
    which then load the weights themselves)."""
    sidecar = record_file(path)
    if not sidecar.is_file():
        read_record(path, what, "train it first")  # converts a file of an earlier version, or says what is wrong
    return build_network(json.loads(sidecar.read_text())["record"]["network"])


def load_weights(module: nn.Module, path: str | os.PathLike, what: str, remedy: str,
                 saved: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a model file's weights into ``module`` with one clear message for a mismatch (it stays trainable:
    heads fine-tune the denoiser they load).

    ``saved`` is the file already read by :func:`read_record`, so a caller that needed the record reads it once.
    """
    saved = saved if saved is not None else read_record(path, what, remedy)
    try:
        module.load_state_dict(saved["state_dict"])
    except RuntimeError as err:
        detail = (str(err).strip().splitlines() or ["no detail"])[0]
        raise BundleInputError(f"The {what} model '{path}' does not fit the network its record describes ({detail}): "
                               f"delete it and {remedy}.") from None
    return saved


def load_network(path: str | os.PathLike, what: str, remedy: str) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a network from its file's record, load its weights, and return it frozen with the whole file."""
    saved = read_record(path, what, remedy)
    network = build_network(saved["record"]["network"])
    load_weights(network, path, what, remedy, saved)
    network.requires_grad_(False)
    return network.eval(), saved


def _same(stored: Any, requested: Any) -> bool:
    if isinstance(stored, (list, tuple)) and isinstance(requested, (list, tuple)):
        return len(stored) == len(requested) and all(_same(a, b) for a, b in zip(stored, requested))
    if isinstance(stored, (int, float)) and isinstance(requested, (int, float)) and not isinstance(requested, bool):
        return float(stored) == float(requested)
    return str(stored) == str(requested)


def check_requested(values: Mapping[str, Any], requested: Mapping[str, Any], path: str | os.PathLike, what: str) -> None:
    """Refuse a command-line setting that contradicts the model's record (``None``/``null`` means "the model's")."""
    for key, value in requested.items():
        if value is None or str(value).strip().lower() in ("", "null", "none"):
            continue
        if key in values and not _same(values[key], value):
            raise BundleInputError(
                f"--{key} {value} contradicts the {what} model '{path}', which was trained with {key} {values[key]}: "
                f"leave --{key} out (the model's own value is used) or train a new model with it."
            )


def record_differences(stored: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The settings (dotted keys) whose values differ between two records, for a one-line message."""
    keys = sorted(set(stored) | set(current))
    diffs = []
    for key in keys:
        a, b = stored.get(key), current.get(key)
        if a in (None, {}) and b in (None, {}):  # a setting added later, left empty: models without it match
            continue
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            diffs += record_differences(a, b, f"{prefix}{key}.")
        elif not _same(a, b):
            diffs.append(f"{prefix}{key} {a} -> {b}")
    return diffs


def dino_from_record(record: Mapping[str, Any], diffusion_path: str | os.PathLike, requested: Mapping[str, Any]) -> nn.Module:
    """The DINO extractor a diffusion model was conditioned on, checked against its fingerprint.

    The weights file is the record's path, relative to the diffusion model's work dir; a record of an earlier
    version holds an absolute path, and the file of that name beside the models comes first (a copied work dir
    uses its own copy, not the original's).
    """
    from .dino import DinoFeatures

    check_requested({"dino_model": record["model_name"], "dino_tokens": record["tokens"],
                     "dino_input_size": record["input_size"]}, requested, diffusion_path, "diffusion")
    weights = str(requested.get("dino_weights") or recorded_path(record["weights"], diffusion_path))
    if not requested.get("dino_weights") and os.path.isabs(str(record["weights"])):
        beside = owner_folder(diffusion_path) / Path(MODEL_FILES["dino"]).parent / Path(weights).name
        if beside.is_file():
            weights = str(beside)
    dino = DinoFeatures(record["model_name"], weights, record["tokens"], record["input_size"],
                        record.get("model_kwargs") or {}, record.get("seed", 0))
    if dino.fingerprint() != record["fingerprint"]:
        raise BundleInputError(
            f"The DINO weights '{weights}' are not the ones the diffusion model '{diffusion_path}' was trained with "
            f"({record['weights']}): pass --dino_weights with that file."
        )
    return dino


@dataclass
class Generator:
    """A trained generator rebuilt from its two model files: what sampling and evaluation need."""

    codec: nn.Module
    unet: nn.Module
    dino: nn.Module
    record: dict[str, Any]
    bundle_root: str
    autoencoder_path: str = ""  # the autoencoder's file, which caches of its latents are keyed on

    @property
    def image_size(self) -> int:
        return int(self.record["image_size"])

    @property
    def modality(self) -> str:
        return str(self.record["modality"])

    @property
    def context_dim(self) -> int:
        """The width of the UNet's context tokens (the DINO embedding's, and a concept's)."""
        return int(self.record["network"]["cross_attention_dim"])

    @property
    def latent_shape(self) -> list[int]:
        return list(self.record["latent_shape"])

    @property
    def modality_file(self) -> Path:
        return Path(self.bundle_root) / "configs" / "modality" / f"{self.modality}.json"

    @property
    def modality_settings(self) -> dict[str, Any]:
        """What the training run changed in its modality config (e.g. a CT window); empty when nothing."""
        return dict(self.record.get("modality_settings") or {})

    @property
    def preprocessing(self):
        from .data import modality_preprocessing

        return modality_preprocessing(self.modality_file, image_size=self.image_size, **self.modality_settings)

    @property
    def output_preprocessing(self):
        """How this generator's own outputs (PNG/NIfTI/DICOM in [0, 1]) are read back: the modality's preprocessing
        for 2D modalities; for volume modalities, whose preprocessing reads volumes, the outputs' grey values
        brought to [0, 1] by their storage range and resized to the image size."""
        from .data import modality_parser, output_preprocessing

        if "slices" not in modality_parser(self.modality_file).get("", {}):
            return self.preprocessing
        return output_preprocessing(self.image_size)

    def datalist(self, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """``rows`` as this generator's modality takes them (volumes cut into slice rows, 2D images as they are)."""
        from .data import modality_datalist

        return modality_datalist(rows, self.modality_file, **self.modality_settings)

    def sampler(self, name: str):
        from .diffusion import make_sampler

        return make_sampler(name, **self.record["noise_schedule"])

    def to(self, device: torch.device | str) -> Generator:
        self.codec.to(device), self.unet.to(device), self.dino.to(device)
        return self


def load_codec(path: str | os.PathLike) -> nn.Module:
    """The autoencoder (with its latent scale factor) rebuilt from its file, which is read once."""
    from .autoencoder import LatentCodec

    remedy = "train it (run ID train_autoencoder)"
    saved = read_record(path, "autoencoder", remedy)
    codec = LatentCodec(build_network(saved["record"]["network"]))
    load_weights(codec.autoencoder, path, "autoencoder", remedy, saved)
    if not isinstance(saved.get("scale_factor"), (int, float)):
        raise BundleInputError(f"The record '{record_file(path)}' of the autoencoder has no latent scale_factor: "
                               f"delete both files and {remedy}.")
    codec.scale_factor.fill_(float(saved["scale_factor"]))
    codec.requires_grad_(False)
    return codec.eval()


def load_generator(autoencoder_path: str | os.PathLike, diffusion_path: str | os.PathLike,
                   requested: Mapping[str, Any] | None = None, bundle_root: str | os.PathLike = ".",
                   device: torch.device | str = "cpu") -> Generator:
    """Autoencoder + diffusion UNet + DINO from a trained work dir, checked against each other and ``requested``.

    ``requested`` holds the command line's values of recorded settings (``image_size``, ``prediction_type``,
    ``dino_weights``, ...); ``None`` entries take the model's value, any other that differs is refused.
    """

    requested = dict(requested or {})
    unet, saved = load_network(diffusion_path, "diffusion", "train it (run ID train_diffusion)")
    record = saved["record"]
    schedule = record["noise_schedule"]
    check_requested({"image_size": record["image_size"], "modality": record["modality"],
                     "prediction_type": schedule["prediction_type"], "noise_schedule": schedule["schedule"],
                     "num_train_timesteps": schedule["num_train_timesteps"]},
                    {k: v for k, v in requested.items() if not k.startswith("dino_")}, diffusion_path, "diffusion")
    codec = load_codec(autoencoder_path)  # first: a damaged file is said to be damaged, not to be another model
    # load_codec checked the file against its record's SHA-256: use it rather than hash the file again
    meta = json.loads(record_file(autoencoder_path).read_text())
    if record["autoencoder_sha256"] not in (meta["weights"]["sha256"], meta.get("sha256_before_conversion")):
        raise BundleInputError(
            f"The autoencoder '{autoencoder_path}' is not the one the diffusion model '{diffusion_path}' was trained "
            "on: pass --autoencoder_path to that autoencoder, or retrain the diffusion model (run ID train_diffusion)."
        )
    dino = dino_from_record(record["dino"], diffusion_path,
                            {k: v for k, v in requested.items() if k.startswith("dino_")})
    return Generator(codec, unet, dino, record, str(bundle_root), str(autoencoder_path)).to(device)


def recorded_value(record: Mapping[str, Any], key: str, requested: Any, path: str | os.PathLike, what: str) -> Any:
    """A setting a model recorded, after checking the command line's value of it (``None`` = the model's)."""
    check_requested({key: record[key]}, {key: requested}, path, what)
    return record[key]
