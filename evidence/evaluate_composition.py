"""Which composition of two concepts works better: mixing their tokens, or summing their guidance directions?

    python -m evidence.evaluate_composition --work_dir runs/corpus_cpu64 --concept_dir runs/kermany/concepts/concepts \\
        --a pneumonia_k1 --b normal_k1 --train runs/kermany/train.csv --test runs/kermany/test.csv \\
        --label label --positive pneumonia --out docs/results/concepts

For weights (w, 1 - w) of concepts A and B, w in --weights, both compositions sample --samples images through the
bundle's `concept` strategy (configs/inference.json; the same seeds for every weight), and a classifier trained on the
real labelled films (the fixed DenseNet recipe) gives each sample's probability of A's class. A composition that
interpolates should move that probability smoothly from B's class (w = 0) to A's (w = 1), and keep the samples near
the real films (FD in pixels to the real test films of both classes together). Writes OUT/composition.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


from bundle.augmentation import binary_labels, train_classifier
from bundle.cli import config_workflow, pyplot
from bundle.concepts import ConceptBank
from bundle.data import preprocessed_images, preprocessed_stack, read_datalist
from bundle.evaluation import extract, feature_space, frechet_distance
from bundle.io import atomic_write
from bundle.writers import to_display


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", required=True)
    parser.add_argument("--concept_dir", required=True)
    parser.add_argument("--a", required=True, help="concept of the positive class")
    parser.add_argument("--b", required=True, help="concept of the other class")
    parser.add_argument("--train", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--label", required=True)
    parser.add_argument("--positive", required=True)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--classifier_iterations", type=int, default=600)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    wf = config_workflow("configs/inference.json", "sample", work_dir=args.work_dir)
    get = wf.parser.get_parsed_content
    generation, generator = get("generation"), get("generator")
    bank = ConceptBank(args.concept_dir, get("autoencoder_path"), get("diffusion_path"), generator.context_dim)
    rows = {s: read_datalist(p) for s, p in (("train", args.train), ("test", args.test))}
    labels = {s: binary_labels(r, args.label, args.positive) for s, r in rows.items()}
    cache = Path(args.work_dir) / "cache"
    images = {s: preprocessed_images(r, generator.preprocessing, cache / f"composition_{s}.pt")["images"].float()
              for s, r in rows.items()}
    classifier = train_classifier(images["train"], torch.as_tensor(labels["train"]), 0, args.classifier_iterations)
    pixels = feature_space("pixels")
    real = extract(pixels, images["test"])
    anchors = rows["test"][: args.samples]
    result = {"a": args.a, "b": args.b, "samples": args.samples, "weights": args.weights, "compositions": {}}
    grid = {}
    work = Path(args.work_dir) / "composition"
    for composition in ("mix", "guidance"):
        points = []
        for w in args.weights:
            weights = {k: v for k, v in ((args.a, w), (args.b, 1.0 - w)) if v > 0}
            out = work / f"{composition}_{w:g}"
            generation(anchors, output_dir=out, strategy="concept", total_samples=args.samples, seed=0, concepts=bank,
                       params={"concept": {"concepts": weights, "composition": composition}})
            samples = preprocessed_stack(read_datalist(out / "manifest.csv"), generator.output_preprocessing).float()
            with torch.no_grad():
                p = torch.sigmoid(classifier(samples).squeeze(1)).numpy()
            points.append({"weight_a": w, "p_a_mean": float(p.mean()), "judged_a": float((p > 0.5).mean()),
                           "fd_pixels_real": frechet_distance(real, extract(pixels, samples))})
            grid[(composition, w)] = samples[:4]
            print(composition, json.dumps(points[-1]), flush=True)
        result["compositions"][composition] = points
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "composition.json", lambda t: Path(t).write_text(json.dumps(result, indent=2)))
    lines = [f"Concepts {args.a} (A) and {args.b} (B), weights (w, 1 - w); {args.samples} samples per cell.", "",
             "| w (weight of A) | " + " | ".join(f"{c}: P(A) / judged A / FD pixels" for c in result["compositions"]) + " |",
             "|---|" + "---|" * len(result["compositions"])]
    for i, w in enumerate(args.weights):
        cells = [f"{pts[i]['p_a_mean']:.2f} / {pts[i]['judged_a']:.2f} / {pts[i]['fd_pixels_real']:.1f}"
                 for pts in result["compositions"].values()]
        lines.append(f"| {w:g} | " + " | ".join(cells) + " |")
    atomic_write(args.out / "composition.md", lambda t: Path(t).write_text("\n".join(lines) + "\n"))
    plt = pyplot()
    fig, axes = plt.subplots(2 * 4, len(args.weights), figsize=(1.3 * len(args.weights), 10.4), squeeze=False)
    for row, composition in enumerate(("mix", "guidance")):
        for col, w in enumerate(args.weights):
            for k in range(4):
                ax = axes[row * 4 + k, col]
                ax.imshow(to_display(grid[(composition, w)][k]), cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if k == 0:
                    ax.set_title(f"{composition}, w={w:g}", fontsize=7)
    fig.tight_layout(pad=0.2)
    atomic_write(args.out / "composition.png", lambda t: fig.savefig(t, dpi=100, format="png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
