"""MONAI Label app of the DiNO-Diffusion bundle: few-shot segmentation and landmark heads, zero-shot lungs from a
diffusion UNet, and synthetic images from a study's DINO embedding, plus a train task that fine-tunes the
segmentation head on the label maps users save.

    monailabel start_server --app apps/monailabel --studies STUDIES \\
        --conf heads_dir runs/heads --conf generator_dir runs/corpus_cpu64

Settings (``--conf key value``):
- ``heads_dir``: work dir of configs/heads/*.json (models/heads/denoiser.pt, segmentation.pt, landmarks.pt);
- ``generator_dir``: work dir of the generator (models/model.pt, models/model_autoencoder.pt); default heads_dir;
- ``structures``: comma-separated mask columns of the segmentation head (default the five JSRT structures);
- ``train_iterations``: fine-tuning steps of the train task (default 200);
- ``sample_steps``: sampler steps of the generation task (default 20);
- ``zero_shot_model``: the UNet the zero-shot lungs task reads, ``denoiser`` (in heads_dir) or ``generator`` (in
  generator_dir); default the one configs/heads/zero_shot.json serves.
A task whose model file is missing is left out of /info and answers 503 with what to train.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT, Path(__file__).resolve().parent / "lib"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from fastapi import HTTPException  # noqa: E402
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.exception import MONAILabelException  # noqa: E402
from monailabel.interfaces.tasks.infer_v2 import InferType  # noqa: E402

import dinodiffusion_tasks as tasks  # noqa: E402

logger = logging.getLogger(__name__)

PRETRAIN = "pre-train it with configs/heads/pretrain.json (run training) into this heads_dir"
GENERATOR = "train the generator (configs/train.json) into this generator_dir"
# the zero-shot task's (work dir, model file, what to do when it is missing) for each UNet it can read
ZERO_SHOT = {"denoiser": lambda app: (app.heads_dir, "denoiser", PRETRAIN),
             "generator": lambda app: (app.generator_dir, "diffusion", GENERATOR)}
FINE_TUNE = "fine-tune it with configs/heads/{} (run training) into this heads_dir, or POST /train/segmentation"


class DinoDiffusionApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.heads_dir = str(Path(conf.get("heads_dir", ROOT / "runs" / "heads")).resolve())
        self.generator_dir = str(Path(conf.get("generator_dir", self.heads_dir)).resolve())
        structures = conf.get("structures")
        self.structures = structures.split(",") if structures else tasks.STRUCTURES
        self.train_iterations = int(conf.get("train_iterations", 200))
        self.sample_steps = int(conf.get("sample_steps", 20))
        self.zero_shot_model = conf.get("zero_shot_model") or tasks.config_default("heads/zero_shot.json",
                                                                                   "zero_shot_model")
        if self.zero_shot_model not in ZERO_SHOT:
            raise ValueError(f"--conf zero_shot_model '{self.zero_shot_model}' is not known: use one of {sorted(ZERO_SHOT)}.")
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="DiNO-Diffusion",
                         description="Label-free diffusion for radiographs: few-shot heads, zero-shot lungs, synthesis",
                         version="1.0")

    def zero_shot_description(self) -> str:
        """What the zero-shot task serves, from configs/heads/zero_shot.json's method."""
        method = tasks.config_default("heads/zero_shot.json", "zero_shot_method")
        source = ("the label-free lung rule on single pixels (method intensity, no UNet call)" if method == "intensity" else
                  f"{method} clusters of the {self.zero_shot_model}'s UNet and the label-free lung rule")
        return f"Zero-shot lungs from {source}, no labels; the result names the method and settings"

    def init_infers(self):
        heads, labels = self.heads_dir, tasks.label_names(self.structures)
        return {
            "segmentation": tasks.BundleInfer(
                "heads/segmentation.json", "inference", heads, "segmentation", FINE_TUNE.format("segmentation.json"),
                InferType.SEGMENTATION, labels, "Few-shot segmentation head on the label-free denoiser: one label "
                "per structure", tasks.label_map_from_masks(self.structures), {"structures": self.structures}),
            "landmarks": tasks.BundleInfer(
                "heads/landmarks.json", "inference", heads, "landmarks", FINE_TUNE.format("landmarks.json"),
                InferType.DETECTION, [], "Few-shot landmark head: points per landmark group as JSON in the image's "
                "pixel frame", tasks.landmark_points),
            "zero_shot_lungs": tasks.BundleInfer(
                "heads/zero_shot.json", "inference", *ZERO_SHOT[self.zero_shot_model](self), InferType.SEGMENTATION,
                {"lungs": 1}, self.zero_shot_description(), tasks.lung_mask, {"zero_shot_model": self.zero_shot_model}),
            "generation": tasks.BundleInfer(
                "inference.json", "sample", self.generator_dir, "diffusion", GENERATOR, InferType.OTHERS, [], "A synthetic radiograph generated from the study's "
                "DINO embedding (reconstruction strategy; params strategy/strategy_params pick another, e.g. a concept)", tasks.generated_image,
                {"num_samples": 1, "strategy": "reconstruction", "num_inference_steps": self.sample_steps,
                 "output_formats": ["png"]},
                request_keys=["strategy", "strategy_params", "sample_seed", "guidance_scale"]),
        }

    def on_init_complete(self):
        super().on_init_complete()
        tasks.serve_sync_training_beside_requests()

    def init_trainers(self):
        return {"segmentation": tasks.HeadTrain(self.heads_dir, self.structures, self.train_iterations)}

    def init_datastore(self):
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        from monailabel.config import settings

        return tasks.CheckedDatastore(self.studies, extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
                                      auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                                      read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
                                      label_values=list(tasks.label_names(self.structures).values()))

    def infer(self, request, datastore=None):
        image = request.get("image")
        if isinstance(image, str) and os.path.exists(image) and not tasks.servable(image, self.studies):
            raise HTTPException(status_code=404, detail=f"Image '{image}' is not an image of this server's datastore: "
                                                        "give an image id of the datastore or upload a file.")
        try:
            return super().infer(request, datastore)
        except MONAILabelException as err:  # unknown task or no task named: a 404 with the list, not a bare 500
            raise HTTPException(status_code=404, detail=f"{err.msg} Tasks: {sorted(self._infers)}.") from None

    def bundle_path(self, model):
        # MONAI Label's /train/{model} queues the training and finds an unknown trainer only in the background
        # process (200 SUBMITTED, then a traceback); it asks this first, in the server, for every queued task: a
        # name no task of this server has is refused here, before anything is queued
        known = set(self._trainers) | set(self._infers) | set(getattr(self, "_scoring_methods", {}))
        if model and model not in known:
            raise HTTPException(status_code=404, detail=f"Trainer {model!r} is not known: trainers "
                                                        f"{sorted(self._trainers)}.")
        return super().bundle_path(model)

    def train(self, request):
        try:
            return super().train(request)
        except MONAILabelException as err:
            raise HTTPException(status_code=404, detail=f"{err.msg} Trainers: {sorted(self._trainers)}.") from None
