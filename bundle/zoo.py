"""MONAI Model Zoo packaging and the zoo's checks, run locally.

A trained work dir becomes a zoo-ready bundle folder: the configs, the ``bundle`` package, the docs, ``LICENSE``,
``configs/metadata.json`` whose data formats are those of the trained networks, and ``models/`` with the weights
(the diffusion UNet as ``models/model.pt``, the autoencoder as ``models/model_autoencoder.pt``, the DINO teacher)
listed with their SHA-256 in ``large_files.yml``, so that the weights can live outside git. :func:`verify` runs what
the zoo's CI runs on a bundle (directory, version, metadata against the schema, the network's input/output check
and an export), offline.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .data import hash_file as sha256
from .errors import BundleInputError
from .io import atomic_write, atomic_write_json
from .model_files import record_file
from .models import MODEL_FILES, load_generator, model_path

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
LOCAL_SCHEMA = Path(__file__).parent / "schemas" / "model_zoo_metadata.json"
# what a zoo bundle folder holds from this repository (models/ is written from the work dir): what a bundle user
# runs, not the evidence scripts, developer tools (benchmark, mutation testing, fault injection) or the images of
# README command 1 (bundle/default_data: a zoo user trains on their own --dataset_dir)
PACKAGE_FILES = ("configs", "bundle", "docs", "scripts", "LICENSE", "requirements.txt")
PACKAGE_SCRIPTS = ("__init__.py", "augmentation_experiment.py", "jsrt_datalist.py", "cxr_corpus_datalist.py")
LEFT_OUT = ("__pycache__", "*.pyc", "results", "default_data")


def _tensor(kind: str, fmt: str, channels: int, shape: Sequence[Any], dtype: str = "float32",
            value_range: Sequence[float] = (), **extra: Any) -> dict[str, Any]:
    return {"type": kind, "format": fmt, "num_channels": int(channels), "spatial_shape": list(shape), "dtype": dtype,
            "value_range": list(value_range), "is_patch_data": False, **extra}


def data_formats(image_size: int, latent_shape: Sequence[int], context_tokens: int, context_dim: int,
                 num_train_timesteps: int, modality: str) -> dict[str, dict[str, Any]]:
    """The metadata's ``network_data_format`` (the diffusion UNet, the primary network: its noisy-latent input is
    named ``image`` and its output ``pred``, the names MONAI's ``verify_net_in_out`` reads; timesteps and DINO
    context are its other inputs) and ``autoencoder_data_format`` (image to reconstruction)."""
    channels, grid = int(latent_shape[0]), [int(s) for s in latent_shape[1:]]
    image = _tensor("image", "magnitude", 1, [image_size, image_size], value_range=(0, 1), modality=modality)
    return {
        "network_data_format": {
            "inputs": {
                "image": _tensor("noise", "latent", channels, grid),
                "timesteps": _tensor("vector", "timesteps", 1, [], "long", (0, num_train_timesteps - 1)),
                "context": _tensor("embedding", "DINO tokens (batch, tokens, width)", context_dim, [context_tokens]),
            },
            "outputs": {"pred": _tensor("feature", "latent", channels, grid, channel_def={"0": "v or noise prediction"})},
        },
        "autoencoder_data_format": {
            "inputs": {"image": image},
            "outputs": {"pred": {**image, "channel_def": {"0": "reconstruction"}}},
        },
    }


def generator_data_formats(generator: Any) -> dict[str, dict[str, Any]]:
    """:func:`data_formats` of a loaded :class:`bundle.models.Generator`."""
    return data_formats(generator.image_size, generator.latent_shape, generator.dino.num_tokens, generator.context_dim,
                        generator.record["noise_schedule"]["num_train_timesteps"], generator.modality)


def large_files_yaml(entries: Sequence[Mapping[str, str]]) -> str:
    """``large_files.yml``: every weights file with where to download it and its hash."""
    lines = ["large_files:"]
    for e in entries:
        lines += [f'  - path: "{e["path"]}"', f'    url: "{e["url"]}"', f'    hash_val: "{e["hash_val"]}"',
                  '    hash_type: "sha256"']
    return "\n".join(lines) + "\n"


def package(work_dir: str | os.PathLike, out_dir: str | os.PathLike, base_url: str, version: str | None = None,
            source_root: str | os.PathLike = ROOT) -> Path:
    """Write a zoo-ready bundle folder ``out_dir`` from the generator trained in ``work_dir``.

    ``base_url``: where the weights will be uploaded (``<base_url>/<file name>`` goes into ``large_files.yml``).
    The folder is built beside ``out_dir`` and renamed into place when complete; an existing ``out_dir`` is refused.
    """
    out_dir, source_root = Path(out_dir), Path(source_root)
    if out_dir.exists():
        raise BundleInputError(f"The package folder '{out_dir}' exists already: choose another or delete it.")
    files = {MODEL_FILES[name]: model_path(work_dir, name) for name in ("diffusion", "autoencoder")}
    missing = [p for p in files.values() if not os.path.isfile(p)]
    if missing:
        raise BundleInputError(f"The work dir '{work_dir}' lacks {missing}: train it first (run ID training).")
    generator = load_generator(files[MODEL_FILES["autoencoder"]], files[MODEL_FILES["diffusion"]], bundle_root=source_root)
    formats = generator_data_formats(generator)
    dino = generator.dino.weights  # the file the generator found (where training had it, or beside the models)
    if dino not in ("hub", "random"):  # it travels beside the models, where sampling looks for it
        files[f"models/dino/{Path(dino).name}"] = dino
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name in PACKAGE_FILES:
            src = source_root / name
            if name == "scripts":
                (tmp / name).mkdir()
                for script in PACKAGE_SCRIPTS:
                    shutil.copy(src / script, tmp / name / script)
            elif src.is_dir():
                shutil.copytree(src, tmp / name, ignore=shutil.ignore_patterns(*LEFT_OUT))
            elif src.is_file():
                shutil.copy(src, tmp / name)
        (tmp / "configs" / "metadata.json").unlink(missing_ok=True)  # a link to the repository's: written below
        (tmp / "docs" / "README.md").unlink(missing_ok=True)
        atomic_write(tmp / "docs" / "README.md",
                     lambda t: Path(t).write_text(links_from(source_root / "README.md", source_root / "docs")))
        metadata = json.loads((source_root / "metadata.json").read_text())
        metadata.update(formats)
        if version:
            if version not in metadata.get("changelog", {}):
                raise BundleInputError(f"Version {version} has no changelog entry in metadata.json: add one first.")
            metadata["version"] = version
        atomic_write_json(tmp / "configs" / "metadata.json", metadata)
        for rel, src in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, tmp / rel)
            if record_file(src).is_file():  # the record beside the weights (bundle/model_files.py) travels with them
                shutil.copy(record_file(src), record_file(tmp / rel))
            if Path(f"{src}.json").is_file():  # a DINO teacher's note of its architecture (bundle/dino.py)
                shutil.copy(f"{src}.json", f"{tmp / rel}.json")
        inference = json.loads((tmp / "configs" / "inference.json").read_text())
        # MONAI's tools build network_def without the work dir: write the trained architecture in, as the zoo's own
        # bundles do, so monai.bundle.load, ckpt_export and the zoo CI work from any working directory
        inference["network_def"] = generator.record["network"]
        inference["autoencoder_def"] = json.loads(record_file(files[MODEL_FILES["autoencoder"]]).read_text())["record"]["network"]
        atomic_write_json(tmp / "configs" / "inference.json", inference, indent=4)
        weights = [*files, *export_torchscript(tmp)]
        entries = [{"path": rel, "url": f"{base_url.rstrip('/')}/{Path(rel).name}", "hash_val": sha256(tmp / rel)}
                   for rel in weights]
        atomic_write(tmp / "large_files.yml", lambda t: Path(t).write_text(large_files_yaml(entries)))
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Packaged %s into %s (weights listed in large_files.yml).", work_dir, out_dir)
    return out_dir


def verify(bundle_dir: str | os.PathLike, schema: str | os.PathLike = LOCAL_SCHEMA,
           known_versions: Sequence[str] = ()) -> dict[str, Any]:
    """The zoo CI's checks on a bundle folder, offline; returns what each found and raises at the first failure.

    1. directory: ``configs/metadata.json``, ``LICENSE``, ``models/model.pt``, ``configs/inference.json``; every file
       of ``large_files.yml`` present with its hash;
    2. version: ``version`` has a ``changelog`` entry and is not one of ``known_versions`` (already published);
    3. metadata: MONAI's ``verify_metadata`` against ``schema`` (a local file: no download);
    4. network input/output: MONAI's ``verify_net_in_out`` on ``network_def`` with timesteps and DINO context;
    5. weights: what the zoo CI's ``ckpt_export`` and ``monai.bundle.load`` do first: ``network_def`` and
       ``autoencoder_def`` parsed from ``inference.json`` with only ``bundle_root`` given, and each ``models/*.pt``
       copied into them by MONAI's ``copy_model_state``: every weight must arrive (a file with extra keys, or a
       network_def that needs the work dir, fails here as it fails there);
    6. export: the TorchScript files of the UNet and the latent decoder against the eager networks.
    """
    from monai.bundle import verify_metadata, verify_net_in_out

    bundle_dir = Path(bundle_dir)
    found: dict[str, Any] = {}
    needed = ["configs/metadata.json", "LICENSE", "models/model.pt", "configs/inference.json"]
    absent = [n for n in needed if not (bundle_dir / n).is_file()]
    if absent:
        raise BundleInputError(f"The bundle '{bundle_dir}' lacks {absent}, which the Model Zoo requires.")
    large = bundle_dir / "large_files.yml"
    if large.is_file():
        import yaml

        for entry in yaml.safe_load(large.read_text())["large_files"]:
            path = bundle_dir / entry["path"]
            if not path.is_file() or sha256(path) != entry["hash_val"]:
                raise BundleInputError(f"'{entry['path']}' of large_files.yml is missing or its SHA-256 differs.")
        found["large_files"] = "hashes match"
    metadata = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
    version = metadata.get("version")
    if version not in metadata.get("changelog", {}):
        raise BundleInputError(f"metadata.json version {version} has no changelog entry.")
    if version in known_versions:
        raise BundleInputError(f"Version {version} is published already: raise the version and add a changelog entry.")
    found["version"] = version
    verify_metadata(meta_file=str(bundle_dir / "configs" / "metadata.json"), filepath=str(schema))
    found["metadata"] = f"valid against {Path(schema).name}"
    config = str(bundle_dir / "configs" / "inference.json")
    fmt = metadata["network_data_format"]["inputs"]
    context = torch.rand(1, fmt["context"]["spatial_shape"][0], fmt["context"]["num_channels"])
    verify_net_in_out(net_id="network_def", meta_file=str(bundle_dir / "configs" / "metadata.json"), config_file=config,
                      device="cpu", bundle_root=str(bundle_dir), work_dir=str(bundle_dir),
                      extra_forward_args={"timesteps": torch.tensor([10]), "context": context})
    found["network_def"] = "input/output channels and dtype as network_data_format states"
    found["weights"] = check_monai_loading(bundle_dir)
    found["export"] = check_torchscript(bundle_dir)
    return found


def check_monai_loading(bundle_dir: str | os.PathLike) -> dict[str, str]:
    """Every weight of ``models/model.pt`` and ``models/model_autoencoder.pt`` arrives in ``network_def`` and
    ``autoencoder_def`` through MONAI's own loading code (see :func:`verify`, check 5)."""
    from monai.bundle import ConfigParser
    from monai.networks.utils import copy_model_state

    bundle_dir = Path(bundle_dir)
    parser = ConfigParser()
    parser.read_config(str(bundle_dir / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle_dir)
    found = {}
    for net_id, rel in (("network_def", MODEL_FILES["diffusion"]), ("autoencoder_def", MODEL_FILES["autoencoder"])):
        network = parser.get_parsed_content(net_id)
        state = torch.load(bundle_dir / rel, map_location="cpu", weights_only=True)
        _, updated, unchanged = copy_model_state(network, state)
        if unchanged or len(updated) != len(state):
            raise BundleInputError(f"'{rel}' does not load into {net_id} with MONAI's copy_model_state ({len(updated)} "
                                   f"of {len(network.state_dict())} weights updated): package the bundle again.")
        found[net_id] = f"{len(updated)} of {len(network.state_dict())} weights from {rel}"
    return found


class _Decoder(torch.nn.Module):
    """Scaled latents to images: the codec's decode as a module, for tracing."""

    def __init__(self, codec: torch.nn.Module) -> None:
        super().__init__()
        self.codec = codec

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(latents)


TORCHSCRIPT_FILES = ("models/model.ts", "models/decoder.ts")


def _networks_and_inputs(bundle_dir: Path) -> tuple[dict[str, torch.nn.Module], tuple, tuple]:
    """The UNet and the latent decoder of a bundle folder, keyed by their TorchScript file, with an example input
    for tracing (batch 1) and another for checking (batch 3, other timesteps)."""
    from .models import load_codec, load_network

    fmt = json.loads((bundle_dir / "configs" / "metadata.json").read_text())["network_data_format"]["inputs"]
    g = torch.Generator().manual_seed(0)

    def inputs(batch: int, steps: list[int]) -> tuple:
        latent = torch.randn(batch, fmt["image"]["num_channels"], *fmt["image"]["spatial_shape"], generator=g)
        context = torch.randn(batch, fmt["context"]["spatial_shape"][0], fmt["context"]["num_channels"], generator=g)
        return latent, torch.tensor(steps), context

    unet, _ = load_network(bundle_dir / MODEL_FILES["diffusion"], "diffusion", "package the bundle again")
    decoder = _Decoder(load_codec(bundle_dir / MODEL_FILES["autoencoder"])).eval()
    return dict(zip(TORCHSCRIPT_FILES, (unet, decoder))), inputs(1, [10]), inputs(3, [999, 500, 0])


def _arguments(name: str, inputs: tuple) -> tuple:
    return inputs if name == "models/model.ts" else inputs[:1]  # the decoder takes the latents only


def export_torchscript(bundle_dir: str | os.PathLike) -> list[str]:
    """TorchScript by tracing, what a deployment runs: the diffusion UNet (``models/model.ts``: noisy latents,
    timesteps, context to the prediction) and the autoencoder's latent decoder (``models/decoder.ts``). Scripting
    fails on MONAI's attention blocks (as for the zoo's other diffusion bundles); tracing records the one code
    path a generator uses, and :func:`check_torchscript` shows it generalises."""
    bundle_dir = Path(bundle_dir)
    networks, example, _ = _networks_and_inputs(bundle_dir)
    with torch.no_grad():
        for name, network in networks.items():
            traced = torch.jit.trace(network, _arguments(name, example), check_trace=False)
            atomic_write(bundle_dir / name, lambda t, traced=traced: torch.jit.save(traced, t))
    return list(networks)


def check_torchscript(bundle_dir: str | os.PathLike) -> dict[str, float]:
    """Each TorchScript file against its eager network on a batch size and timesteps the trace did not see:
    the largest absolute difference (refused above 1e-4, or when a file is missing)."""
    bundle_dir = Path(bundle_dir)
    networks, _, check = _networks_and_inputs(bundle_dir)
    found = {}
    for name, network in networks.items():
        if not (bundle_dir / name).is_file():
            raise BundleInputError(f"'{name}' is missing in '{bundle_dir}': package the bundle again (python -m scripts.package_zoo).")
        with torch.no_grad():
            loaded = torch.jit.load(str(bundle_dir / name))
            difference = float((loaded(*_arguments(name, check)) - network(*_arguments(name, check))).abs().max())
        if difference > 1e-4:
            raise RuntimeError(f"The TorchScript export {name} differs from the eager network by {difference:.2e}.")
        found[name] = difference
    return found


def links_from(markdown: Path, folder: Path) -> str:
    """The text of ``markdown`` with its relative links rewritten to work from ``folder`` of the same tree (the
    repository README becomes the zoo bundle's docs/README.md, whose links to docs/guide/... must read guide/...)."""
    base = markdown.parent.resolve()

    def rebase(match: re.Match) -> str:
        target = match.group(1)
        if re.match(r"^(https?:|mailto:|#)", target):
            return match.group(0)
        return "](" + os.path.relpath(base / target, folder.resolve()).replace(os.sep, "/") + ")"

    return re.sub(r"\]\(([^)\s]+)\)", rebase, markdown.read_text())
