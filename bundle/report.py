"""The report a training run ends with: samples next to the real images that conditioned them, and their
evaluation (Fréchet distances, precision/recall, memorisation, the autoencoder's reconstruction quality)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .data import apply_to_file
from .io import atomic_write
from .writers import to_display


def _tile(image: np.ndarray, size: int) -> Image.Image:
    return Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).resize((size, size), Image.BICUBIC)


def pairs_grid(reals: Sequence[np.ndarray], samples: Sequence[np.ndarray], path: str | os.PathLike,
               pairs_per_row: int = 4, size: int = 128) -> None:
    """One PNG: each sample beside the real image it came from, both at ``size`` px, so that they are compared as
    equals (a small real film beside a large sample flatters neither)."""
    gap, header = 4, 16
    pair_width = 2 * size + 3 * gap
    rows = (len(samples) + pairs_per_row - 1) // pairs_per_row
    canvas = Image.new("L", (pairs_per_row * pair_width, header + rows * (size + gap)), color=255)
    draw = ImageDraw.Draw(canvas)
    for i in range(min(pairs_per_row, len(samples))):
        draw.text((i * pair_width + gap, 2), "real", fill=0)
        draw.text((i * pair_width + 2 * gap + size, 2), "sample", fill=0)
    for i, (real, sample) in enumerate(zip(reals, samples)):
        x, y = (i % pairs_per_row) * pair_width + gap, header + (i // pairs_per_row) * (size + gap)
        canvas.paste(_tile(real, size), (x, y))
        canvas.paste(_tile(sample, size), (x + size + gap, y))
    atomic_write(Path(path), lambda tmp: canvas.save(tmp, format="PNG"))


def training_report(bundle_root: str | os.PathLike, work_dir: str | os.PathLike, real_dir: str | os.PathLike,
                    train_dir: str | os.PathLike | None = None, count: int = 32, device: Any = "cpu",
                    report_dir: str | os.PathLike | None = None, guidance_scale: float | None = None,
                    diffusion_path: str | os.PathLike | None = None,
                    num_inference_steps: int | None = None) -> dict[str, Any]:
    """Sample once from each of ``count`` real images' embeddings with the trained work dir, draw them beside
    those images, and evaluate them against the real images (and ``train_dir``, for the reference FD and the
    memorisation check) with the bundle's own ``inference.json`` and ``evaluate.json``; ``guidance_scale`` and
    ``num_inference_steps`` replace inference.json's, and ``diffusion_path`` the work dir's UNet (a snapshot), when
    given."""
    from .cli import config_workflow

    root, work = Path(str(bundle_root)), Path(str(work_dir))
    out = Path(str(report_dir)) if report_dir else work / "report"
    sample_dir = out / "samples"
    common = {"bundle_root": str(root), "work_dir": str(work), "device": device,
              **({} if diffusion_path is None else {"diffusion_path": str(diffusion_path)})}
    settings = {} if guidance_scale is None else {"guidance_scale": float(guidance_scale)}
    if num_inference_steps is not None:
        settings["num_inference_steps"] = int(num_inference_steps)
    # the report describes the model there now: samples of an earlier model or setting are not kept
    shutil.rmtree(sample_dir, ignore_errors=True)
    sampling = config_workflow(str(root / "configs/inference.json"), "sample", **common, input_dir=str(real_dir),
                               num_inputs=count, num_samples=1, strategy="reconstruction", output_dir=str(sample_dir),
                               **settings)
    rows = sampling.run()[-1]
    preprocessing = sampling.parser.get_parsed_content("preprocessing")
    reals = [to_display(apply_to_file(preprocessing, {"image": r["sources"], **{k: r[k] for k in ("slice_axis", "slice_index")
                                                                                  if r.get(k) not in (None, "")}})["image"])
             for r in rows]
    samples = [np.asarray(Image.open(sample_dir / r["image"]), dtype=np.float32) / 255.0 for r in rows]
    grid = out / "samples_grid.png"
    pairs_grid(reals, samples, grid)
    evaluation = config_workflow(str(root / "configs/evaluate.json"), "evaluate", **common,
                                 generated_dir=str(sample_dir / "manifest.csv"), real_dir=str(real_dir),
                                 train_dir=None if train_dir is None else str(train_dir), max_images=count,
                                 prdc_k=max(1, min(5, len(rows) - 1)), evaluation_dir=str(out))
    result = evaluation.run()[-1]
    used = sampling.parser.get_parsed_content("guidance_scale")
    lines = [f"Report: {grid} (each sample beside the real image whose DINO embedding conditioned it; guidance "
             f"scale {used:g})",
             f"        {out / 'evaluation.md'} ({len(rows)} samples against {real_dir})"]
    for space, entry in result["feature_spaces"].items():
        ref = entry.get("frechet_distance_train_reference")
        lines.append(f"        FD in {space} space: {entry['frechet_distance']:.2f}"
                     + (f" (real training images against the same real images: {ref:.2f})" if ref is not None else ""))
    if "reconstruction" in result:
        rec = result["reconstruction"]
        lines.append(f"        autoencoder reconstruction: PSNR {rec['psnr_db']['mean']:.2f} dB, MS-SSIM "
                     f"{rec['ms_ssim']['mean']:.3f}")
    print("\n".join(lines), flush=True)
    return result
