"""Generate images conditioned on the DINO embeddings of real images, with a manifest linking them."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from .data import apply_to_file
from .diffusion import sample_latents, seeded_noise
from .errors import BundleInputError
from .io import atomic_path
from .writers import WRITERS

logger = logging.getLogger(__name__)

MANIFEST_FIELDS = ["output", "source", "strategy", "sample", "seed", "sampler", "num_inference_steps", "guidance_scale"]


def output_stems(sources: Sequence[str]) -> list[str]:
    """File-name stems for outputs: the source's name, made unique with its index only where names clash."""
    names = [Path(s).name.split(".")[0] for s in sources]
    return [n if names.count(n) == 1 else f"{i:05d}_{n}" for i, n in enumerate(names)]


def write_manifest(rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS)
            writer.writeheader()
            writer.writerows(rows)


@torch.no_grad()
def generate_reconstructions(
    datalist: Sequence[dict[str, Any]],
    preprocessing: Callable,
    codec: nn.Module,
    dino: nn.Module,
    unet: nn.Module,
    scheduler: Any,
    latent_shape: Sequence[int],
    output_dir: str | os.PathLike,
    num_samples: int = 4,
    num_inference_steps: int = 50,
    guidance_scale: float = 3.0,
    seed: int = 0,
    batch_size: int = 8,
    formats: Sequence[str] = ("png",),
    device: torch.device | str = "cpu",
) -> list[dict[str, Any]]:
    """For every input image, ``num_samples`` new images from its DINO embedding (DiNO-Diffusion "reconstruction").

    Sample ``k`` of input ``i`` uses seed ``seed + i * num_samples + k``: any one output can be regenerated
    alone. Outputs that already exist are kept, so an interrupted run continues where it stopped; the
    manifest (``manifest.csv``) lists every output, its source and the settings that produced it.
    """
    if not datalist:
        raise BundleInputError("No input images were given for sampling: pass --input_dir with at least one image.")
    unknown = [f for f in formats if f not in WRITERS]
    if unknown:
        raise BundleInputError(f"Output format(s) {unknown} are not supported: choose from {sorted(WRITERS)}.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    sources = [str(row["image"]) for row in datalist]
    stems = output_stems(sources)
    sampler = type(scheduler).__name__

    jobs, rows = [], []
    for i, (source, stem) in enumerate(zip(sources, stems)):
        for k in range(num_samples):
            paths = [output_dir / f"{stem}_sample{k:03d}{WRITERS[f][1]}" for f in formats]
            s = seed + i * num_samples + k
            rows.append({"output": str(paths[0]), "source": source, "strategy": "reconstruction", "sample": k,
                         "seed": s, "sampler": sampler, "num_inference_steps": num_inference_steps,
                         "guidance_scale": guidance_scale})
            if not all(p.exists() for p in paths):
                jobs.append((i, s, paths))
    manifest = output_dir / "manifest.csv"
    if len(jobs) < len(rows):
        logger.info("%d of %d outputs already exist in %s: generating the other %d.", len(rows) - len(jobs), len(rows),
                    output_dir, len(jobs))

    contexts: dict[int, torch.Tensor] = {}
    for start in tqdm(range(0, len(jobs), batch_size), desc="generate", dynamic_ncols=True, disable=not jobs):
        batch = jobs[start : start + batch_size]
        for i in {j[0] for j in batch} - set(contexts):
            image = apply_to_file(preprocessing, dict(datalist[i]))["image"]
            contexts[i] = dino(torch.as_tensor(image)[None].float().to(device))[0]
        context = torch.stack([contexts[i] for i, _, _ in batch])
        noise = seeded_noise([s for _, s, _ in batch], latent_shape, device)
        latents = sample_latents(unet, scheduler, context, noise, num_inference_steps, guidance_scale)
        images = codec.decode(latents).clamp(0, 1).cpu()
        for image, (_, _, paths) in zip(images, batch):
            for fmt, path in zip(formats, paths):
                WRITERS[fmt][0](image, path)
        write_manifest([r for r in rows if Path(r["output"]).exists()], manifest)
    write_manifest(rows, manifest)
    logger.info("Wrote %d images and %s.", len(rows), manifest)
    return rows
