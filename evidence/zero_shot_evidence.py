"""Zero-shot lung segmentation on JSRT without labels: DiffSeg on self-attention, and k-means on decoder features
(docs/results/zero_shot.md; numbers in <out>/zero_shot.json, tables in <out>/zero_shot_table.md, figures).

    python -m evidence.zero_shot_evidence --train runs/heads128/train.csv --test runs/heads128/test.csv \\
        --denoiser_args "--work_dir runs/heads128/pretrain" --latent_args "--work_dir runs/corpus_cpu128" \\
        --out docs/results/zero_shot128

1. **Sweep on train only** (the first --select_on JSRT train films; their masks are used for this choice and nothing
   else), for each UNet (the label-free image-space denoiser of configs/heads/pretrain.json; the generator's latent
   UNet, conditioned on the null context as DiffSeg runs Stable Diffusion without a prompt): attention clustering
   with DiffSeg's merge as published (absolute symmetric-KL threshold) and the bundle's relative variant, over
   timestep, merge threshold, anchor grid and attention layers (every layer weighted by its grid, or the finest
   grid only); and k-means on the finest decoder features over timestep and number of clusters. One UNet call per
   (UNet, timestep, image) serves every setting.
2. **Test** (JSRT test) for the best setting of each method and UNet: (a) the label-free lung choice the bundle
   serves (bundle.zero_shot.lung_clusters: clusters darker than the image's mean that stay off the image border;
   right lung = the image's left half of that mask), Dice per lung and both lungs, HD95; (b) the matched reading
   of the paper (clusters more than half inside the true lungs), an upper bound that looks at the truth.
   Beside them: the same lung rule on plain 16 x 16 blocks, and the mean training mask (uses labels).
3. Figures: clusters and masks over 8 test films for the winner of each UNet; attention entropy per layer.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import time
from pathlib import Path

import numpy as np
import torch
from monai.metrics import HausdorffDistanceMetric

ROOT = Path(__file__).resolve().parents[1]

from bundle import zero_shot as zs
from bundle.cli import config_workflow, parse_overrides, pyplot
from bundle.constants import LUNG_MASK_COLUMNS
from bundle.data import preprocessed_stack, read_datalist
from bundle.heads.segmentation import read_masks
from bundle.workflow import set_threads

TIMESTEPS = {"denoiser": [50, 150, 300], "latent": [100, 300, 500]}
RELATIVE = [0.1, 0.2, 0.3]
DIFFSEG = [0.6, 0.9, 1.1]  # nats; DiffSeg's default 1.1
ANCHORS = [16, 32]
CLUSTERS = [4, 6, 8]


def candidates(timesteps: list[int], finest: int) -> list[dict]:
    """Every setting of the sweep for one UNet whose finest attention grid side is ``finest``."""
    out = []
    for t, layers, grid in itertools.product(timesteps, [None, [finest]], [g for g in ANCHORS if g <= finest]):
        out += [{"method": "attention", "merge": "diffseg", "timestep": t, "threshold": th, "grid": grid,
                 "grids": layers} for th in DIFFSEG]
        out += [{"method": "attention", "merge": "relative", "timestep": t, "threshold": th, "grid": grid,
                 "grids": layers} for th in RELATIVE]
    out += [{"method": "features", "timestep": t, "clusters": k} for t in timesteps for k in CLUSTERS]
    return out


def split_lungs(mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """A both-lungs mask ``(X, Y)`` (X to the right) into the patient's right lung (image left half) and left lung."""
    half = mask.shape[0] // 2
    right, left = mask.clone(), mask.clone()
    right[half:], left[:half] = False, False
    return {"mask_right_lung": right, "mask_left_lung": left}


def hd95(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    metric = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    value = metric(predicted.float()[None, None], truth.float()[None, None])
    return float(value.reshape(-1)[0])


def scores(masks: torch.Tensor, truth: dict[str, torch.Tensor]) -> dict:
    """Dice per lung and both lungs, HD95 of both lungs (pixels of the model's image size), over a batch."""
    both = truth["mask_right_lung"] | truth["mask_left_lung"]
    per = {"both": [zs.dice(m, t) for m, t in zip(masks, both)]}
    for column in LUNG_MASK_COLUMNS:
        per[column] = [zs.dice(split_lungs(m)[column], t) for m, t in zip(masks, truth[column])]
    out = {f"dice_{k.removeprefix('mask_')}": float(np.mean(v)) for k, v in per.items()}
    out["dice_both_std"] = float(np.std(per["both"]))
    distances = [hd95(m, t) for m, t in zip(masks, both) if m.any()]
    out["hd95_px"] = float(np.nanmean(distances)) if distances else float("nan")
    out["empty_masks"] = int(sum(not m.any() for m in masks))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True)
    parser.add_argument("--denoiser_args", default="", help="overrides naming the pre-trained denoiser "
                        "(configs/heads/zero_shot.json), e.g. '--work_dir runs/heads128/pretrain'")
    parser.add_argument("--latent_args", default="", help="overrides naming the trained generator (configs/inference.json)")
    parser.add_argument("--select_on", type=int, default=16, help="train films used to choose the settings")
    parser.add_argument("--torch_threads", type=int)
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results/zero_shot")
    args = parser.parse_args()
    os.chdir(ROOT)
    set_threads(args.torch_threads)
    start = time.perf_counter()
    models = {}
    if not args.denoiser_args and not args.latent_args:
        raise SystemExit("Give --denoiser_args, --latent_args or both.")
    size = preprocessing = None
    if args.denoiser_args:
        d = config_workflow("configs/heads/zero_shot.json", "inference",
                            **parse_overrides(shlex.split(args.denoiser_args))).parser.get_parsed_content
        size, preprocessing = int(d("model_image_size")), d("preprocessing")
        models["denoiser"] = (d("trained_denoiser"), d("train_scheduler"), lambda images: (images * 2 - 1, None))
    if args.latent_args:
        g = config_workflow("configs/inference.json", "sample",
                            **parse_overrides(shlex.split(args.latent_args))).parser.get_parsed_content
        generator = g("generator")
        if size is not None and generator.image_size != size:
            raise SystemExit(f"The generator works at {generator.image_size} px and the denoiser at {size} px: compare "
                             "models of one size.")
        size, preprocessing = generator.image_size, generator.preprocessing
        null = torch.zeros(1, generator.dino.num_tokens, generator.dino.embed_dim)  # the condition-dropout context
        models["latent"] = (generator.unet, generator.sampler("ddpm"),
                            lambda images: (generator.codec.encode(images), null.expand(len(images), -1, -1)))

    def load(rows):
        images = preprocessed_stack(rows, preprocessing)
        truth = {c: torch.stack([read_masks(r, [c], (size, size))[0] for r in rows]).bool() for c in LUNG_MASK_COLUMNS}
        return images, truth

    def run_unet(name, images, timestep):  # one UNet call gives both the attention maps and the decoder features
        unet, scheduler, prepare = models[name]
        inputs, context = prepare(images)
        return zs.unet_internals(unet, inputs, timestep, scheduler, context)

    def apply(setting, maps, features, images):
        if setting["method"] == "features":
            return zs.feature_segment(features, images, setting["clusters"])
        return zs.segment(maps, images, setting["grid"], setting["threshold"], merge=setting["merge"],
                          grids=setting["grids"])

    def evaluate(setting, labels, lungs, truth):
        both = truth["mask_right_lung"] | truth["mask_left_lung"]
        matched = torch.stack([zs.oracle_clusters(lab, t) for lab, t in zip(labels, both)])
        return {**setting, "label_free": scores(lungs, truth), "matched_upper_bound": scores(matched, truth),
                "mean_clusters": float(np.mean([lab.unique().numel() for lab in labels]))}

    train_images, train_truth = load(read_datalist(args.train)[: args.select_on])
    test_rows = read_datalist(args.test)
    test_images, test_truth = load(test_rows)
    result: dict = {"image_size": size, "select_on_train_images": args.select_on, "sweep": {}, "test": {},
                    "seconds_per_image": {}, "attention_entropy": {}}
    kept = {}
    for name in models:
        sweep = []
        finest = None
        for t in TIMESTEPS[name]:
            maps, features = run_unet(name, train_images, t)
            finest = max(int(round(m.shape[-1] ** 0.5)) for m in maps)
            settings = candidates([t], finest)
            for setting in settings:
                labels, lungs = apply(setting, maps, features, train_images)
                sweep.append(evaluate(setting, labels, lungs, train_truth))
            print(f"{name} t={t}: {len(settings)} settings on train", flush=True)
        result["sweep"][name] = sweep
        for method in ("attention", "features"):
            runs = [r for r in sweep if r["method"] == method]
            best = max(runs, key=lambda r: r["label_free"]["dice_both"])
            chosen = {k: v for k, v in best.items() if k not in ("label_free", "matched_upper_bound", "mean_clusters")}
            t0 = time.perf_counter()
            maps, features = run_unet(name, test_images, chosen["timestep"])
            labels, lungs = apply(chosen, maps, features, test_images)
            seconds = (time.perf_counter() - t0) / len(test_images)
            result["test"][f"{name}_{method}"] = {**evaluate(chosen, labels, lungs, test_truth),
                                                  "train_dice_both": best["label_free"]["dice_both"],
                                                  "seconds_per_image": seconds}
            kept[f"{name}_{method}"] = (labels, lungs)
            if method == "attention":  # how far from uniform each layer's attention is (1 = uniform)
                result["attention_entropy"][name] = [
                    {"grid": int(round(m.shape[-1] ** 0.5)),
                     "entropy_over_uniform": float(-(m * m.clamp_min(1e-12).log()).sum(-1).mean() / np.log(m.shape[-1]))}
                    for m in maps]
            print(name, method, json.dumps(result["test"][f"{name}_{method}"]["label_free"]), flush=True)
    # beside them, always: the lung rule on square blocks (no network), and the mean training mask (labels)
    side = size // 16
    blocks = (torch.arange(size)[:, None] // side * 16 + torch.arange(size)[None, :] // side).long()
    block_lungs = torch.stack([zs.lung_clusters(blocks, im) for im in test_images])
    block_matched = torch.stack([zs.oracle_clusters(blocks, t) for t in test_truth["mask_right_lung"] |
                                 test_truth["mask_left_lung"]])
    result["test"]["blocks_16x16_rule"] = {"label_free": scores(block_lungs, test_truth),
                                           "matched_upper_bound": scores(block_matched, test_truth)}
    train_all, train_all_truth = load(read_datalist(args.train))
    mean_mask = torch.stack([train_all_truth[c].float().mean(0) > 0.5 for c in LUNG_MASK_COLUMNS]).any(0)
    result["test"]["mean_training_mask"] = {"label_free": scores(mean_mask.expand(len(test_images), -1, -1), test_truth)}
    result["wall_seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "zero_shot.json").write_text(json.dumps(result, indent=2))
    (args.out / "zero_shot_table.md").write_text(table(result))
    overlay(test_images, test_truth, kept, args.out / "zero_shot.png")
    entropy_plot(result["attention_entropy"], args.out / "attention_entropy.png")
    print(table(result))


def _setting(r: dict) -> str:
    if r.get("method") == "features":
        return f"k-means, {r['clusters']} clusters, t={r['timestep']}"
    if r.get("method") == "attention":
        layers = "all layers" if not r["grids"] else f"grid {r['grids'][0]} only"
        return f"{r['merge']} merge {r['threshold']:g}, anchors {r['grid']}, {layers}, t={r['timestep']}"
    return "-"


def table(result: dict) -> str:
    lines = ["| method | setting (chosen on train) | right lung | left lung | both lungs | HD95 px | matched reading, both "
             "(upper bound) | s / image |", "|---|---|---|---|---|---|---|---|"]
    for name, r in result["test"].items():
        free, matched = r["label_free"], r.get("matched_upper_bound")
        lines.append(f"| {name} | {_setting(r)} | {free['dice_right_lung']:.3f} | {free['dice_left_lung']:.3f} | "
                     f"{free['dice_both']:.3f} ± {free['dice_both_std']:.3f} | {free['hd95_px']:.1f} | "
                     f"{matched['dice_both']:.3f} |" if matched else f"| {name} | {_setting(r)} | "
                     f"{free['dice_right_lung']:.3f} | {free['dice_left_lung']:.3f} | {free['dice_both']:.3f} ± "
                     f"{free['dice_both_std']:.3f} | {free['hd95_px']:.1f} | - |")
        lines[-1] += f" {r['seconds_per_image']:.2f} |" if "seconds_per_image" in r else " - |"
    return "\n".join(lines) + "\n"


def overlay(images, truth, kept, path: Path, count: int = 8) -> None:
    plt = pyplot()

    both = truth["mask_right_lung"] | truth["mask_left_lung"]
    names = list(kept)
    fig, axes = plt.subplots(len(names) * 2, count, figsize=(1.8 * count, 3.8 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        labels, lungs = kept[name]
        for j in range(min(count, len(images))):
            image = images[j, 0].numpy().T
            ax = axes[2 * row, j]
            ax.imshow(image, cmap="gray")
            lab = labels[j].numpy().T
            edges = np.zeros_like(lab, dtype=bool)
            edges[1:] |= lab[1:] != lab[:-1]
            edges[:, 1:] |= lab[:, 1:] != lab[:, :-1]
            ax.imshow(np.ma.masked_where(~edges, np.ones_like(image)), cmap="autumn", alpha=0.9)
            ax.set_title(f"{name}: clusters", fontsize=6)
            ax = axes[2 * row + 1, j]
            ax.imshow(image, cmap="gray")
            ax.contour(both[j].numpy().T.astype(float), levels=[0.5], colors="lime", linewidths=0.8)
            if lungs[j].any():
                ax.contour(lungs[j].numpy().T.astype(float), levels=[0.5], colors="red", linewidths=0.8)
            ax.set_title(f"label-free Dice {zs.dice(lungs[j], both[j]):.2f}", fontsize=6)
        for ax in axes[2 * row : 2 * row + 2].flat:
            ax.axis("off")
    fig.suptitle("zero-shot lungs on JSRT test: red = label-free choice, green = truth", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def entropy_plot(entropy: dict, path: Path) -> None:
    if not entropy:
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, layers in entropy.items():
        ax.plot(range(len(layers)), [l["entropy_over_uniform"] for l in layers], marker="o", label=name)
        for i, l in enumerate(layers):
            ax.annotate(str(l["grid"]), (i, l["entropy_over_uniform"]), fontsize=6)
    ax.set_xlabel("self-attention layer, in call order (label: grid side)")
    ax.set_ylabel("entropy / log(tokens)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
