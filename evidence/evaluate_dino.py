"""Judge frozen DINO features on JSRT: a pre-trained ViT against a random-init ViT of the same shape.

    python -m evidence.evaluate_dino --weights runs/dino/models/dino/teacher.safetensors \\
        --model vit_small_patch16_224 --input_size 112 --kwargs '{"depth": 6}' --out docs/results/dino.json

Features come from the train split (fit) and the test split (score) of the JSRT set ($DINO_DIFFUSION_DATA/jsrt):
- k-NN (k=5/10, cosine) and a logistic-regression linear probe on the CLS token, AUC for `sex` and `nodule`;
- label-free correspondence: for every test image, each lung-contour landmark (RL, LL) of a reference
  training image is looked up by its patch token in the test image (best cosine match); the error is the
  distance from the matched patch centre to that landmark's true position, in 512-pixel JSRT coordinates.
  The trivial baseline copies the reference landmark position unchanged (JSRT images are well aligned).
Landmarks are used only to score, never to train.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_roc_auc

ROOT = Path(__file__).resolve().parents[1]

from bundle.cli import data_folder, jsrt_rows, report_json
from bundle.data import apply_to_file, modality_preprocessing
from bundle.dino import DinoFeatures
from bundle.heads.landmarks import load_landmarks


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    return float(compute_roc_auc(torch.as_tensor(scores, dtype=torch.float32), torch.as_tensor(labels)))


def knn_scores(train: torch.Tensor, train_y: np.ndarray, test: torch.Tensor, k: int) -> np.ndarray:
    """Fraction of the k most cosine-similar training images that are positive."""
    sim = torch.nn.functional.normalize(test, dim=1) @ torch.nn.functional.normalize(train, dim=1).T
    idx = sim.topk(k, dim=1).indices.numpy()
    return train_y[idx].mean(1)


def linear_probe(train: torch.Tensor, train_y: np.ndarray, test: torch.Tensor, weight_decay: float = 1e-2) -> np.ndarray:
    """L2-regularised logistic regression on standardised features (full-batch L-BFGS)."""
    mean, std = train.mean(0), train.std(0) + 1e-6
    x, xt = (train - mean) / std, (test - mean) / std
    y = torch.as_tensor(train_y, dtype=torch.float32)
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (xt @ w + b).detach().numpy()


@torch.no_grad()
def features(dino, images: torch.Tensor, batch: int = 16) -> torch.Tensor:
    return torch.cat([dino(images[i : i + batch]) for i in range(0, len(images), batch)])


def correspondence_error(tokens: torch.Tensor, landmarks: list[np.ndarray], ref: int, grid: int, size: int = 512):
    """Mean landmark error (pixels) of patch-token matching from image ``ref`` to every other image."""
    patch = size / grid
    ref_tokens = torch.nn.functional.normalize(tokens[ref], dim=-1)  # (grid*grid, D)
    ref_points = landmarks[ref]
    cells = np.clip((ref_points // patch).astype(int), 0, grid - 1)
    queries = ref_tokens[cells[:, 1] * grid + cells[:, 0]]  # row-major patches: row = y, column = x
    errors, baseline = [], []
    for i in range(len(tokens)):
        if i == ref:
            continue
        sim = queries @ torch.nn.functional.normalize(tokens[i], dim=-1).T
        best = sim.argmax(1).numpy()
        matched = np.stack([(best % grid + 0.5) * patch, (best // grid + 0.5) * patch], 1)
        errors.append(np.linalg.norm(matched - landmarks[i], axis=1).mean())
        baseline.append(np.linalg.norm(ref_points - landmarks[i], axis=1).mean())
    return float(np.mean(errors)), float(np.mean(baseline))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="trained DINO weights (timm safetensors)")
    parser.add_argument("--model", default=None, help="timm model name (default: from the weights' .json sidecar)")
    parser.add_argument("--input_size", type=int, default=None, help="default: from the weights' .json sidecar")
    parser.add_argument("--kwargs", default=None, help="timm create_model arguments as JSON (default: from the sidecar)")
    parser.add_argument("--jsrt", type=Path, default=None, help="the JSRT folder (default: $DINO_DIFFUSION_DATA/jsrt)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sidecar = Path(args.weights + ".json")  # DINO pre-training writes the architecture beside the weights
    info = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    args.model = args.model or info.get("model_name") or "vit_small_patch16_224"
    args.input_size = args.input_size or info.get("img_size") or 112
    args.kwargs = args.kwargs or json.dumps(info.get("model_kwargs", {}))

    start = time.time()
    preprocessing = modality_preprocessing(ROOT / "configs/modality/cxr.json", image_size=args.input_size)
    jsrt = data_folder("jsrt", args.jsrt)
    splits = {s: jsrt_rows(jsrt, s) for s in ("train", "test")}
    images = {s: torch.stack([torch.as_tensor(apply_to_file(preprocessing, {"image": r["image"]})["image"]) for r in rows])
              for s, rows in splits.items()}
    landmarks = [load_landmarks(args.jsrt / "landmarks" / f"{r['id']}.json", ["RL", "LL"]) for r in splits["test"]]
    kwargs = json.loads(args.kwargs)
    result = {"model": args.model, "input_size": args.input_size, "kwargs": kwargs, "weights": args.weights,
              "train_images": len(splits["train"]), "test_images": len(splits["test"])}
    for name, weights in (("pretrained", args.weights), ("random_init", "random")):
        dino = DinoFeatures(args.model, weights=weights, tokens="cls+patch", input_size=args.input_size,
                            model_kwargs=kwargs, seed=args.seed)
        feats = {s: features(dino, x) for s, x in images.items()}
        cls = {s: f[:, 0] for s, f in feats.items()}
        scores = {}
        for label, positive in (("sex", "F"), ("nodule", "1")):
            y = {s: np.array([r[label] == positive for r in rows], dtype=np.float32) for s, rows in splits.items()}
            scores[label] = {
                "knn5_auc": auc(knn_scores(cls["train"], y["train"], cls["test"], 5), y["test"]),
                "knn10_auc": auc(knn_scores(cls["train"], y["train"], cls["test"], 10), y["test"]),
                "linear_probe_auc": auc(linear_probe(cls["train"], y["train"], cls["test"]), y["test"]),
                "test_positives": int(y["test"].sum()),
            }
        grid = int(round((feats["test"].shape[1] - 1) ** 0.5))
        errors = [correspondence_error(feats["test"][:, 1:], landmarks, ref, grid) for ref in range(len(landmarks))]
        scores["lung_landmark_correspondence_px"] = {
            "patch_matching": float(np.mean([e for e, _ in errors])),
            "copy_reference_baseline": float(np.mean([b for _, b in errors])),
            "patch_size_px": 512 / grid,
        }
        result[name] = scores
    result["seconds"] = time.time() - start
    report_json(result, args.out)


if __name__ == "__main__":
    main()
