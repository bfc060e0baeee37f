"""Judge frozen DINO features on the CXR corpus: within-source labels, a pre-trained ViT against random ViTs.

    python -m evidence.evaluate_dino_corpus --weights runs/corpus_cpu64/models/dino/teacher.safetensors \\
        --out docs/results/dino_corpus.json

The corpus labels are confounded with source (Kermany films are children's), so every task stays within one
source: ``kermany`` normal vs pneumonia and ``nih`` normal vs pneumonia (NLP-mined labels, noisy). Features of
the ``train`` split fit, the ``test`` split scores (patients never straddle splits): k-NN (k=5/20, cosine) and
a logistic-regression linear probe on the CLS token, AUC with a bootstrap 95% interval over test images. The
random baseline is the same architecture at ``--random_seeds`` initialisations (their spread is reported).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from bundle.cli import data_folder, report_json
from bundle.data import apply_to_file, modality_preprocessing
from bundle.dino import DinoFeatures
from scripts.cxr_corpus_datalist import corpus_rows
from evidence.evaluate_dino import auc, features, knn_scores, linear_probe

TASKS = {"kermany": ("normal", "pneumonia"), "nih": ("normal", "pneumonia")}


def bootstrap_interval(scores: np.ndarray, labels: np.ndarray, n: int = 1000, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(labels), len(labels))
        if labels[idx].min() != labels[idx].max():
            values.append(auc(scores[idx], labels[idx]))
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def task_scores(cls: dict[str, torch.Tensor], y: dict[str, np.ndarray]) -> dict:
    out = {}
    for name, scores in (("knn5", knn_scores(cls["train"], y["train"], cls["test"], 5)),
                         ("knn20", knn_scores(cls["train"], y["train"], cls["test"], 20)),
                         ("linear_probe", linear_probe(cls["train"], y["train"], cls["test"]))):
        out[f"{name}_auc"] = auc(scores, y["test"])
        out[f"{name}_auc_95ci"] = bootstrap_interval(np.asarray(scores), y["test"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="trained DINO weights (timm safetensors with a .json sidecar)")
    parser.add_argument("--corpus", type=Path, default=None, help="the cxr_corpus folder (default: $DINO_DIFFUSION_DATA/cxr_corpus)")
    parser.add_argument("--random_seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.corpus = data_folder("cxr_corpus", args.corpus)
    info = json.loads(Path(args.weights + ".json").read_text())
    model, size, kwargs = info["model_name"], info["img_size"], info.get("model_kwargs", {})
    start = time.time()
    preprocessing = modality_preprocessing(ROOT / "configs/modality/cxr.json", image_size=size)
    data = {}
    for source, labels in TASKS.items():
        rows = {s: [r for r in corpus_rows(args.corpus, s, source) if r["label"] in labels] for s in ("train", "test")}
        images = {s: torch.stack([torch.as_tensor(apply_to_file(preprocessing, {"image": r["image"]})["image"])
                                  for r in rs]) for s, rs in rows.items()}
        y = {s: np.array([r["label"] == labels[1] for r in rs], dtype=np.float32) for s, rs in rows.items()}
        data[source] = (images, y)
    result = {"model": model, "input_size": size, "kwargs": kwargs, "weights": args.weights,
              "tasks": {s: {"train": len(d[1]["train"]), "test": len(d[1]["test"]),
                            "test_positives": int(d[1]["test"].sum()), "labels": list(TASKS[s])}
                        for s, d in data.items()}}
    extractors = [("pretrained", args.weights, 0)] + [(f"random_seed{s}", "random", s) for s in args.random_seeds]
    for name, weights, seed in extractors:
        dino = DinoFeatures(model, weights=weights, tokens="cls", input_size=size, model_kwargs=kwargs, seed=seed)
        result[name] = {}
        for source, (images, y) in data.items():
            cls = {s: features(dino, x)[:, 0] for s, x in images.items()}
            result[name][source] = task_scores(cls, y)
        print(name, json.dumps({s: {k: round(v, 3) for k, v in r.items() if not k.endswith("ci")}
                                for s, r in result[name].items()}), flush=True)
    randoms = [result[f"random_seed{s}"] for s in args.random_seeds]
    result["random_mean_sd"] = {source: {k: [float(np.mean([r[source][k] for r in randoms])),
                                             float(np.std([r[source][k] for r in randoms]))]
                                         for k in randoms[0][source] if not k.endswith("ci")} for source in TASKS}
    result["seconds"] = round(time.time() - start, 1)
    report_json(result, args.out)


if __name__ == "__main__":
    main()
