"""Does synthetic data help a downstream classifier? The DiNO-Diffusion augmentation experiment, as a library
(the run ID ``augment`` of configs/augmentation.json and ``scripts/augmentation_experiment.py`` call it).

For each pool size N and fold, N real training images are drawn (stratified by the label; with ``per_class``, N of
each class), the generator makes synthetic images from only those N (labels carried from their sources), and one
fixed classifier recipe is trained per arm: real only; real + classic augmentation (the baseline a practitioner
applies anyway); real + synthetic (DINO-manifold samples) and real + concept samples (one concept per class
learned from the pool's images only, generator frozen) at each real:synthetic ratio; classic augmentation on
top of either synthetic kind; or synthetic images alone. AUC is measured on a fixed real test set, and every
arm's record (with its per-image test scores) is appended to ``results.jsonl`` as soon as it is known, so an
interrupted experiment continues where it stopped; a fold's synthetic images and concepts are made once and
reused by every arm and ratio. The report gives, per cell, the paired difference to a reference arm (same fold,
same real films) with a bootstrap 95% interval over folds and test films, and the smallest difference the
design could have detected.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_roc_auc
from monai.networks.nets import DenseNet
from torch import nn
from tqdm import tqdm

from .cli import config_workflow, pyplot
from .concepts import ConceptBank, concept_path
from .data import content_id, preprocessed_stack, read_datalist
from .errors import BundleInputError
from .io import append_jsonl, atomic_write
from .performance import autocast, autocast_dtype, precision_name

logger = logging.getLogger(__name__)

def binary_labels(rows: Sequence[Mapping[str, Any]], column: str, positive: str | None = None,
                  what: str = "the datalist") -> np.ndarray:
    """0/1 labels from ``column``: numeric 0/1 values as they are, otherwise 1 where the value is ``positive``.
    Both classes must be there (pools, classifiers and AUC need them); ``what`` names the rows in the message."""
    if not rows or column not in rows[0]:
        raise BundleInputError(f"Label column '{column}' is not in the datalist (columns: {sorted(rows[0]) if rows else []}).")
    values = [str(r[column]) for r in rows]
    if positive is None:
        if not set(values) <= {"0", "1", "0.0", "1.0"}:
            raise BundleInputError(f"Label column '{column}' has values {sorted(set(values))[:5]}: pass --positive with "
                                   "the value that counts as the positive class.")
        labels = np.array([int(float(v)) for v in values])
    else:
        labels = np.array([int(v == str(positive)) for v in values])
    if labels.min() == labels.max():
        fix = (f"check --positive '{positive}'" if positive is not None else "give a datalist with films of each")
        raise BundleInputError(f"Every row of {what} is {'positive' if labels[0] else 'negative'} in label column "
                               f"'{column}': pools, classifiers and AUC need both classes, so {fix}.")
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
                     augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     dtype: torch.dtype | None = None) -> nn.Module:
    """The same recipe every time: AdamW, a fixed number of iterations, class-balanced BCE and no early stopping
    (no validation set is spent); ``augment`` (e.g. :func:`classic_augmentation`) changes every batch it trains
    on, the classic-augmentation baseline; without it, no augmentation. ``dtype`` (bf16): the forward pass under
    autocast, the loss and the weights in float32."""
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
        with autocast(device, dtype):
            logits = model(x).squeeze(1)
        loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def classifier_scores(model: nn.Module, images: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """The classifier's logit for every image, in batches of 64."""
    return torch.cat([model(images[i : i + 64].to(device)).squeeze(1).float().cpu() for i in range(0, len(images), 64)])


def auc(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device | str = "cpu") -> float:
    return float(compute_roc_auc(classifier_scores(model, images, device), labels.float()))


def _done(path: Path, precision: str | None = None) -> dict[tuple, dict]:
    """The cells of ``results.jsonl``, the last row of each (the classifier on disk), or with ``precision`` only those
    trained in it (rows from before the setting existed: float32)."""
    if not path.exists():
        return {}
    results = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if precision is None or r.get("precision", "float32") == precision:
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


def samples_once(generation: Callable[..., list[dict[str, Any]]], rows: Sequence[dict], out: Path, count: int,
                 generator: str | None = None, **settings: Any) -> list[dict[str, Any]]:
    """The first ``count`` rows of ``<out>/manifest.csv``, generating from ``rows`` only when fewer are there: a fold's
    synthetic images are made once and reused by every arm and ratio (and by arms added later). With ``generator``
    (:func:`generator_id`), images another generator made are made again."""
    made, made_by = out / "manifest.csv", out / "generator.txt"
    if generator and made.is_file() and (not made_by.is_file() or made_by.read_text() != generator):
        made.unlink()
    if not made.is_file() or len(read_datalist(made)) < count:
        generation(rows, output_dir=out, total_samples=count, **settings)
        if generator:
            atomic_write(made_by, lambda tmp: Path(tmp).write_text(generator))
    return read_datalist(made)[:count]


def generator_id(*model_files: str | os.PathLike) -> str:
    """The generator by content: ``name:sha256[:16]`` of each model file. A results row of a synthetic arm records
    it, so rows and images of a generator trained again are made again rather than mixed with the new ones."""
    return content_id(*model_files)


def concept_samples(generation: Callable[..., list[dict[str, Any]]], learn: Callable[..., Any], pool_rows: Sequence[dict],
                    label: str, positive: str | None, count: int, out: Path, seed: int,
                    generator: str | None = None) -> list[dict[str, Any]]:
    """Learn one concept per class from that class's pool rows only (``learn(rows, name, folder)``), then sample
    each concept in proportion to its class's share of the pool; the manifest rows carry the class label."""
    classes = binary_labels(pool_rows, label, positive)
    learned_by = out / "generator.txt"  # a concept is learned against one frozen generator: another one learns anew
    if generator and (out / "concepts").exists() and (not learned_by.is_file() or learned_by.read_text() != generator):
        shutil.rmtree(out / "concepts")
    if generator:
        (out / "concepts").mkdir(parents=True, exist_ok=True)
        atomic_write(learned_by, lambda tmp: Path(tmp).write_text(generator))
    rows = []
    for cls in (1, 0):
        members = [r for r, y in zip(pool_rows, classes) if y == cls]
        name = f"class{cls}"
        bank = learn(members, name, out / "concepts")
        n = int(round(count * len(members) / len(pool_rows)))
        rows += samples_once(generation, members, out / name, n, generator, strategy="concept", label_columns=[label],
                             params={"concept": {"concepts": {name: 1.0}}}, seed=seed + 50000 * cls, concepts=bank)
    order = np.random.default_rng(seed).permutation(len(rows))  # the first k of them mix both classes
    return [rows[i] for i in order]


ARMS = {  # arm: (trains on the real pool, classic augmentation on every batch, synthetic kind or None)
    "real": (True, False, None),
    "real+classic": (True, True, None),
    "real+synthetic": (True, False, "synthetic"),
    "classic+synthetic": (True, True, "synthetic"),
    "real+concept": (True, False, "concept"),
    "classic+concept": (True, True, "concept"),
    "synthetic": (False, False, "synthetic"),
    "concept": (False, False, "concept"),
}
ARM_ORDER = tuple(ARMS)


def _per_size(value: int | Mapping[Any, int], size: int, what: str) -> int:
    """``value`` itself, or from a mapping ``{N: value}`` the value of the smallest listed N at or above ``size``
    (beyond the largest listed N, its value): ``{25: 5, 100: 3}`` is 5 up to N = 25 and 3 above."""
    if not isinstance(value, Mapping):
        return int(value)
    try:
        table = sorted((int(k), int(v)) for k, v in value.items())
    except (TypeError, ValueError):
        table = []
    if not table:
        raise BundleInputError(f"{what} {value!r} is not a number or a mapping of pool sizes to numbers, e.g. "
                               "{25: 5, 100: 3}.")
    return next((v for k, v in table if size <= k), table[-1][1])


def experiment_cells(arms: Sequence[str], sizes: Sequence[int], ratios: Sequence[float], folds: int | Mapping,
                     ratio_max_size: Mapping[Any, int] | None = None,
                     arm_max_size: Mapping[str, int] | None = None) -> list[tuple[int, float, int, str]]:
    """Every (N, ratio, fold, arm) the experiment trains: the arms without synthetic images at ratio 0; real plus
    synthetic at every ratio above 0 that is allowed at that N (``ratio_max_size``: ratio -> the largest N it is
    used at, e.g. ``{50: 25}``); synthetic images alone at the largest allowed ratio. ``arm_max_size``: arm -> the
    largest N it runs at (e.g. ``{"real+concept": 10}``: an arm whose images are costly only for small pools)."""
    unknown = [a for a in [*arms, *(arm_max_size or {})] if a not in ARMS]
    if unknown:
        raise BundleInputError(f"Unknown augmentation arm(s) {unknown}: use any of {list(ARMS)}.")
    try:
        arm_caps = {str(k): int(v) for k, v in (arm_max_size or {}).items()}
    except (AttributeError, TypeError, ValueError):
        raise BundleInputError(f"arm_max_size {arm_max_size!r} is not a mapping of arms to the largest pool size each "
                               "runs at, e.g. {'real+concept': 10}.") from None
    try:
        caps = {float(k): int(v) for k, v in (ratio_max_size or {}).items()}
    except (AttributeError, TypeError, ValueError):
        raise BundleInputError(f"ratio_max_size {ratio_max_size!r} is not a mapping of ratios to the largest pool "
                               "size each is used at, e.g. {50: 25}.") from None
    cells = []
    for n in sizes:
        allowed = [float(r) for r in sorted(set(ratios)) if float(r) > 0 and n <= caps.get(float(r), n)]
        for arm in sorted(dict.fromkeys(arms), key=ARM_ORDER.index):
            if n > arm_caps.get(arm, n):
                continue
            real, _, kind = ARMS[arm]
            arm_ratios = [0.0] if kind is None else allowed if real else allowed[-1:]
            cells += [(n, r, f, arm) for r in arm_ratios for f in range(_per_size(folds, n, "folds"))]
    return cells


def fold_pool(labels: np.ndarray, size: int, fold: int, per_class: bool = False) -> list[int]:
    """The real films of pool size ``size`` and ``fold`` (:func:`stratified_pool` with the fold's own seed)."""
    return stratified_pool(labels, size, seed=1000 * fold + size, per_class=per_class)


def check_concept_pools(cells: Sequence[tuple[int, float, int, str]], labels: np.ndarray, per_class: bool,
                        minimum: int) -> None:
    """Refuse, before any work, a concept cell whose pool has fewer than ``minimum`` films of a class (one concept
    is learned per class from the pool's films of it)."""
    for n, fold in sorted({(c[0], c[2]) for c in cells if ARMS[c[3]][2] == "concept"}):
        pool_labels = labels[fold_pool(labels, n, fold, per_class)]
        fewest = min(int((pool_labels == 1).sum()), int((pool_labels == 0).sum()))
        if fewest < minimum:
            raise BundleInputError(
                f"The concept arms at N = {n} (fold {fold}) would learn a concept from {fewest} films of one class, "
                f"fewer than augmentation_concept_min_images = {minimum}: leave them out at this N with arm_max_size, "
                "draw N of each class with per_class, or lower the minimum.")


def run_experiment(
    generation: Callable[..., list[dict[str, Any]]],
    train_rows: Sequence[dict[str, Any]],
    test_rows: Sequence[dict[str, Any]],
    preprocessing: Callable,
    label: str,
    output_dir: str | os.PathLike,
    positive: str | None = None,
    sizes: Sequence[int] = (10, 25, 50),
    ratios: Sequence[float] = (1, 5, 10),
    folds: int | Mapping[Any, int] = 3,
    arms: Sequence[str] = ("real", "real+classic", "real+synthetic"),
    strategy: str | Mapping[str, float] = "reconstruction",
    iterations: int = 300,
    device: torch.device | str = "cpu",
    per_class: bool = False,
    learn_concept: Callable[..., Any] | None = None,
    ratio_max_size: Mapping[Any, int] | None = None,
    reference: str = "real+classic",
    amp: str | None = "none",
    arm_max_size: Mapping[str, int] | None = None,
    concept_min_images: int = 3,
    results: str | os.PathLike | None = None,
    generator: str | None = None,
    score_rows: Sequence[dict[str, Any]] | None = None,
    scores_dir: str | os.PathLike | None = None,
    score_sizes: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Run (or continue) the experiment over :func:`experiment_cells`; returns one record per cell and writes
    ``results.jsonl``, ``results.md``, ``summary.json`` and ``augmentation_auc.png`` in ``output_dir``. The concept
    arms need ``learn_concept(rows, name, folder)`` (learns a concept, returns the ConceptBank of ``folder``);
    ``reference`` is the arm every other one is compared with, fold by fold. ``amp``: the classifiers' training
    precision (``auto``: bf16 where the device has it); cells trained in another precision are trained again.
    ``concept_min_images``: the fewest films of a class a concept is learned from; every fold's pool is checked
    against it before any work, so a concept cell cannot stop the experiment hours in. ``results``: the rows file
    (default ``<output_dir>/results.jsonl``; one kept with the results lets another machine go on from the rows on
    record). ``generator`` (:func:`generator_id`): rows and images of the synthetic and concept arms made by another
    generator are made again. ``score_rows``: films each new classifier (at ``score_sizes``, when given) scores as
    soon as it is trained, into ``<scores_dir>/<cell>/scores.csv`` as run ID score writes them."""
    if not label:
        raise BundleInputError("No label column is set: give --label, the datalist column that holds the class.")
    output_dir = Path(output_dir)
    sizes = sorted({min(int(s), len(train_rows)) for s in sizes})
    cells = experiment_cells(arms, sizes, ratios, folds, ratio_max_size, arm_max_size)
    if learn_concept is None and any(ARMS[a][2] == "concept" for a in arms):
        raise BundleInputError("The concept arms need concept settings (concept_tokens): give them, or leave the "
                               "concept arms out.")
    y_train = binary_labels(train_rows, label, positive, "labelled_list")
    y_test = binary_labels(test_rows, label, positive, "test_list")
    check_concept_pools(cells, y_train, per_class, concept_min_images)
    test_set = {"label": label, "positive": positive, "images": [str(r["image"]) for r in test_rows],
                "labels": y_test.tolist()}
    output_dir.mkdir(parents=True, exist_ok=True)
    results_path = Path(results) if results else output_dir / "results.jsonl"
    results_path.parent.mkdir(parents=True, exist_ok=True)
    known = results_path.parent / "test_set.json"  # beside the rows it was measured with
    if known.is_file() and json.loads(known.read_text()) != test_set:
        raise BundleInputError(f"The results in '{results_path.parent}' were measured on another test set or label: "
                               "choose another output folder, or the test datalist and label they used.")
    atomic_write(known, lambda tmp: Path(tmp).write_text(json.dumps(test_set)))
    x_test = preprocessed_stack(test_rows, preprocessing)
    x_train = preprocessed_stack(train_rows, preprocessing)
    dtype = autocast_dtype(amp, device)
    precision = precision_name(dtype)
    done = _done(results_path, precision)
    stale = [c for c, r in done.items() if ARMS[c[3]][2] and r.get("generator", generator) != generator]
    for cell in stale:
        del done[cell]
    if stale:
        logger.info("%d cells of %s were made with another generator: they are made again.", len(stale), results_path)
    if score_rows:
        score_images_x = preprocessed_stack(score_rows, preprocessing)
        score_ids = _score_ids(score_rows)
    bar = tqdm(total=len(cells), desc=f"augmentation ({label})", dynamic_ncols=True)
    bar.update(sum(1 for c in cells if c in done))
    for n in sizes:
        for fold in sorted({c[2] for c in cells if c[0] == n}):
            todo = [c for c in cells if c[0] == n and c[2] == fold and c not in done]
            if not todo:
                continue
            pool = fold_pool(y_train, n, fold, per_class)
            fold_dir = output_dir / f"n{n:03d}_fold{fold}"
            pool_rows = [{**train_rows[i], label: str(train_rows[i][label])} for i in pool]
            need = int(round(max(c[1] for c in cells if c[0] == n) * len(pool)))
            synthetic: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            for kind in sorted({ARMS[c[3]][2] for c in todo} - {None}):
                if kind == "synthetic":
                    manifest = samples_once(generation, pool_rows, fold_dir / "synthetic", need, generator,
                                            strategy=strategy, label_columns=[label], seed=fold * 100000)
                else:
                    manifest = concept_samples(generation, learn_concept, pool_rows, label, positive, need,
                                               fold_dir / "concept", seed=fold * 100000, generator=generator)
                synthetic[kind] = (preprocessed_stack(manifest, preprocessing),
                                   torch.as_tensor(binary_labels(manifest, label, positive)))
            for size, ratio, f, arm in todo:
                real, classic, kind = ARMS[arm]
                count = int(round(ratio * len(pool))) if kind else 0
                parts_x, parts_y = [], []
                if real:
                    parts_x.append(x_train[pool])
                    parts_y.append(torch.as_tensor(y_train[pool]))
                if kind:
                    x_syn, y_syn = synthetic[kind]
                    parts_x.append(x_syn[:count])
                    parts_y.append(y_syn[:count])
                x, y = torch.cat(parts_x), torch.cat(parts_y)
                augment = classic_augmentation(seed=fold) if classic else None
                model = train_classifier(x, y, seed=fold, iterations=iterations, device=device, augment=augment,
                                         dtype=dtype)
                atomic_write(classifier_path(output_dir, size, ratio, f, arm),
                             lambda tmp: torch.save(model.state_dict(), tmp))  # before its record: scored later
                scores = classifier_scores(model, x_test, device)
                if score_rows and (score_sizes is None or size in {int(k) for k in score_sizes}):
                    _write_scores(Path(scores_dir or output_dir / "scores") / cell_name(size, ratio, f, arm), score_ids,
                                  classifier_scores(model, score_images_x, device))
                record = {"size": size, "ratio": ratio, "fold": f, "arm": arm, "label": label,
                          "real_images": len(pool) if real else 0, "per_class": per_class, "synthetic_images": count,
                          "test_auc": float(compute_roc_auc(scores, torch.as_tensor(y_test).float())),
                          "test_images": len(test_rows), "iterations": iterations, "precision": precision,
                          "generator": generator if kind else None,
                          "test_scores": [round(float(v), 5) for v in scores]}
                append_jsonl(results_path, record)
                done[(size, ratio, f, arm)] = record
                bar.update(1)
    bar.close()
    records = [done[c] for c in cells]
    write_report(records, output_dir, label, y_test, reference, positive)
    return records


def cell_name(size: int, ratio: float, fold: int, arm: str) -> str:
    """``<arm>_r<ratio>_n<N>_f<fold>``, the name of one trained classifier (``+`` in an arm becomes ``-``)."""
    return f"{arm.replace('+', '-')}_r{float(ratio):g}_n{int(size)}_f{int(fold)}"


def classifier_path(output_dir: str | os.PathLike, size: int, ratio: float, fold: int, arm: str) -> Path:
    return Path(output_dir) / "classifiers" / f"{cell_name(size, ratio, fold, arm)}.pt"


@torch.no_grad()
def score_images(output_dir: str | os.PathLike, rows: Sequence[dict[str, Any]], preprocessing: Callable,
                 scores_dir: str | os.PathLike, sizes: Sequence[int] | None = None,
                 device: torch.device | str = "cpu", results: str | os.PathLike | None = None) -> list[Path]:
    """Apply every classifier an experiment in ``output_dir`` trained (those at ``sizes`` only, when given) to the
    images of ``rows``: ``<scores_dir>/<arm>_r<ratio>_n<N>_f<fold>/scores.csv`` with ``id,score`` (the logit, higher
    = positive class; ``id`` the row's ``id`` column or the file name's stem). Returns the files written."""
    results_path = Path(results) if results else Path(output_dir) / "results.jsonl"
    records = list(_done(results_path).values())
    if not records:
        raise BundleInputError(f"No results in '{results_path}': run the experiment (run ID "
                               "augment) before scoring images with its classifiers.")
    if not rows:
        raise BundleInputError("No images to score: give a datalist or folder with at least one image.")
    wanted = [r for r in records if sizes is None or int(r["size"]) in {int(s) for s in sizes}]
    images = preprocessed_stack(rows, preprocessing)
    ids = _score_ids(rows)
    written = []
    for r in wanted:
        path = classifier_path(output_dir, r["size"], r["ratio"], r["fold"], r["arm"])
        if not path.is_file():
            logger.warning("No saved classifier for %s (trained before classifiers were kept): skipped.", path.stem)
            continue
        model = make_classifier()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        written.append(_write_scores(Path(scores_dir) / path.stem, ids,
                                     classifier_scores(model.to(device).eval(), images, device)))
    return written


def _score_ids(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Each scored film's ``id`` column, else its file name's stem."""
    return [str(r.get("id") or Path(str(r["image"])).stem) for r in rows]


def _write_scores(folder: Path, ids: Sequence[str], values: torch.Tensor) -> Path:
    """``<folder>/scores.csv``: ``id,score`` per film, written whole or not at all."""
    out = folder / "scores.csv"
    atomic_write(out, lambda tmp: Path(tmp).write_text(
        "id,score\n" + "".join(f"{i},{float(v):.6g}\n" for i, v in zip(ids, values))))
    return out


def labelled_rows(path: str | os.PathLike | None, setting: str) -> list[dict[str, Any]]:
    """The rows of a labelled datalist named by ``setting``, with a clear error when it is not given."""
    if not path:
        raise BundleInputError(f"--{setting} is not set: give a CSV or JSON datalist with an image column and the "
                               "label column.")
    return read_datalist(path)


def _auc_rows(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of ``scores`` (ties counted half), from the ranks."""
    from scipy.stats import rankdata

    ranks = rankdata(scores, axis=-1)
    positives = labels.astype(bool)
    p, q = positives.sum(), (~positives).sum()
    return (ranks[..., positives].sum(-1) - p * (p + 1) / 2) / (p * q)


DETECTABLE_Z = 1.959964 + 0.841621  # a two-sided 5% test with 80% power


def paired_differences(records: Sequence[Mapping[str, Any]], labels: Sequence[int], reference: str = "real+classic",
                       boots: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """For every (N, arm, ratio) cell, the test-AUC difference to ``reference`` at the same N, fold by fold (the same
    real films), averaged over the folds both have: its bootstrap 95% interval (folds and test films drawn again
    with replacement, the same draw for both arms) and the smallest difference this design could detect
    (:data:`DETECTABLE_Z` bootstrap standard errors). Records without per-image scores are left out."""
    labels = np.asarray(labels)
    if labels.size == 0 or labels.min() == labels.max():
        return []  # no AUC on a single class, so nothing to bootstrap
    by = {(r["size"], r["arm"], float(r["ratio"]), r["fold"]): r for r in records if r.get("test_scores")}
    rng = np.random.default_rng(seed)
    out = []
    for size, arm, ratio in sorted({k[:3] for k in by if k[1] != reference},
                                   key=lambda k: (k[0], ARM_ORDER.index(k[1]), k[2])):
        folds = sorted(f for (s, a, q, f) in by if (s, a, q) == (size, arm, ratio) and (size, reference, 0.0, f) in by)
        if not folds:
            continue
        arm_scores = np.array([by[(size, arm, ratio, f)]["test_scores"] for f in folds])
        ref_scores = np.array([by[(size, reference, 0.0, f)]["test_scores"] for f in folds])
        point = float(np.mean(_auc_rows(arm_scores, labels) - _auc_rows(ref_scores, labels)))
        draws = []
        while len(draws) < boots:
            films = rng.integers(len(labels), size=len(labels))
            if labels[films].min() == labels[films].max():
                continue
            pick = rng.integers(len(folds), size=len(folds))
            a, r = arm_scores[pick][:, films], ref_scores[pick][:, films]
            draws.append(float(np.mean(_auc_rows(a, labels[films]) - _auc_rows(r, labels[films]))))
        low, high = np.percentile(draws, [2.5, 97.5])
        out.append({"size": size, "arm": arm, "ratio": ratio, "reference": reference, "folds": len(folds),
                    "difference": point, "ci95": [float(low), float(high)],
                    "significant": bool(low > 0 or high < 0), "detectable": float(DETECTABLE_Z * np.std(draws))})
    return out


def write_report(records: Sequence[Mapping[str, Any]], output_dir: Path, label: str,
                 labels: Sequence[int] | None = None, reference: str = "real+classic",
                 positive: str | None = None) -> None:
    """``results.md``, ``summary.json`` and ``augmentation_auc.png`` in ``output_dir`` from the arms' records; with the
    test labels, the paired differences to ``reference`` too (to ``real`` when no record has ``reference``) and, when
    ``reference`` is another arm, to ``real`` as well (the comparison the papers make). The test labels and the
    positive class, when not given, come from ``output_dir``'s ``test_set.json``."""
    summary = summarise(records)
    test_set = (json.loads((output_dir / "test_set.json").read_text())
                if (output_dir / "test_set.json").is_file() else {})
    if labels is None:
        labels = test_set.get("labels")
    if positive is None and test_set.get("label") == label:
        positive = test_set.get("positive")
    # the tables and the figure name the positive class of a column such as `label`; summary.json keeps both apart
    title = label if positive is None else f"{label} = {positive}"
    if not any(r["arm"] == reference for r in records):
        reference = "real"
    differences = paired_differences(records, labels, reference) if labels is not None else []
    # the papers compare with real films alone: beside a classic-augmentation reference, the same against real only
    to_real = (paired_differences(records, labels, "real") if labels is not None and reference != "real"
               and any(r["arm"] == "real" for r in records) else [])
    text = markdown(summary, title) + "".join("\n" + differences_markdown(d) for d in (differences, to_real) if d)
    atomic_write(output_dir / "results.md", lambda tmp: Path(tmp).write_text(text))
    atomic_write(output_dir / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(
        {"label": label, "positive": positive, "auc": summary, "paired_differences": differences,
         "paired_differences_to_real": to_real}, indent=1)))
    plot(summary, output_dir / "augmentation_auc.png", title)


def differences_markdown(differences: Sequence[Mapping[str, Any]]) -> str:
    reference = arm_name({"arm": differences[0]["reference"], "ratio": 0})
    sizes = sorted({d["size"] for d in differences})
    lines = [f"Paired difference in test AUC to {reference} (same fold, same real films; mean over folds), its "
             "bootstrap 95% interval over folds and test films, and in brackets the smallest difference this design "
             "could detect (80% power, 5% two-sided); * where the interval excludes 0.", "",
             "| arm | " + " | ".join(f"N={s}" for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for arm in dict.fromkeys(arm_name(d) for d in differences):
        cells = []
        for s in sizes:
            hit = [d for d in differences if d["size"] == s and arm_name(d) == arm]
            if hit:
                d = hit[0]
                cells.append(f"{d['difference']:+.3f}{'*' if d['significant'] else ''} "
                             f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] ({d['detectable']:.3f})")
            else:
                cells.append("")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summarise(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation of the test AUC over folds, per (size, arm, ratio), in the order of ARM_ORDER."""
    groups: dict[tuple, list[float]] = {}
    for r in records:
        groups.setdefault((r["size"], ARM_ORDER.index(r["arm"]), r["ratio"]), []).append(r["test_auc"])
    return [{"size": s, "arm": ARM_ORDER[a], "ratio": q, "auc_mean": float(np.mean(v)), "auc_std": float(np.std(v)),
             "folds": len(v)} for (s, a, q), v in sorted(groups.items())]


ARM_NAMES = {"real": "real only", "real+classic": "real + classic augmentation",
             "real+synthetic": "real + synthetic 1:{ratio:g}",
             "classic+synthetic": "real + synthetic 1:{ratio:g} + classic augmentation",
             "real+concept": "real + concept images 1:{ratio:g}",
             "classic+concept": "real + concept images 1:{ratio:g} + classic augmentation",
             "synthetic": "synthetic only (1:{ratio:g} of N)", "concept": "concept images only (1:{ratio:g} of N)"}


def arm_name(row: Mapping[str, Any]) -> str:
    return ARM_NAMES[row["arm"]].format(ratio=float(row["ratio"]))


def markdown(summary: Sequence[Mapping[str, Any]], label: str) -> str:
    arms = list(dict.fromkeys(arm_name(r) for r in summary))
    sizes = sorted({r["size"] for r in summary})
    most = max(r["folds"] for r in summary)
    folds = f"{most} fold" + ("s" if most != 1 else "")
    lines = [f"Test AUC for `{label}` (mean ± std over {folds} unless a cell says otherwise)", "",
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
    fig, ax = plt.subplots(figsize=(8.5, 4))
    colours = plt.get_cmap("tab20").colors  # more arms than the default cycle has colours
    arms = list(dict.fromkeys(arm_name(r) for r in summary))
    for k, arm in enumerate(arms):
        rows = sorted((r for r in summary if arm_name(r) == arm), key=lambda r: r["size"])
        # each arm a little to the side of N (within 10% of it), so that error bars at one N stay apart
        shift = 10 ** (0.08 * (k / max(len(arms) - 1, 1) - 0.5))
        sizes = [r["size"] * shift for r in rows]
        alone = arm.endswith("of N)")  # synthetic images without the real ones
        ax.errorbar(sizes, [r["auc_mean"] for r in rows], yerr=[r["auc_std"] for r in rows], marker="o", capsize=3,
                    label=arm, color="black" if arm == "real only" else colours[k % len(colours)],
                    linestyle="--" if alone else "-", linewidth=2.0 if arm == "real only" else 1.2)
    ax.axhline(0.5, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ns = sorted({r["size"] for r in summary})
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.minorticks_off()
    ax.set_xlim(min(ns) / 1.25, max(ns) * 1.25)
    ax.set_xlabel("N, the real pool size (log scale; the arms side by side at each N)")
    ax.set_ylabel(f"test AUC ({label})")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
