"""MONAI Label tasks that run this bundle's own configs on the image of a request.

Every task builds the bundle config it wraps (``configs/heads/*.json``, ``configs/inference.json``) exactly as
``python -m monai.bundle run`` does, pointed at a one-row datalist of the request's image and a fresh output
folder, and turns what the config wrote into what MONAI Label returns: a label map (one integer per structure),
points as JSON, or an image. Bad input (an image the modality refuses, a missing model, no labels to train on)
becomes an HTTP error with the bundle's own one-line message; the server keeps running.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.interfaces.tasks.train import TrainTask
from PIL import Image

from bundle.errors import BundleInputError
from bundle.heads.segmentation import mask_folders
from bundle.model_files import install_model
from bundle.models import model_path

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[3]
STRUCTURES = ["mask_left_lung", "mask_right_lung", "mask_heart", "mask_left_clavicle", "mask_right_clavicle"]


def label_names(structures: Sequence[str]) -> dict[str, int]:
    """MONAI Label's ``{name: value}`` of a label map: structure ``i`` (its mask column without ``mask_``) is ``i + 1``."""
    return {name: i + 1 for i, name in enumerate(mask_folders(structures))}


def bundle_message(err: BaseException) -> str | None:
    """The bundle's own message when ``err`` is, or was caused by, a :class:`BundleInputError` (MONAI's config
    parser wraps it in "Failed to evaluate ..."), else ``None``."""
    while err is not None:
        if isinstance(err, BundleInputError):
            return str(err)
        err = err.__cause__ or err.__context__
    return None


def run_bundle_config(config: str, run_id: str, overrides: dict[str, Any]) -> Any:
    """Run ``configs/<config>`` as ``python -m monai.bundle run <run_id>`` would; a bundle input error becomes
    HTTP 422 with its message."""
    from bundle.cli import config_workflow

    try:
        workflow = config_workflow(str(ROOT / "configs" / config), run_id, bundle_root=str(ROOT), **overrides)
        workflow.run()
        return workflow
    except Exception as err:
        message = bundle_message(err)
        if message is None:
            raise
        raise HTTPException(status_code=422, detail=message) from None


_RESULTS: Path | None = None


def config_default(config: str, key: str) -> Any:
    """The value ``key`` has in the bundle config ``configs/<config>`` as shipped (the served default)."""
    return json.loads((ROOT / "configs" / config).read_text())[key]


def result_path(suffix: str) -> str:
    """A fresh file for one answer, in a folder this server owns. MONAI Label deletes the file once it is sent, and
    its client saves what it receives as ``<client tmpdir>/<the same file name>``: were the answer in the system
    temporary folder, a client on the same machine (a viewer beside the server) would have its copy deleted."""
    global _RESULTS
    if _RESULTS is None or not _RESULTS.is_dir():
        _RESULTS = Path(tempfile.mkdtemp(prefix="dinodiffusion_results_"))
    fd, path = tempfile.mkstemp(prefix="dinodiffusion_", suffix=suffix, dir=_RESULTS)
    os.close(fd)
    return path


def one_row_datalist(image: str, folder: Path) -> str:
    path = folder / "input.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["image"], [str(Path(image).resolve())]])
    return str(path)


def image_size(path: str) -> tuple[int, int]:
    """(height, width) of a 2D image file as PIL reads it (DICOM and NIfTI through MONAI's loader)."""
    if path.lower().endswith((".png", ".jpg", ".jpeg")):
        with Image.open(path) as image:
            return image.height, image.width
    from monai.transforms import LoadImage

    shape = LoadImage(image_only=True)(path).shape  # MONAI's (x, y) order
    return int(shape[1]), int(shape[0])


def read_label(path: str, image_id: str, size: tuple[int, int], values: Sequence[int]) -> np.ndarray:
    """A saved label map, checked: a readable image of the study's size whose values are 0 or a known label
    (HTTP 422 with the reason otherwise)."""
    try:
        with Image.open(path) as image:
            label = np.asarray(image)
    except Exception:
        raise HTTPException(status_code=422, detail=f"The label of '{image_id}' is not a readable image: save a PNG "
                                                    "label map.") from None
    if label.shape != tuple(size):
        raise HTTPException(status_code=422, detail=f"The label of '{image_id}' has shape {label.shape}, its study "
                                                    f"{tuple(size)} (height, width): save a grey label map of the "
                                                    "study's size.")
    unknown = sorted(set(np.unique(label).tolist()) - {0, *values})
    if unknown:
        raise HTTPException(status_code=422, detail=f"The label of '{image_id}' has values {unknown[:5]} that name no "
                                                    f"structure: use 0 and {sorted(values)}.")
    return label


TAG = re.compile(r"[A-Za-z0-9_-]{1,64}")


class CheckedDatastore(LocalDatastore):
    """MONAI Label's local datastore that keeps labels inside it and useful for training: a label's tag must be a
    plain name (a tag becomes a folder), its image must be in the datastore, and the label a readable map of the
    study's size with known values. A refused upload is deleted at once (MONAI Label removes its temporary file only
    after a successful request)."""

    def __init__(self, *args: Any, label_values: Sequence[int] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.label_values = list(label_values)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        try:
            if not TAG.fullmatch(str(label_tag)):
                raise HTTPException(status_code=422, detail=f"Label tag '{label_tag}' is not a plain name: use "
                                                            "letters, digits, '-' or '_' (e.g. final).")
            image = self.get_image_uri(image_id)
            if not image:
                raise HTTPException(status_code=404, detail=f"Image '{image_id}' is not in the datastore: add it "
                                                            "first (PUT /datastore/image).")
            read_label(label_filename, image_id, image_size(image), self.label_values)
        except HTTPException:
            Path(label_filename).unlink(missing_ok=True)
            raise
        return super().save_label(image_id, label_filename, label_tag, label_info)


def servable(path: str, studies: str) -> bool:
    """Whether the infer tasks may read ``path``: an image of the datastore, or a file MONAI Label wrote for an
    upload (a top-level temporary file); never any other file of the server's disk."""
    real = os.path.realpath(path)
    inside = os.path.commonpath([real, os.path.realpath(studies)]) == os.path.realpath(studies)
    upload = (os.path.dirname(real) == os.path.realpath(tempfile.gettempdir())
              and os.path.basename(real).startswith("tmp"))
    return os.path.isfile(real) and (inside or upload)


def require_model(path: str, what: str, remedy: str) -> None:
    if not os.path.isfile(path):
        raise HTTPException(status_code=503, detail=f"The {what} '{path}' does not exist: {remedy}.")


class BundleInfer(InferTask):
    """One bundle inference config as a MONAI Label infer task.

    ``request_keys``: settings a request may give in its params (e.g. the generation task's ``strategy`` and
    ``strategy_params``, to sample from a concept), passed to the config as they are; the config checks them.
    ``collect(output_dir, image)`` turns the config's outputs for the study ``image`` into ``(result file, result
    JSON)``; the result file is a new temporary file, which MONAI Label deletes once it is sent. Every task answers
    with a file, so that the answer is multipart and ``MONAILabelClient.infer`` decodes its JSON (a JSON-only answer
    reaches the client as undecoded bytes).
    """

    def __init__(self, config: str, run_id: str, work_dir: str, model: str, remedy: str, type: str, labels: Any,
                 description: str, collect: Callable[[Path, str], tuple[str, dict]],
                 overrides: dict[str, Any] | None = None, request_keys: Sequence[str] = (), device: str | None = None):
        super().__init__(type=type, labels=labels, dimension=2, description=description,
                         config={"device": device or "auto"})
        self.config_file, self.run_id, self.work_dir = config, run_id, work_dir
        self.model, self.remedy, self.collect = model, remedy, collect
        self.overrides, self.request_keys = overrides or {}, list(request_keys)

    def get_path(self, validate=True):
        return model_path(self.work_dir, self.model)

    def is_valid(self) -> bool:
        return os.path.isfile(self.get_path())

    def __call__(self, request) -> tuple[str | None, dict]:
        image = request.get("image")
        if not isinstance(image, str) or not os.path.isfile(image):
            raise HTTPException(status_code=404, detail=f"Image '{image}' is not a file: give an image id of the "
                                                        "datastore or upload a file.")
        require_model(self.get_path(), f"model of task '{request.get('model')}'", self.remedy)
        start = time.time()
        scratch = Path(tempfile.mkdtemp(prefix="dinodiffusion_"))
        try:
            datalist = one_row_datalist(image, scratch)
            overrides = {"work_dir": self.work_dir, "dataset_dir": datalist, "input_dir": datalist,
                         "output_dir": str(scratch / "out"), **self.overrides,
                         **{k: request[k] for k in self.request_keys if k in request}}
            if request.get("device") not in (None, "", "auto"):
                overrides["device"] = f"$torch.device('{request['device']}')"
            run_bundle_config(self.config_file, self.run_id, overrides)
            result_file, result_json = self.collect(scratch / "out", image)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        result_json["latencies"] = {"total": round(time.time() - start, 3)}
        return result_file, result_json


def label_map_from_masks(structures: Sequence[str]) -> Callable[[Path], tuple[str, dict]]:
    """Per-structure 0/255 masks (``<out>/<structure>/<stem>.png``) to one PNG label map, structure ``i`` as
    ``i + 1``; where structures overlap (a clavicle over a lung), the later one in ``structures`` wins."""
    names = label_names(structures)

    def collect(out: Path, image: str) -> tuple[str, dict]:
        label = None
        for name, value in names.items():
            (mask_file,) = sorted((out / name).glob("*.png"))
            mask = np.asarray(Image.open(mask_file)) > 127
            label = np.zeros(mask.shape, np.uint8) if label is None else label
            label[mask] = value
        path = result_path(".png")
        Image.fromarray(label).save(path)
        return path, {"label_names": names, "pixels": {n: int((label == v).sum()) for n, v in names.items()}}

    return collect


def landmark_points(out: Path, image: str) -> tuple[str, dict]:
    """The points as the result JSON and, the same, as the result file (a .json: what a viewer saves)."""
    (points_file,) = sorted((out / "landmarks").glob("*.json"))
    path = result_path(".json")
    shutil.copyfile(points_file, path)
    return path, {"landmarks": json.loads(points_file.read_text()), "frame": "original image pixels (x, y)"}


def lung_mask(out: Path, image: str) -> tuple[str, dict]:
    (mask_file,) = sorted((out / "lungs").glob("*.png"))
    label = (np.asarray(Image.open(mask_file)) > 127).astype(np.uint8)
    path = result_path(".png")
    Image.fromarray(label).save(path)
    settings = json.loads((out / "metrics.json").read_text())["settings"]  # the method and model that made it
    return path, {"label_names": {"lungs": 1}, "pixels": {"lungs": int(label.sum())}, "settings": settings}


def generated_image(out: Path, image: str) -> tuple[str, dict]:
    """The sample, resized to the study's size so that a viewer lays it over the study; the result says the size
    the generator made it at (its image_size: the detail is that of the smaller image)."""
    with open(out / "manifest.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    sample = Image.open(out / row["image"])
    height, width = image_size(image)
    path = result_path(".png")
    sample.resize((width, height), Image.Resampling.BICUBIC).save(path)
    return path, {**{k: row[k] for k in ("strategy", "seed", "sampler", "num_inference_steps", "guidance_scale")},
                  "generated_size": [sample.height, sample.width], "returned_size": [height, width],
                  "note": f"generated at {sample.height}x{sample.width} (the generator's image_size) and resized to "
                          "the study's size"}


def serve_sync_training_beside_requests() -> bool:
    """MONAI Label's ``POST /train/{model}`` is an ``async`` endpoint that, with ``run_sync=true``, runs the training
    inside the server's event loop, so every other request (``/info``, ``/infer``) waits until it ends. Put a plain
    (``def``) endpoint for the same path and parameters in front of it: FastAPI runs such endpoints in its thread
    pool, so a synchronous training runs beside the other requests. Only in a running server (``monailabel.app``
    imported); returns whether it was done."""
    import sys

    server = sys.modules.get("monailabel.app")
    if server is None:
        return False
    from fastapi import APIRouter, Depends
    from monailabel.config import settings
    from monailabel.endpoints.train import run, run_model
    from monailabel.endpoints.user.auth import RBAC, User

    router = APIRouter(prefix=f"{settings.MONAI_LABEL_API_STR}/train", tags=["Train"])

    @router.post("/{model}", summary="Run Training Task for specific model (synchronous runs off the event loop)")
    def api_run_model(model: str, params: dict | None = None, run_sync: bool | None = False,
                      enqueue: bool | None = False, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
        return run_model(model, params, run_sync, enqueue)

    @router.post("/", summary="Run All Training Tasks (synchronous runs off the event loop)")
    def api_run(params: dict | None = None, run_sync: bool | None = False,
                user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
        return run(params, run_sync)

    routes = server.app.router.routes
    before = len(routes)
    server.app.include_router(router)
    added = routes[before:]
    del routes[before:]
    routes[0:0] = added  # matched before MONAI Label's own route for the same path
    return True


class HeadTrain(TrainTask):
    """Fine-tune the segmentation head (configs/heads/segmentation.json) on the label maps users saved.

    Every image with a ``final`` label in the datastore is used; the label map's value ``i + 1`` is structure ``i``
    (the infer task's ``label_names``). The new head replaces the old one atomically, so the infer task uses it
    from its next request.
    """

    def __init__(self, work_dir: str, structures: Sequence[str] = STRUCTURES, iterations: int = 200):
        super().__init__("Fine-tune the segmentation head on the saved label maps (the label-free pre-trained denoiser "
                         "is the start)")
        self.work_dir, self.structures, self.iterations = work_dir, list(structures), iterations
        self._stats: dict[str, Any] = {}

    def config(self):
        return {"iterations": self.iterations, "batch_size": 8}  # the learning rate follows head_recipe

    def stats(self):
        return self._stats

    def __call__(self, request, datastore: Datastore):
        start = time.time()
        labelled = datastore.get_labeled_images(DefaultLabelTag.FINAL.value)
        if not labelled:
            raise HTTPException(status_code=422, detail="No image in the datastore has a saved (final) label: save at "
                                                        "least one label map with PUT /datastore/label, then train.")
        require_model(model_path(self.work_dir, "denoiser"), "pre-trained denoiser",
                      "pre-train it with configs/heads/pretrain.json (run training) into this work_dir")
        names = label_names(self.structures)
        scratch = Path(tempfile.mkdtemp(prefix="dinodiffusion_train_"))
        try:
            rows, skipped = [], {}
            for image_id in labelled:
                image = datastore.get_image_uri(image_id)
                try:  # a label saved before labels were checked, or changed on disk since: skipped, by name
                    label = read_label(datastore.get_label_uri(image_id, DefaultLabelTag.FINAL.value), image_id,
                                       image_size(image), list(names.values()))
                except HTTPException as err:
                    skipped[image_id] = err.detail
                    logger.warning("Training leaves out %s: %s", image_id, err.detail)
                    continue
                row = {"image": image}
                for column, (name, value) in zip(self.structures, names.items()):
                    row[column] = str(scratch / f"{image_id}_{name}.png")
                    Image.fromarray(((label == value) * 255).astype(np.uint8)).save(row[column])
                rows.append(row)
            if not rows:
                raise HTTPException(status_code=422, detail=f"No saved label can be used: {skipped}.")
            datalist = scratch / "labelled.csv"
            with open(datalist, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=["image", *self.structures])
                writer.writeheader()
                writer.writerows(rows)
            trained = scratch / "segmentation.pt"
            workflow = run_bundle_config("heads/segmentation.json", "training", {
                "work_dir": self.work_dir, "labelled_dir": str(datalist), "num_labelled": "all",
                "structures": self.structures, "head_path": str(trained),
                "head_iterations": int(request.get("iterations", self.iterations))})
            head_path = model_path(self.work_dir, "segmentation")
            # weights and record written atomically; the head trained before stays beside it (segmentation.previous.pt)
            previous = install_model(trained, head_path)
            losses = workflow.parser.get_parsed_content("head_trainer").state.output
            lr = float(workflow.parser.get_parsed_content("fine_tune_lr"))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        self._stats = {"images": len(rows), "skipped": skipped, "iterations": int(request.get("iterations", self.iterations)),
                       "lr": lr, "final_loss": float(losses["loss"]) if isinstance(losses, dict) else float(losses),
                       "head": head_path, "previous_head": str(previous) if previous else None, "seconds": round(time.time() - start, 1)}
        return self._stats
