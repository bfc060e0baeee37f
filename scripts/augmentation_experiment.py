"""Does synthetic data help a downstream classifier? The DiNO-Diffusion augmentation experiment, and the
synthetic-data showdown between DINO-manifold samples and learned concepts.

For each pool size N and fold, N real training images are drawn (stratified by the label; with --per_class,
N of each class), the generator makes synthetic images from only those N (labels carried from their sources),
and one fixed classifier recipe is trained on real + synthetic at each real:synthetic ratio, and on synthetic
images alone. With --concept_tokens K, a concept per class is also learned from only that class's pool images
(configs/concept.json, generator frozen) and its samples make two more arms: real + concept images, and concept
images alone. AUC is measured on a fixed real test set. Every arm's result is appended to ``results.jsonl`` as
soon as it is known, so an interrupted experiment continues where it stopped (the synthetic images and the
concepts are kept in --out too).

    python -m scripts.augmentation_experiment --train runs/foundation/train.csv --test runs/foundation/test.csv \\
        --label nodule --sizes 10 25 50 150 --ratios 0 1 5 --folds 3 --out runs/augmentation/nodule \\
        -- --work_dir runs/foundation_dino ... (the overrides the generator was trained with)
    python -m scripts.augmentation_experiment --train runs/kermany/train.csv --test runs/kermany/test.csv \\
        --label label --positive pneumonia --per_class --sizes 10 25 50 100 --ratios 0 1 5 --folds 3 \\
        --concept_tokens 8 --out runs/showdown/kermany -- --work_dir runs/corpus_cpu64
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_roc_auc
from monai.networks.nets import DenseNet
from torch import nn
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]

from bundle.cli import config_workflow, parse_overrides, pyplot
from bundle.concepts import ConceptBank, concept_path
from bundle.data import preprocessed_stack, read_datalist
from bundle.errors import BundleInputError
from bundle.io import append_jsonl, atomic_write


def binary_labels(rows: Sequence[Mapping[str, Any]], column: str, positive: str | None = None) -> np.ndarray:
    """0/1 labels from ``column``: numeric 0/1 values as they are, otherwise 1 where the value is ``positive``."""
    if not rows or column not in rows[0]:
        raise BundleInputError(f"Label column '{column}' is not in the datalist (columns: {sorted(rows[0]) if rows else []}).")
    values = [str(r[column]) for r in rows]
    if positive is None:
        if set(values) <= {"0", "1", "0.0", "1.0"}:
            return np.array([int(float(v)) for v in values])
        raise BundleInputError(f"Label column '{column}' has values {sorted(set(values))[:5]}: pass --positive with the "
                               "value that counts as the positive class.")
    labels = np.array([int(v == str(positive)) for v in values])
    if labels.min() == labels.max():
        raise BundleInputError(f"Label column '{column}' has a single class with positive '{positive}': check --positive.")
    return labels


def stratified_pool(labels: np.ndarray, size: int, seed: int, per_class: bool = False) -> list[int]:
    """``size`` indices drawn without replacement, keeping the class ratio (at least one of each class); with
    ``per_class``, ``size`` of each class (all of a class that has fewer)."""
    rng = np.random.default_rng(seed)
    positives, negatives = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    if per_class:
        picked = np.concatenate([rng.choice(c, min(size, len(c)), replace=False) for c in (positives, negatives)])
        return sorted(int(i) for i in picked)
    if size >= len(labels):
        return list(range(len(labels)))
    n_pos = int(np.clip(round(size * len(positives) / len(labels)), 1, size - 1))
    picked = np.concatenate([rng.choice(positives, n_pos, replace=False), rng.choice(negatives, size - n_pos, replace=False)])
    return sorted(int(i) for i in picked)


def make_classifier() -> nn.Module:
    """The fixed downstream network: a small MONAI DenseNet on one grey channel, one logit."""
    return DenseNet(spatial_dims=2, in_channels=1, out_channels=1, init_features=16, growth_rate=8,
                    block_config=(3, 3, 3), bn_size=2)


def classic_augmentation(seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The augmentation a practitioner applies anyway, as one fixed recipe of MONAI transforms (set before any test
    result was seen): a small random affine (rotation up to 0.1 rad, scale and translation up to 10% and 5%), intensity
    scaling (+-10%), contrast (gamma 0.8-1.25) and Gaussian noise (std 0.02), each image drawn on its own. No flips:
    radiographs are not mirror-symmetric. Returns a function of a ``(B, 1, H, W)`` batch in [0, 1]."""
    from monai.transforms import (Compose, RandAdjustContrast, RandAffine, RandGaussianNoise, RandScaleIntensity,
                                  ScaleIntensityRange)

    def recipe(size: int) -> Compose:
        return Compose([
            RandAffine(prob=0.8, rotate_range=0.1, scale_range=0.1, translate_range=0.05 * size, padding_mode="border"),
            RandScaleIntensity(factors=0.1, prob=0.5),
            RandAdjustContrast(prob=0.5, gamma=(0.8, 1.25)),
            RandGaussianNoise(prob=0.3, std=0.02),
            ScaleIntensityRange(0.0, 1.0, 0.0, 1.0, clip=True),
        ]).set_random_state(seed=seed)

    transforms: dict[int, Compose] = {}

    def augment(batch: torch.Tensor) -> torch.Tensor:
        size = batch.shape[-1]
        transform = transforms.setdefault(size, recipe(size))
        return torch.stack([torch.as_tensor(transform(image)) for image in batch.cpu()]).to(batch.device)

    return augment


def train_classifier(images: torch.Tensor, labels: torch.Tensor, seed: int, iterations: int = 300,
                     batch_size: int = 32, lr: float = 1e-3, device: torch.device | str = "cpu",
                     augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> nn.Module:
    """The same recipe every time: AdamW, a fixed number of iterations, class-balanced BCE and no early stopping
    (no validation set is spent); ``augment`` (e.g. :func:`classic_augmentation`) changes every batch it trains
    on, the classic-augmentation baseline; without it, no augmentation."""
    torch.manual_seed(seed)
    model = make_classifier().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    positives = float(labels.sum())
    pos_weight = torch.tensor((len(labels) - positives) / max(positives, 1.0), device=device)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(iterations):
        index = torch.randint(len(images), (min(batch_size, len(images)),), generator=generator)
        x, y = images[index], labels[index].float().to(device)
        x = (augment(x) if augment is not None else x).to(device)
        loss = loss_fn(model(x).squeeze(1), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def auc(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device | str = "cpu") -> float:
    scores = torch.cat([model(images[i : i + 64].to(device)).squeeze(1).cpu() for i in range(0, len(images), 64)])
    return float(compute_roc_auc(scores, labels.float()))


def _done(path: Path) -> dict[tuple, dict]:
    if not path.exists():
        return {}
    results = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            results[(r["size"], r["ratio"], r["fold"], r["arm"])] = r
    return results


def concept_learner(overrides: Mapping[str, Any], autoencoder_path: str, diffusion_path: str, context_dim: int,
                    **settings: Any) -> Callable[[Sequence[dict], str, Path], ConceptBank]:
    """``learn(rows, name, folder)``: learns concept ``name`` from ``rows`` into ``folder`` with configs/concept.json
    (the generator of the two model files frozen; ``settings`` such as concept_tokens, concept_steps), keeps a
    concept already there, and returns the folder's ConceptBank."""
    model_files = {"autoencoder_path": str(autoencoder_path), "diffusion_path": str(diffusion_path)}

    def learn(rows: Sequence[dict], name: str, folder: Path) -> ConceptBank:
        if not concept_path(folder, name).is_file():
            folder.mkdir(parents=True, exist_ok=True)
            datalist = folder / f"{name}.csv"
            atomic_write(datalist, lambda tmp: Path(tmp).write_text("image\n" + "".join(f"{r['image']}\n" for r in rows)))
            config_workflow("configs/concept.json", "learn_concept", **{**overrides, **settings, **model_files},
                            concept_images=str(datalist), concept_name=name, concept_dir=str(folder)).run()
        return ConceptBank(folder, autoencoder_path, diffusion_path, context_dim)

    return learn


def concept_samples(generation: Callable[..., list[dict[str, Any]]], learn: Callable[..., Any], pool_rows: Sequence[dict],
                    label: str, positive: str | None, count: int, out: Path, seed: int) -> list[dict[str, Any]]:
    """Learn one concept per class from that class's pool rows only (``learn(rows, name, folder)``), then sample
    each concept in proportion to its class's share of the pool; the manifest rows carry the class label."""
    classes = binary_labels(pool_rows, label, positive)
    rows = []
    for cls in (1, 0):
        members = [r for r, y in zip(pool_rows, classes) if y == cls]
        name = f"class{cls}"
        bank = learn(members, name, out / "concepts")
        n = int(round(count * len(members) / len(pool_rows)))
        generation(members, output_dir=out / name, strategy="concept", total_samples=n, label_columns=[label],
                   params={"concept": {"concepts": {name: 1.0}}}, seed=seed + 50000 * cls, concepts=bank)
        rows += read_datalist(out / name / "manifest.csv")
    order = np.random.default_rng(seed).permutation(len(rows))  # the first k of them mix both classes
    return [rows[i] for i in order]


def run_experiment(
    generation: Callable[..., list[dict[str, Any]]],
    train_rows: Sequence[dict[str, Any]],
    test_rows: Sequence[dict[str, Any]],
    preprocessing: Callable,
    label: str,
    output_dir: str | os.PathLike,
    positive: str | None = None,
    sizes: Sequence[int] = (10, 25, 50),
    ratios: Sequence[float] = (0, 1, 5, 10),
    folds: int = 3,
    synthetic_only: bool = True,
    strategy: str | Mapping[str, float] = "reconstruction",
    iterations: int = 300,
    device: torch.device | str = "cpu",
    per_class: bool = False,
    learn_concept: Callable[..., Any] | None = None,
    classic: bool = False,
) -> list[dict[str, Any]]:
    """Run (or continue) the experiment; returns one record per arm and writes results.jsonl/.md and a plot.
    ``learn_concept(rows, name, folder)`` (learns a concept, returns the ConceptBank of ``folder``) adds the
    concept arms; ``classic`` adds real + classic augmentation (:func:`classic_augmentation`) and, at every
    ratio above 0, real + synthetic with the same classic augmentation on every batch."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    y_train = binary_labels(train_rows, label, positive)
    y_test = torch.as_tensor(binary_labels(test_rows, label, positive))
    x_test = preprocessed_stack(test_rows, preprocessing)
    x_train = preprocessed_stack(train_rows, preprocessing)
    results_path = output_dir / "results.jsonl"
    done = _done(results_path)
    sizes = sorted({min(int(s), len(train_rows)) for s in sizes})
    max_ratio = max(ratios)
    arms = [(n, r, f, "real+synthetic" if r > 0 else "real") for n in sizes for f in range(folds) for r in ratios]
    if learn_concept is not None:
        arms += [(n, r, f, "real+concept") for n in sizes for f in range(folds) for r in ratios if r > 0]
    if classic:
        arms += [(n, r, f, "classic+synthetic" if r > 0 else "real+classic") for n in sizes for f in range(folds)
                 for r in ratios]
    if synthetic_only and max_ratio > 0:
        arms += [(n, max_ratio, f, "synthetic") for n in sizes for f in range(folds)]
        if learn_concept is not None:
            arms += [(n, max_ratio, f, "concept") for n in sizes for f in range(folds)]
    bar = tqdm(total=len(arms), desc=f"augmentation ({label})", dynamic_ncols=True)
    bar.update(sum(1 for a in arms if a in done))
    for n in sizes:
        for fold in range(folds):
            todo = [a for a in arms if a[0] == n and a[2] == fold and a not in done]
            if not todo:
                continue
            pool = stratified_pool(y_train, n, seed=1000 * fold + n, per_class=per_class)
            fold_dir = output_dir / f"n{n:03d}_fold{fold}"
            pool_rows = [{**train_rows[i], label: str(train_rows[i][label])} for i in pool]
            synthetic: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            if any(a[3] in ("real+synthetic", "synthetic", "classic+synthetic") for a in todo):
                made, need = fold_dir / "synthetic" / "manifest.csv", int(round(max_ratio * len(pool)))
                if not made.is_file() or len(read_datalist(made)) < need:  # made once per fold, reused by every arm
                    generation(pool_rows, output_dir=fold_dir / "synthetic", strategy=strategy, total_samples=need,
                               label_columns=[label], seed=fold * 100000)
                manifest = read_datalist(made)
                synthetic["synthetic"] = (preprocessed_stack(manifest, preprocessing),
                                          torch.as_tensor(binary_labels(manifest, label, positive)))
            if any(a[3] in ("real+concept", "concept") for a in todo):
                manifest = concept_samples(generation, learn_concept, pool_rows, label, positive,
                                           int(round(max_ratio * len(pool))), fold_dir / "concept", seed=fold * 100000)
                synthetic["concept"] = (preprocessed_stack(manifest, preprocessing),
                                        torch.as_tensor(binary_labels(manifest, label, positive)))
            for size, ratio, f, arm in todo:
                count = int(round(ratio * len(pool)))
                parts_x, parts_y = [], []
                if arm in ("real", "real+synthetic", "real+concept", "real+classic", "classic+synthetic"):
                    parts_x.append(x_train[pool])
                    parts_y.append(torch.as_tensor(y_train[pool]))
                if arm not in ("real", "real+classic"):
                    x_syn, y_syn = synthetic[arm.removeprefix("real+").removeprefix("classic+")]
                    parts_x.append(x_syn[:count])
                    parts_y.append(y_syn[:count])
                x, y = torch.cat(parts_x), torch.cat(parts_y)
                augment = classic_augmentation(seed=fold) if arm in ("real+classic", "classic+synthetic") else None
                model = train_classifier(x, y, seed=fold, iterations=iterations, device=device, augment=augment)
                real = len(pool) if arm.startswith(("real", "classic")) else 0
                record = {"size": size, "ratio": ratio, "fold": f, "arm": arm, "label": label, "real_images": real,
                          "per_class": per_class, "synthetic_images": 0 if arm in ("real", "real+classic") else count,
                          "test_auc": auc(model, x_test, y_test, device),
                          "test_images": len(test_rows), "iterations": iterations}
                append_jsonl(results_path, record)
                done[(size, ratio, f, arm)] = record
                bar.update(1)
    bar.close()
    records = [done[a] for a in arms]
    write_report(records, output_dir, label)
    return records


def write_report(records: Sequence[Mapping[str, Any]], output_dir: Path, label: str) -> None:
    """``results.md`` and ``augmentation_auc.png`` in ``output_dir`` from the arms' records."""
    summary = summarise(records)
    atomic_write(output_dir / "results.md", lambda tmp: Path(tmp).write_text(markdown(summary, label)))
    plot(summary, output_dir / "augmentation_auc.png", label)


ARM_ORDER = ("real", "real+classic", "real+synthetic", "classic+synthetic", "real+concept", "synthetic", "concept")


def summarise(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation of the test AUC over folds, per (size, arm, ratio), in the order of ARM_ORDER."""
    groups: dict[tuple, list[float]] = {}
    for r in records:
        groups.setdefault((r["size"], ARM_ORDER.index(r["arm"]), r["ratio"]), []).append(r["test_auc"])
    return [{"size": s, "arm": ARM_ORDER[a], "ratio": q, "auc_mean": float(np.mean(v)), "auc_std": float(np.std(v)),
             "folds": len(v)} for (s, a, q), v in sorted(groups.items())]


def arm_name(row: Mapping[str, Any]) -> str:
    if row["arm"] == "real":
        return "real only"
    if row["arm"] == "synthetic":
        return f"synthetic only (1:{row['ratio']:g} of N)"
    if row["arm"] == "concept":
        return f"concept images only (1:{row['ratio']:g} of N)"
    if row["arm"] == "real+concept":
        return f"real + concept images 1:{row['ratio']:g}"
    if row["arm"] == "real+classic":
        return "real + classic augmentation"
    if row["arm"] == "classic+synthetic":
        return f"real + synthetic 1:{row['ratio']:g} + classic augmentation"
    return f"real + synthetic 1:{row['ratio']:g}"


def markdown(summary: Sequence[Mapping[str, Any]], label: str) -> str:
    arms = list(dict.fromkeys(arm_name(r) for r in summary))
    sizes = sorted({r["size"] for r in summary})
    most = max(r["folds"] for r in summary)
    lines = [f"Test AUC for `{label}` (mean ± std over {most} folds unless a cell says otherwise)", "",
             "| arm | " + " | ".join(f"N={s}" for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for arm in arms:
        cells = []
        for s in sizes:
            hit = [r for r in summary if r["size"] == s and arm_name(r) == arm]
            if not hit:
                cells.append("")
                continue
            n = hit[0]["folds"]
            folds = f" ({n} fold{'s' if n > 1 else ''})" if n != most else ""
            cells.append(f"{hit[0]['auc_mean']:.3f} ± {hit[0]['auc_std']:.3f}{folds}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: Sequence[Mapping[str, Any]], path: Path, label: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    colours = plt.get_cmap("tab20").colors  # more arms than the default cycle has colours
    for k, arm in enumerate(dict.fromkeys(arm_name(r) for r in summary)):
        rows = sorted((r for r in summary if arm_name(r) == arm), key=lambda r: r["size"])
        sizes = [r["size"] for r in rows]
        alone = arm.endswith("of N)")  # synthetic images without the real ones
        ax.errorbar(sizes, [r["auc_mean"] for r in rows], yerr=[r["auc_std"] for r in rows], marker="o", capsize=3,
                    label=arm, color="black" if arm == "real only" else colours[k % len(colours)],
                    linestyle="--" if alone else "-", linewidth=2.0 if arm == "real only" else 1.2)
    ax.axhline(0.5, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("N, the real pool size (log scale)")
    ax.set_ylabel(f"test AUC ({label})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, required=True, help="labelled training datalist (the pool to draw from)")
    parser.add_argument("--test", type=Path, required=True, help="labelled real test datalist")
    parser.add_argument("--label", required=True, help="label column, e.g. nodule or sex")
    parser.add_argument("--positive", help="value of the positive class when the column is not 0/1 (e.g. M)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0, 1, 5, 10])
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--no_synthetic_only", action="store_true")
    parser.add_argument("--strategy", default="{'reconstruction': 1, 'interpolation': 1, 'perturbation': 1}",
                        help="sampling strategy or mix (Python literal)")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--per_class", action="store_true", help="N images of each class (default: N in all)")
    parser.add_argument("--classic", action="store_true", help="add real + classic augmentation (MONAI affine, "
                        "intensity, contrast, noise) and real + synthetic + classic augmentation: the baseline to beat")
    parser.add_argument("--concept_tokens", type=int, help="also learn a concept of K tokens per class and fold "
                        "(configs/concept.json) and add the concept arms")
    parser.add_argument("--concept_steps", type=int, default=300)
    parser.add_argument("--concept_init", default="mean", choices=["mean", "random"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--copy_to", type=Path, help="also copy results.md/png there (e.g. docs/results)")
    parser.add_argument("--report_only", action="store_true", help="train nothing: write results.md and the plot "
                        "from every arm in <out>/results.jsonl (e.g. while a run is still adding arms)")
    parser.add_argument("overrides", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    overrides = parse_overrides(args.overrides)
    os.chdir(ROOT)
    if args.report_only:
        records = list(_done(args.out / "results.jsonl").values())
        if not records:
            raise SystemExit(f"error: no results in {args.out / 'results.jsonl'}: run the experiment first.")
        write_report(records, args.out, args.label)
        print((args.out / "results.md").read_text())
        return
    wf = config_workflow("configs/inference.json", "sample", **overrides)
    strategy = ast.literal_eval(args.strategy) if args.strategy.strip().startswith("{") else args.strategy
    get = wf.parser.get_parsed_content
    learner = None
    if args.concept_tokens:
        learner = concept_learner(overrides, get("autoencoder_path"), get("diffusion_path"), get("generator").context_dim,
                                  concept_tokens=args.concept_tokens, concept_steps=args.concept_steps,
                                  concept_init=args.concept_init)
    start = time.perf_counter()
    run_experiment(wf.parser.get_parsed_content("generation"), read_datalist(args.train), read_datalist(args.test),
                   wf.parser.get_parsed_content("preprocessing"), args.label, args.out, positive=args.positive,
                   sizes=args.sizes, ratios=args.ratios, folds=args.folds, synthetic_only=not args.no_synthetic_only,
                   strategy=strategy, iterations=args.iterations, device=get("device"), per_class=args.per_class,
                   learn_concept=learner, classic=args.classic)
    print(f"wall time {time.perf_counter() - start:.0f} s (this invocation)")
    print((args.out / "results.md").read_text())
    if args.copy_to:
        args.copy_to.mkdir(parents=True, exist_ok=True)
        for name in ("results.md", "augmentation_auc.png", "results.jsonl"):
            shutil.copy(args.out / name, args.copy_to / f"augmentation_{args.label}_{name}".replace("_augmentation_auc", ""))


if __name__ == "__main__":
    main()
