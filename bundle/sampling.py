"""Generating images over the DINO embedding manifold of a pool of real images, with a manifest.

Every output is a *job*: a strategy, the pool images it comes from, its parameters and a seed. Jobs are
planned up front from the pool and the seed alone, so one output can be regenerated without the others,
an interrupted run continues with the outputs that are missing, and the manifest describes all of them.
What each strategy does (reconstruction, interpolation, perturbation, manifold, img2img, inpainting) and
its default parameters are in :mod:`bundle.strategies`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .cache import latent_cache
from .data import output_stems, preprocessed_images, slice_suffix
from .diffusion import sample_latents, seeded_noise
from .errors import BundleInputError
from .validation import check_sampling_values
from .volumes import output_affine, source_modality
from .io import atomic_path
from .performance import autocast_dtype, precision_name
from .strategies import STRATEGIES, Plan, Pool, strategy_params, with_concepts
from .writers import FORMATS, dicom_uid, write_image

logger = logging.getLogger(__name__)

VOLUME_MODALITIES = {"ct": "CT", "mri": "MR"}  # the DICOM Modality of synthetic slices of NIfTI volumes
MANIFEST_FIELDS = ["image", "source_ids", "sources", "strategy", "params", "seed", "sampler", "num_inference_steps",
                   "guidance_scale", "precision"]


# ---- planning --------------------------------------------------------------------------------------------


def strategy_counts(strategy: str | Mapping[str, float], total: int) -> dict[str, int]:
    """How many of ``total`` outputs each strategy makes: one name, or a mix of weights split by largest remainder."""
    mix = {strategy: 1.0} if isinstance(strategy, str) else {str(k): float(v) for k, v in dict(strategy).items()}
    unknown = [k for k in mix if k not in STRATEGIES]
    if unknown:
        raise BundleInputError(f"Strategy {unknown} is not known: choose from {list(STRATEGIES)} (or a mix of them).")
    if not mix or any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
        raise BundleInputError(f"The strategy mix {mix} needs non-negative weights with a positive sum.")
    weight = sum(mix.values())
    exact = {k: total * v / weight for k, v in mix.items()}
    counts = {k: int(math.floor(x)) for k, x in exact.items()}
    for k in sorted(exact, key=lambda k: (counts[k] - exact[k], list(mix).index(k)))[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


def source_id(row: Mapping[str, Any]) -> str:
    """The source's ``id`` column, else its file name; a volume slice adds its axis and index."""
    return str(row.get("id") or Path(str(row["image"])).name.split(".")[0]) + slice_suffix(row)


def label_groups(rows: Sequence[Mapping[str, Any]], label_columns: Sequence[str]) -> list[tuple]:
    """Each pool row's label tuple (the group it belongs to); every row is in one group without labels."""
    for column in label_columns:
        missing = [source_id(r) for r in rows if column not in r]
        if missing:
            raise BundleInputError(f"Label column '{column}' is missing for {missing[:3]}: check --label_columns "
                                   f"against the datalist's columns ({sorted(rows[0])}).")
    return [tuple(str(r[c]) for c in label_columns) for r in rows]


def checked_plan(rows: Sequence[Mapping[str, Any]], strategy: str | Mapping[str, float], num_samples: int | None,
                 total_samples: int | None, params: Mapping[str, Mapping[str, Any]] | None, concepts: Any = None
                 ) -> tuple[dict[str, dict[str, Any]], list[int], dict[str, int]]:
    """The settings of a plan checked before any work (inputs, counts, strategy mix, every chosen strategy's
    parameters and the concepts it names): the full parameters, each output's pool image and the outputs per
    strategy."""
    if not rows:
        raise BundleInputError("No input images were given for sampling: pass --input_dir with at least one image.")
    params = strategy_params(params)
    n = len(rows)
    if total_samples is not None:
        anchors = [j % n for j in range(int(total_samples))]
    elif num_samples is not None and num_samples >= 1:
        anchors = [i for i in range(n) for _ in range(int(num_samples))]
    else:
        raise BundleInputError(f"num_samples {num_samples} must be at least 1 (or give total_samples).")
    counts = strategy_counts(strategy, len(anchors))
    for name, count in counts.items():
        if count:
            STRATEGIES[name].check(params[name])
            if name == "concept" or params[name].get("concepts"):
                with_concepts(Plan([0], {}, 0), params[name], Pool(rows, None, [], {}, concepts), name == "concept")
    return params, anchors, counts


def plan_jobs(
    rows: Sequence[Mapping[str, Any]],
    embeddings: torch.Tensor,
    strategy: str | Mapping[str, float] = "reconstruction",
    num_samples: int | None = 4,
    total_samples: int | None = None,
    seed: int = 0,
    label_columns: Sequence[str] = (),
    params: Mapping[str, Mapping[str, Any]] | None = None,
    concepts: Any = None,
) -> list[dict[str, Any]]:
    """One job per output: ``num_samples`` per pool image, or ``total_samples`` spread evenly over the pool.
    ``concepts`` (a :class:`bundle.concepts.ConceptBank`) serves the strategies that take concepts.

    Output ``j`` uses seed ``seed + j``; its strategy comes from a seeded shuffle of the mix, and its
    random choices (partner, interpolation weight, neighbours' weights) from its own seeded stream.
    """
    params, anchors, counts = checked_plan(rows, strategy, num_samples, total_samples, params, concepts)
    kinds = [k for k, c in counts.items() for _ in range(c)]
    if len(counts) > 1:
        kinds = [kinds[i] for i in np.random.default_rng([seed, 3]).permutation(len(kinds))]
    groups = label_groups(rows, label_columns)
    chosen = [STRATEGIES[k] for k, c in counts.items() if c]
    members: dict[tuple, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    pool = Pool(rows, embeddings, groups, members, concepts)
    stems = output_stems(rows)
    per_anchor: Counter = Counter()
    jobs = []
    for j, (anchor, kind) in enumerate(zip(anchors, kinds)):
        plan = STRATEGIES[kind].plan(anchor, params[kind], pool, np.random.default_rng([seed + j, 2]))
        jobs.append({"strategy": kind, "anchor": anchor, "seed": seed + j, "sources": plan.sources,
                     "labels": {c: rows[plan.labels_from][c] for c in label_columns}, "params": plan.params,
                     "name": f"{stems[anchor]}_{kind}_{per_anchor[anchor]:03d}",
                     **({"concept": plan.concept} if plan.concept is not None else {})})
        per_anchor[anchor] += 1
    for chosen_strategy in chosen:
        chosen_strategy.after_plan(jobs, pool)
    return jobs


def interpolation_jobs(num_inputs: int, steps: int, seed: int = 0) -> list[dict[str, Any]]:
    """An interpolation strip through pool images 0, 1, ..., ``steps`` points per segment, all with one seed
    so that only the embedding changes along the strip."""
    if num_inputs < 2:
        raise BundleInputError(f"Interpolation needs at least two images, got {num_inputs}: pass more inputs.")
    if steps < 2:
        raise BundleInputError(f"interpolation_steps must be at least 2 (the two ends), got {steps}.")
    jobs = []
    for a in range(num_inputs - 1):
        for k in range(0 if a == 0 else 1, steps):
            t = k / (steps - 1)
            jobs.append({"strategy": "interpolation", "anchor": a, "seed": seed, "sources": [a, a + 1],
                         "labels": {}, "params": {"t": round(t, 6)}, "name": f"interpolation_{len(jobs):03d}"})
    return jobs


# ---- generation ------------------------------------------------------------------------------------------


def write_manifest(rows: list[dict[str, Any]], path: str | os.PathLike, label_columns: Sequence[str] = ()) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS + [c for c in label_columns if c not in MANIFEST_FIELDS])
            writer.writeheader()
            writer.writerows(rows)


# what an output kept from an earlier run must share with the run now asking for it
KEPT_OUTPUT_SETTINGS = ("sources", "strategy", "params", "seed", "sampler", "num_inference_steps", "guidance_scale",
                        "precision")
# a manifest written before a setting existed made its outputs with the setting's value of that time
SETTING_BEFORE_IT_EXISTED = {"precision": "float32"}


def _manifest_rows(path: Path) -> dict[str, dict[str, str]]:
    """The rows of an earlier run's manifest by output file name (none when there is no readable manifest)."""
    try:
        with open(path, newline="") as f:
            return {row["image"]: row for row in csv.DictReader(f) if row.get("image")}
    except (OSError, KeyError, csv.Error, UnicodeDecodeError):
        return {}


def _check_same_settings(before: Mapping[str, str], now: Mapping[str, Any], output_dir: Path) -> None:
    """An output that exists is kept only when its manifest row says it was made as it would be now: a run with
    another guidance scale, sampler, seed or source must not reuse it and then describe it with its own settings."""
    before = {**SETTING_BEFORE_IT_EXISTED, **before}
    changed = [f"{k} {before.get(k)!r} -> {str(now[k])!r}" for k in KEPT_OUTPUT_SETTINGS
               if k in before and before[k] != str(now[k])]
    if changed:
        raise BundleInputError(
            f"'{output_dir}' already holds {now['image']} made with other settings ({'; '.join(changed[:3])}): choose "
            "another output folder, or delete the images there to make them anew.")


@torch.no_grad()
def generate(
    datalist: Sequence[dict[str, Any]],
    generator: Any,
    scheduler: Any,
    output_dir: str | os.PathLike,
    strategy: str | Mapping[str, float] = "reconstruction",
    num_samples: int | None = 4,
    total_samples: int | None = None,
    label_columns: Sequence[str] = (),
    params: Mapping[str, Mapping[str, Any]] | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 3.0,
    seed: int = 0,
    batch_size: int = 8,
    formats: Sequence[str] = ("png",),
    device: torch.device | str = "cpu",
    jobs: Sequence[dict[str, Any]] | None = None,
    concepts: Any = None,
    amp: str | None = "none",
) -> list[dict[str, Any]]:
    """Generate images with ``generator`` (a :class:`bundle.models.Generator`: its autoencoder, UNet, DINO,
    preprocessing and modality) from a pool of real images and write them with ``manifest.csv`` into ``output_dir``.

    The pool's preprocessed images, latents and DINO embeddings are cached in ``output_dir/.pool`` (rebuilt
    when the images, preprocessing, autoencoder or DINO model change). Outputs that already exist are kept.
    ``jobs`` replaces the planned jobs (e.g. :func:`interpolation_jobs`). An output made from a slice of a volume
    is written as NIfTI where its source slice lies (its affine) and as DICOM with the source's Modality
    (the volume's own, or the generator's modality's: ct -> CT, mri -> MR). ``amp`` runs the UNet in bf16 where
    ``device`` has it (``auto``; :func:`bundle.performance.autocast_dtype`); the manifest records the precision.
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise BundleInputError(f"Output format(s) {unknown or formats} are not supported: choose from {sorted(FORMATS)}.")
    if len({FORMATS[f] for f in formats}) < len(formats):
        raise BundleInputError(f"Output formats {list(formats)} would write the same file twice: choose png or png16.")
    if not datalist:
        raise BundleInputError("No input images were given for sampling: pass --input_dir with at least one image.")
    check_sampling_values(num_inference_steps, guidance_scale, batch_size, getattr(scheduler, "num_train_timesteps", None))
    dtype = autocast_dtype(amp, device)
    precision = precision_name(dtype)
    label_columns = list(label_columns or [])
    if jobs is None:  # before the pool cache is written: a wrong setting costs nothing
        checked_plan(datalist, strategy, num_samples, total_samples, params, concepts)
        label_groups(datalist, label_columns)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    codec, unet = generator.codec, generator.unet
    images = preprocessed_images(datalist, generator.preprocessing, output_dir / ".pool" / "images.pt")
    pool = latent_cache(images, codec, generator.dino, generator.autoencoder_path, output_dir / ".pool" / "latents.pt",
                        device, batch_size)
    embeddings = pool["tokens"].float()
    if jobs is None:
        jobs = plan_jobs(datalist, embeddings, strategy, num_samples, total_samples, seed, label_columns, params, concepts)
    sampler = type(scheduler).__name__
    study = dicom_uid(str(output_dir.resolve()), "study")
    series = dicom_uid(str(output_dir.resolve()), "series", sampler, num_inference_steps, guidance_scale)

    # a pool of volume slices: the manifest names each source's slice, so the real slice can be found again
    slice_columns = ["slice_axis", "slice_index"] if any(r.get("slice_index") not in (None, "") for r in datalist) else []
    label_columns = [*label_columns, *(c for c in slice_columns if c not in label_columns)]
    manifest = output_dir / "manifest.csv"
    made_before = _manifest_rows(manifest)
    rows, pending = [], []
    for j, job in enumerate(jobs):
        paths = [output_dir / f"{job['name']}{FORMATS[f]}" for f in formats]
        sources = [datalist[i] for i in job["sources"]]
        rows.append({"image": paths[0].name, "source_ids": ";".join(source_id(r) for r in sources),
                     "sources": ";".join(str(r["image"]) for r in sources), "strategy": job["strategy"],
                     "params": json.dumps(job["params"], sort_keys=True), "seed": job["seed"], "sampler": sampler,
                     "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                     "precision": precision, **job["labels"],
                     **{c: ";".join(str(r.get(c, "")) for r in sources) for c in slice_columns}})
        if not all(p.exists() for p in paths):
            pending.append((j, job, paths))
        elif paths[0].name in made_before:
            _check_same_settings(made_before[paths[0].name], rows[-1], output_dir)
    if len(pending) < len(rows):
        logger.info("%d of %d outputs already exist in %s: generating the other %d.", len(rows) - len(pending),
                    len(rows), output_dir, len(pending))

    def batch_key(job):
        return STRATEGIES[job["strategy"]].batch_key(job)

    groups: dict[tuple, list] = {}
    for item in pending:
        groups.setdefault(batch_key(item[1]), []).append(item)
    batches = [g[s : s + batch_size] for _, g in sorted(groups.items()) for s in range(0, len(g), batch_size)]
    done = {j for j in range(len(rows))} - {j for j, _, _ in pending}
    if pending:
        logger.info("generating %d images into %s.", len(pending), output_dir)
    with tqdm(total=len(pending), desc="generate", dynamic_ncols=True, disable=None if pending else True) as bar:
        for batch in batches:
            batch_jobs = [job for _, job, _ in batch]
            contexts = [STRATEGIES[job["strategy"]].context(job, embeddings) for job in batch_jobs]
            weights = getattr(contexts[0], "weights", None)  # a guidance composition of concepts (same in a batch)
            if weights is not None:
                context = [torch.stack([c.tokens[i] for c in contexts]).to(device) for i in range(len(weights))]
            else:
                context = torch.stack(contexts).to(device)
            noise = seeded_noise([job["seed"] for job in batch_jobs], generator.latent_shape, device)
            generators = [torch.Generator(device=device).manual_seed(int(job["seed"])) for job in batch_jobs]

            def sample(**start: Any) -> torch.Tensor:
                start = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in start.items()}
                latents = sample_latents(unet, scheduler, context, noise, num_inference_steps, guidance_scale,
                                         generators=generators, weights=weights, dtype=dtype, **start)
                return codec.decode(latents).clamp(0, 1).cpu()

            out = STRATEGIES[batch_jobs[0]["strategy"]].render(batch_jobs, sample, pool["latents"], images["images"])
            for image, (j, job, paths) in zip(out, batch):
                source = datalist[job["sources"][0]]
                placed = source.get("slice_index") not in (None, "")  # a slice of a volume: keep its place
                for fmt, path in zip(formats, paths):
                    write_image(image, path, fmt, study_uid=study, series_uid=series, instance_number=j + 1,
                                description=f"synthetic {job['strategy']} (DiNO-Diffusion)",
                                instance_uid=dicom_uid(str(path.resolve()), job["seed"]),
                                affine=output_affine(source, image.shape[-2:]) if placed and fmt == "nifti" else None,
                                modality=(source_modality(source) or VOLUME_MODALITIES.get(generator.modality, "OT"))
                                if placed else None)
                done.add(j)
            write_manifest([rows[j] for j in sorted(done)], manifest, label_columns)
            bar.update(len(batch))
    write_manifest(rows, manifest, label_columns)
    logger.info("Wrote %d images and %s.", len(rows), manifest)
    return rows


def interpolation_strip(rows: Sequence[dict[str, Any]], output_dir: str | os.PathLike, path: str | os.PathLike) -> None:
    """The outputs listed in ``rows`` side by side in one PNG, in manifest order (8-bit PNG outputs only)."""
    if not rows or not all(str(r["image"]).endswith(".png") for r in rows):
        raise BundleInputError("The interpolation strip is assembled from PNG outputs: include 'png' in --output_formats.")
    tiles = [np.asarray(Image.open(Path(output_dir) / r["image"])) for r in rows]
    tiles = [(t / 257).round().astype(np.uint8) if t.dtype != np.uint8 else t for t in tiles]
    with atomic_path(path) as tmp:
        Image.fromarray(np.concatenate(tiles, axis=1)).save(tmp, format="PNG")


def interpolate(datalist: Sequence[dict[str, Any]], steps: int, output_dir: str | os.PathLike, seed: int = 0,
                generate: Callable[..., list[dict[str, Any]]] = generate, **kwargs: Any) -> list[dict[str, Any]]:
    """An interpolation strip through the pool images in order: outputs, manifest and ``strip.png``.

    ``generate`` is :func:`generate` with its models bound (as the inference config builds it).
    """
    rows = generate(datalist, output_dir=output_dir, seed=seed, jobs=interpolation_jobs(len(datalist), steps, seed),
                    **kwargs)
    interpolation_strip(rows, output_dir, Path(output_dir) / "strip.png")
    return rows


