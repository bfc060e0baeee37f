"""Zero-shot lung segmentation from self-attention on JSRT (docs/results/zero_shot.{json,md,png}).

    python -m evidence.zero_shot_evidence --train runs/heads/train.csv --test runs/heads/test.csv \\
        --denoiser_args "--work_dir runs/heads --image_size 64 --denoiser_channels [16,32,64] --denoiser_head_channels 16" \\
        --latent_args "--work_dir runs/foundation_dino --image_size 64 ..." --out docs/results   (evidence/run_heads.sh)

1. Settings (timestep, merge threshold) are chosen on the first 12 *train* images for each UNet: the
   label-free denoiser of configs/heads/pretrain.json and the main pipeline's latent UNet (conditioned on
   the image's own DINO embedding, as in DiNO-Diffusion). The train masks are used only for this choice.
2. The chosen setting of each UNet is scored on *test*: Dice of the label-free lung rule, and of the oracle
   cluster choice (clusters more than half inside the true lungs; an upper bound, it looks at the truth).
3. Control: the same lung rule on a plain 16 x 16 grid of blocks instead of attention clusters, which shows
   how much of the Dice the intensity rule gets without any attention.
The test masks for the default UNet are written by configs/heads/zero_shot.json itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from bundle import zero_shot as zs
from bundle.cli import config_workflow, parse_overrides, pyplot
from bundle.constants import LUNG_MASK_COLUMNS
from bundle.data import preprocessed_stack, read_datalist
from bundle.heads.segmentation import read_masks

TIMESTEPS = {"denoiser": [0, 50, 100, 200, 400], "latent": [100, 300, 600, 800]}
THRESHOLDS = [0.1, 0.15, 0.2, 0.3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True)
    parser.add_argument("--denoiser_args", default="", help="overrides configs/heads/pretrain.json was run with (without: "
                        "the latent UNet only)")
    parser.add_argument("--latent_args", default="", help="overrides naming the trained latent model (configs/inference.json)")
    parser.add_argument("--select_on", type=int, default=12, help="train images used to choose the settings")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results")
    args = parser.parse_args()
    os.chdir(ROOT)
    start = time.perf_counter()
    models = {}
    if not args.denoiser_args and not args.latent_args:
        raise SystemExit("Give --denoiser_args, --latent_args or both.")
    denoiser_overrides = parse_overrides(shlex.split(args.denoiser_args))
    if args.denoiser_args:
        d = config_workflow("configs/heads/zero_shot.json", "inference", **denoiser_overrides).parser.get_parsed_content
        size, preprocessing = int(d("image_size")), d("preprocessing")
        models["denoiser"] = (d("trained_denoiser"), d("train_scheduler"), lambda images: (images * 2 - 1, None))
    if args.latent_args:
        latent_overrides = parse_overrides(shlex.split(args.latent_args))
        g = config_workflow("configs/inference.json", "sample", **latent_overrides).parser.get_parsed_content
        generator = g("generator")
        codec, dino = generator.codec, generator.dino
        if not args.denoiser_args:
            size, preprocessing = generator.image_size, generator.preprocessing
        models["latent"] = (generator.unet, generator.sampler("ddpm"), lambda images: (codec.encode(images), dino(images)))

    def load(rows):
        images = preprocessed_stack(rows, preprocessing)
        truth = torch.stack([read_masks(r, LUNG_MASK_COLUMNS, (size, size)).amax(0) for r in rows]).bool()
        return images, truth

    def score(name, images, truth, timestep, threshold, keep=False):
        unet, scheduler, prepare = models[name]
        inputs, context = prepare(images)
        maps = zs.self_attention(unet, inputs, timestep, scheduler, context)
        labels, lungs = zs.segment(maps, images, 16, threshold)
        rule = [zs.dice(l, t) for l, t in zip(lungs, truth)]
        oracle = [zs.dice(zs.oracle_clusters(lab, t), t) for lab, t in zip(labels, truth)]
        out = {"timestep": timestep, "threshold": threshold, "dice": float(np.mean(rule)), "dice_std": float(np.std(rule)),
               "oracle_dice_upper_bound": float(np.mean(oracle)),
               "mean_clusters": float(np.mean([lab.unique().numel() for lab in labels])),
               "attention_layers": [int(m.shape[-1]) for m in maps],
               # entropy of each query's attention over log(tokens): 1 = uniform attention
               "attention_entropy_over_uniform": float(np.mean(
                   [float(-(m * m.clamp_min(1e-12).log()).sum(-1).mean() / np.log(m.shape[-1])) for m in maps]))}
        return (out, labels, lungs) if keep else out

    train_images, train_truth = load(read_datalist(args.train)[: args.select_on])
    test_rows = read_datalist(args.test)
    test_images, test_truth = load(test_rows)
    result = {"image_size": size, "select_on_train_images": args.select_on, "selection": {}, "test": {}}
    kept = {}
    for name in models:
        grid = [score(name, train_images, train_truth, t, th) for t in TIMESTEPS[name] for th in THRESHOLDS]
        best = max(grid, key=lambda r: r["dice"])
        result["selection"][name] = {"grid": grid, "chosen": {"timestep": best["timestep"], "threshold": best["threshold"]}}
        test, labels, lungs = score(name, test_images, test_truth, best["timestep"], best["threshold"], keep=True)
        result["test"][name] = test
        kept[name] = (labels, lungs)
        print(name, json.dumps(test), flush=True)
    # control: the lung rule on square blocks, no attention
    side = size // 16
    blocks = (torch.arange(size)[:, None] // side * 16 + torch.arange(size)[None, :] // side).long()
    control = [zs.dice(zs.lung_clusters(blocks, im), t) for im, t in zip(test_images, test_truth)]
    result["test"]["control_blocks_16x16"] = {"dice": float(np.mean(control)), "dice_std": float(np.std(control)),
                                              "oracle_dice_upper_bound": float(np.mean(
                                                  [zs.dice(zs.oracle_clusters(blocks, t), t) for t in test_truth]))}
    if "denoiser" in models:  # the default model through the bundle's own config, settings as chosen above
        chosen = result["selection"]["denoiser"]["chosen"]
        out_dir = ROOT / "runs/heads/zero_shot_test"
        config_workflow("configs/heads/zero_shot.json", "inference", **denoiser_overrides, input_dir=str(args.test),
                        output_dir=str(out_dir), attention_timestep=chosen["timestep"],
                        merge_threshold=chosen["threshold"]).run()
        config_metrics = json.loads((out_dir / "metrics.json").read_text())
        result["test"]["config_run"] = {k: config_metrics[k] for k in ("images", "dice", "oracle_dice_upper_bound",
                                                                      "mean_clusters")}
    result["wall_seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "zero_shot.json").write_text(json.dumps(result, indent=2))
    overlay(test_images, test_truth, kept, args.out / "zero_shot.png")
    print(json.dumps(result["test"], indent=1))


def overlay(images, truth, kept, path: Path, count: int = 6) -> None:
    plt = pyplot()

    names = list(kept)
    fig, axes = plt.subplots(len(names) * 2, count, figsize=(2 * count, 4.2 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        labels, lungs = kept[name]
        for j in range(count):
            image = images[j, 0].numpy().T
            ax = axes[2 * row, j]
            ax.imshow(image, cmap="gray")
            lab = labels[j].numpy().T
            edges = np.zeros_like(lab, dtype=bool)
            edges[1:] |= lab[1:] != lab[:-1]
            edges[:, 1:] |= lab[:, 1:] != lab[:, :-1]
            ax.imshow(np.ma.masked_where(~edges, np.ones_like(image)), cmap="autumn", alpha=0.9)
            ax.set_title(f"{name}: clusters", fontsize=7)
            ax = axes[2 * row + 1, j]
            ax.imshow(image, cmap="gray")
            ax.contour(truth[j].numpy().T.astype(float), levels=[0.5], colors="lime", linewidths=0.8)
            ax.contour(lungs[j].numpy().T.astype(float), levels=[0.5], colors="red", linewidths=0.8)
            ax.set_title(f"rule Dice {zs.dice(lungs[j], truth[j]):.2f}", fontsize=7)
        for ax in axes[2 * row : 2 * row + 2].flat:
            ax.axis("off")
    fig.suptitle("zero-shot lungs: red = label-free choice, green = truth (JSRT test)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
