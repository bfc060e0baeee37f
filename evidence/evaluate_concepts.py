"""Do learned concepts make images of their concept? Concept tokens against the untrained mean embedding.

    python -m evidence.evaluate_concepts --work_dir runs/corpus_cpu64 --train runs/corpus/kermany_train.csv \\
        --test runs/corpus/kermany_test.csv --label label --positive pneumonia --tokens 1 8 64 \\
        --out docs/results/concepts

For each class value of ``--label`` (the positive one and the other) and each token count K, a concept is learned
with ``configs/concept.json`` (generator frozen) from up to ``--concept_images`` training images of that class, and
``--samples`` images are generated from it. The baseline is the untrained condition those images already give: their
mean DINO embedding. A classifier trained on the real labelled training images (the fixed DenseNet recipe of
bundle/augmentation.py) judges every generated image: the fraction judged to be the concept, beside the
same fraction for the real test images of that class. Fréchet distances (pixels 32x32, and the generator's DINO
space) of the samples to the real test images of their own class and of the other class say whether they sit
nearer their own. Writes OUT/concepts.json, OUT/concepts.md and OUT/concept_samples.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from bundle.augmentation import auc, binary_labels, train_classifier
from bundle.cli import config_workflow, pyplot
from bundle.concepts import load_concept
from bundle.data import preprocessed_images, read_datalist
from bundle.diffusion import sample_latents, seeded_noise
from bundle.evaluation import extract, feature_space, frechet_distance
from bundle.io import atomic_write
from bundle.models import load_generator, model_path
from bundle.writers import to_display


@torch.no_grad()
def generate(generator, tokens: torch.Tensor, count: int, seed: int, steps: int, guidance: float) -> torch.Tensor:
    scheduler = generator.sampler("dpmpp_2m")
    out = []
    for start in range(0, count, 32):
        n = min(32, count - start)
        noise = seeded_noise(range(seed + start, seed + start + n), generator.latent_shape, "cpu")
        latents = sample_latents(generator.unet, scheduler, tokens.float().expand(n, -1, -1), noise, steps, guidance)
        out.append(generator.codec.decode(latents).clamp(0, 1))
    return torch.cat(out)


@torch.no_grad()
def probabilities(model, images: torch.Tensor) -> np.ndarray:
    return torch.cat([torch.sigmoid(model(images[i : i + 64]).squeeze(1)) for i in range(0, len(images), 64)]).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", required=True)
    parser.add_argument("--train", required=True, help="labelled training datalist (concept images and classifier)")
    parser.add_argument("--test", required=True, help="labelled test datalist")
    parser.add_argument("--label", required=True)
    parser.add_argument("--positive", required=True)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--concept_images", type=int, default=100)
    parser.add_argument("--concept_steps", type=int, default=600)
    parser.add_argument("--init", default="mean", choices=["mean", "random"], help="how the concept tokens start")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance_scale", type=float, default=3.0)
    parser.add_argument("--classifier_iterations", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work_dir
    generator = load_generator(model_path(work, "autoencoder"), model_path(work, "diffusion"), bundle_root=ROOT)
    pre = generator.preprocessing
    rows = {s: read_datalist(p) for s, p in (("train", args.train), ("test", args.test))}
    labels = {s: binary_labels(r, args.label, args.positive) for s, r in rows.items()}
    images = {s: preprocessed_images(r, pre, args.out / ".cache" / f"{s}.pt")["images"].float() for s, r in rows.items()}
    started = time.perf_counter()
    classifier = train_classifier(images["train"], torch.as_tensor(labels["train"]), args.seed, args.classifier_iterations)
    result: dict = {"work_dir": work, "label": args.label, "positive": args.positive, "init": args.init,
                    "concept_steps": args.concept_steps,
                    "classifier": {"iterations": args.classifier_iterations, "train_images": len(labels["train"]),
                                   "test_auc": auc(classifier, images["test"], torch.as_tensor(labels["test"]))},
                    "concepts": []}
    pixels, dino = feature_space("pixels"), feature_space("dino", generator.dino)
    real = {(s, c): images[s][torch.as_tensor(labels[s] == c)] for s in ("train", "test") for c in (0, 1)}
    feats = {key: (extract(pixels, x), extract(dino, x)) for key, x in real.items() if key[0] == "test"}
    values = {1: args.positive, 0: next(str(r[args.label]) for r, y in zip(rows["train"], labels["train"]) if y == 0)}
    grid = []
    for cls in (1, 0):
        members = [r for r, y in zip(rows["train"], labels["train"]) if y == cls]
        pick = np.random.default_rng(args.seed).choice(len(members), min(args.concept_images, len(members)), replace=False)
        concept_rows = [members[i] for i in sorted(pick)]
        datalist = args.out / f"concept_{cls}.csv"
        datalist.write_text("image\n" + "".join(f"{r['image']}\n" for r in concept_rows))
        concept_images = preprocessed_images(concept_rows, pre, args.out / ".cache" / f"concept_{cls}.pt")["images"].float()
        with torch.no_grad():
            mean_tokens = torch.cat([generator.dino(concept_images[i : i + 64]) for i in range(0, len(concept_images), 64)]).mean(0)
        arms = [("mean embedding (untrained)", mean_tokens, None)]
        for k in args.tokens:
            name = f"{values[cls]}_k{k}"
            t0 = time.perf_counter()
            config_workflow("configs/concept.json", "learn_concept", work_dir=work, concept_images=str(datalist),
                            concept_name=name, concept_dir=str(args.out / "concepts"), concept_tokens=k,
                            concept_steps=args.concept_steps, concept_init=args.init, seed=args.seed).run()
            tokens, info = load_concept(args.out / "concepts" / f"{name}.safetensors")
            arms.append((f"concept K={k}", tokens, {**{x: info.get(x) for x in ("steps", "final_loss", "num_tokens")},
                                                     "seconds": round(time.perf_counter() - t0, 1),
                                                     "bytes": (args.out / "concepts" / f"{name}.safetensors").stat().st_size}))
        for arm, tokens, info in arms:
            samples = generate(generator, tokens, args.samples, args.seed + 1000 * cls, args.steps, args.guidance_scale)
            p = probabilities(classifier, samples)
            judged = float(np.mean(p > 0.5) if cls == 1 else np.mean(p <= 0.5))
            px, dn = extract(pixels, samples), extract(dino, samples)
            own, other = feats[("test", cls)], feats[("test", 1 - cls)]
            entry = {"class": values[cls], "arm": arm, "judged_as_concept": judged,
                     "fd_pixels_own": frechet_distance(own[0], px), "fd_pixels_other": frechet_distance(other[0], px),
                     "fd_dino_own": frechet_distance(own[1], dn), "fd_dino_other": frechet_distance(other[1], dn),
                     **({"learning": info} if info else {})}
            result["concepts"].append(entry)
            grid.append((f"{values[cls]}: {arm}", samples[:6]))
            print(json.dumps(entry), flush=True)
        p_real = probabilities(classifier, real[("test", cls)])
        result["concepts"].append({"class": values[cls], "arm": "real test images",
                                   "judged_as_concept": float(np.mean(p_real > 0.5) if cls == 1 else np.mean(p_real <= 0.5))})
    result["seconds"] = round(time.perf_counter() - started, 1)
    atomic_write(args.out / "concepts.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
    lines = [f"Classifier test AUC on real images: {result['classifier']['test_auc']:.3f}.", "",
             "| class | condition | judged as the concept | FD pixels own / other | FD DINO own / other | learning |",
             "|---|---|---|---|---|---|"]
    for e in result["concepts"]:
        fd = (f"{e['fd_pixels_own']:.2f} / {e['fd_pixels_other']:.2f} | {e['fd_dino_own']:.2f} / {e['fd_dino_other']:.2f}"
              if "fd_pixels_own" in e else " | ")
        learn = e.get("learning")
        lines.append(f"| {e['class']} | {e['arm']} | {e['judged_as_concept']:.2f} | {fd} | "
                     + (f"{learn['steps']} steps, {learn['seconds']} s, {learn['bytes']} bytes" if learn else "") + " |")
    atomic_write(args.out / "concepts.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    plt = pyplot()
    fig, axes = plt.subplots(len(grid), 6, figsize=(7.5, 1.35 * len(grid)), squeeze=False)
    for row, (title, samples) in enumerate(grid):
        for col in range(6):
            ax = axes[row, col]
            if col < len(samples):
                ax.imshow(to_display(samples[col]), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(title, fontsize=6, rotation=0, ha="right", va="center")
    fig.tight_layout(pad=0.2)
    atomic_write(args.out / "concept_samples.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
