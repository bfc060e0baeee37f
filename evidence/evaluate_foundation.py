"""Evaluate a trained pipeline on held-out images and write the foundation report.

    python -m evidence.evaluate_foundation --work_dir runs/foundation --test runs/foundation/test.csv \\
        --out docs/results [-- sampling overrides]   (the models describe themselves: none are needed)

Writes <out>/foundation.json, <out>/foundation.md and the figures it links: autoencoder reconstruction
PSNR/SSIM/MS-SSIM on the test images, generated samples conditioned on the DINO embeddings of test images
beside small thumbnails of those images, loss curves from TensorBoard, and stage wall times.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch
from monai.transforms import LoadImage

ROOT = Path(__file__).resolve().parents[1]

from bundle.cli import config_workflow, parse_overrides, pyplot, report_json
from bundle.data import apply_to_file, build_datalist, preprocessed_stack
from bundle.evaluation import reconstruction_quality
from bundle.writers import to_display


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def plot_losses(work: Path, path: Path) -> dict:
    plt = pyplot()

    curves = {stage: scalars(work / "logs" / stage) for stage in ("autoencoder", "diffusion")}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (stage, tags) in zip(axes, curves.items()):
        for tag, points in sorted(tags.items()):
            if (tag == "loss" or tag.endswith("_loss")) and tag != "kl_loss" and not tag.startswith(stage):
                steps, values = zip(*points)
                window = max(1, len(values) // 50)
                smooth = np.convolve(values, np.ones(window) / window, mode="valid")
                ax.plot(steps[window - 1 :], smooth, label=tag, linewidth=1)
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_title(f"{stage} training loss (moving average)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    summary = {}
    for stage, tags in curves.items():
        epoch_tag = f"{stage}_loss"
        if epoch_tag in tags:
            values = [v for _, v in tags[epoch_tag]]
            summary[stage] = {"first_epoch_loss": values[0], "last_epoch_loss": values[-1], "epochs": len(values)}
    return summary


def sample_grid(rows: list[dict], sample_dir: Path, preprocessing, path: Path, per_row: int) -> None:
    """Each row: the conditioning test image (small thumbnail) then its generated samples."""
    plt = pyplot()
    sources = list(dict.fromkeys(r["sources"] for r in rows))
    fig, axes = plt.subplots(len(sources), per_row + 1, figsize=(1.3 * (per_row + 1), 1.3 * len(sources)))
    for i, source in enumerate(sources):
        real = apply_to_file(preprocessing, {"image": source})["image"]
        axes[i, 0].imshow(to_display(real), cmap="gray", vmin=0, vmax=1)
        outputs = [str(sample_dir / r["image"]) for r in rows if r["sources"] == source][:per_row]
        for j, out in enumerate(outputs):
            axes[i, j + 1].imshow(to_display(LoadImage(image_only=True)(out) / 255.0), cmap="gray", vmin=0, vmax=1)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_title("test image\n(condition)", fontsize=7)
    for j in range(per_row):
        axes[0, j + 1].set_title(f"sample {j}", fontsize=7)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True, help="datalist of held-out images")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results")
    parser.add_argument("--num_conditions", type=int, default=8)
    parser.add_argument("--num_samples", type=int, default=4)
    parser.add_argument("overrides", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    overrides = parse_overrides(args.overrides)
    os.chdir(ROOT)

    args.out.mkdir(parents=True, exist_ok=True)
    sample_dir = args.work_dir / "samples_test"
    settings = {**overrides, "work_dir": str(args.work_dir), "input_dir": str(args.test),
                "num_inputs": args.num_conditions, "num_samples": args.num_samples, "output_dir": str(sample_dir)}
    wf = config_workflow("configs/inference.json", "sample", **settings)
    preprocessing = wf.parser.get_parsed_content("preprocessing")
    codec = wf.parser.get_parsed_content("generator").codec

    test_rows = build_datalist(args.test, args.work_dir)
    images = preprocessed_stack(test_rows, preprocessing)
    recon_metrics = reconstruction_quality(images, codec)

    for old in sample_dir.glob("*.png"):
        old.unlink()  # time a full generation, not a resumed one
    start = time.perf_counter()
    rows = wf.run()[-1]
    seconds = time.perf_counter() - start
    sample_grid(rows, sample_dir, preprocessing, args.out / "foundation_samples.png", args.num_samples)
    losses = plot_losses(args.work_dir, args.out / "foundation_losses.png")

    stage_file = args.work_dir / "stage_seconds.txt"
    stages = dict(line.split() for line in stage_file.read_text().splitlines()) if stage_file.exists() else {}
    result = {
        "data": {"train": "JSRT train split (150 images)", "test": f"{args.test} ({len(test_rows)} images)"},
        "settings": overrides,
        "stage_wall_seconds": {k: float(v) for k, v in stages.items()},
        "autoencoder_reconstruction_test": recon_metrics,
        "losses": losses,
        "sampling": {"images": len(rows), "seconds": seconds, "images_per_second": len(rows) / seconds,
                     "num_inference_steps": wf.parser.get_parsed_content("num_inference_steps"),
                     "guidance_scale": wf.parser.get_parsed_content("guidance_scale"),
                     "peak_rss_mib_of_this_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    report_json(result, args.out / "foundation.json")


if __name__ == "__main__":
    main()
