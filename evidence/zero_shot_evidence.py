"""Zero-shot lung segmentation on JSRT without labels: DiffSeg on self-attention, and k-means on decoder features,
from a diffusion UNet (docs/results/zero_shot.md; numbers in <out>/zero_shot.json, tables in
<out>/zero_shot_table.md, figures).

    python -m evidence.zero_shot_evidence --train runs/heads128/train.csv --test runs/heads128/test.csv \\
        --denoiser_args "--work_dir runs/heads128/pretrain" --latent_args "--work_dir runs/corpus_cpu128" \\
        --out docs/results/zero_shot128

Each UNet is loaded by configs/heads/zero_shot.json (zero_shot_model denoiser / generator; the args are that
config's overrides, e.g. --model_path for a snapshot), so the sweep measures exactly what the config serves.
``zero_shot.json`` records the models by content (``model_ids``) and the films; with --skip_measured a run whose
results are already there for the same models and films does nothing, so a resumed pipeline does not repeat it.

1. **Sweep on train only** (the first --select_on JSRT train films; their masks are used for this choice and nothing
   else), for each UNet (the label-free image-space denoiser; the generator's latent UNet with the null condition,
   as DiffSeg runs Stable Diffusion without a prompt): attention clustering with DiffSeg's merge as published
   (absolute symmetric-KL thresholds: its 1.1, and thresholds on the scale of these models' anchor distances) and
   the bundle's relative variant, over timestep, merge threshold, anchor grid and attention layers (every layer
   weighted by its grid, or the finest grid only); and k-means on the last two decoder blocks' features over
   timestep and number of clusters; each of them with the lung rule's threshold (the image's mean or Otsu's
   threshold inside the border band, times 1, 1.05 or 1.1), and the rule alone on single pixels with no UNet
   (method ``intensity``) under the same thresholds.
2. **Test** (JSRT test) for the best setting of each UNet and method: (a) the label-free lung choice the bundle
   serves (bundle.zero_shot.lung_clusters: clusters darker than the swept threshold that stay off the image border,
   then the two largest regions with holes filled; right lung = the image's left half of that mask), Dice per lung
   and both lungs, HD95; (b) the matched reading of the paper (clusters more than half inside the true lungs), an
   upper bound that looks at the truth, for that setting and for the setting that maximises it on train. Beside
   them: the untuned lung rule (image mean x 1) with no network, on every pixel and on 16 x 16 blocks, and the mean
   training mask (uses labels). The served method is the UNet and method (or the rule alone) with the best
   label-free Dice on train ("served").
3. Figures: clusters and masks over 8 test films for the label-free setting of each UNet and method; attention
   entropy per layer.
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
from bundle.data import content_id, preprocessed_stack, read_datalist
from bundle.heads.segmentation import read_masks
from bundle.io import atomic_write_json
from bundle.workflow import set_threads

TIMESTEPS = {"denoiser": [50, 150, 300], "generator": [50, 100, 300]}  # DiffSeg reads Stable Diffusion at 300
RELATIVE = [0.1, 0.2]
# nats. DiffSeg's default is 1.1; the symmetric KL between two anchors of these small UNets is mostly below 0.15
# (their attention is near uniform), so the published thresholds merge the whole image into one cluster and the
# sweep also covers thresholds on the scale of these models' distances
DIFFSEG = [0.005, 0.01, 0.02, 0.05, 1.1]
ANCHORS = [16, 32]
CLUSTERS = [8, 16, 32]
FEATURE_BLOCKS = [-1, -2]  # the finest decoder block, and the one above it
# the lung rule's threshold (bundle.zero_shot.lung_clusters): the image's mean or Otsu's threshold inside the border
# band, times a scale; swept with every clustering setting, since the clusters are made once and the rule is cheap
RULES = [{"lung_threshold": t, "lung_scale": k} for t in ("mean", "otsu") for k in (1.0, 1.05, 1.1)]


def candidates(timesteps: list[int], finest: int) -> list[dict]:
    """Every setting of the sweep for one UNet whose finest attention grid side is ``finest``."""
    out = []
    for t, layers, grid in itertools.product(timesteps, [None, [finest]], [g for g in ANCHORS if g <= finest]):
        out += [{"method": "attention", "merge": "diffseg", "timestep": t, "threshold": th, "grid": grid,
                 "grids": layers} for th in DIFFSEG]
        out += [{"method": "attention", "merge": "relative", "timestep": t, "threshold": th, "grid": grid,
                 "grids": layers} for th in RELATIVE]
    out += [{"method": "features", "timestep": t, "feature_block": b, "clusters": k}
            for t in timesteps for b in FEATURE_BLOCKS for k in CLUSTERS]
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


def scores(masks: torch.Tensor, truth: dict[str, torch.Tensor], distances: bool = True) -> dict:
    """Dice per lung and both lungs, HD95 of both lungs (pixels of the model's image size; ``distances=False``
    leaves it out, as the sweep does), over a batch."""
    both = truth["mask_right_lung"] | truth["mask_left_lung"]
    per = {"both": [zs.dice(m, t) for m, t in zip(masks, both)]}
    for column in LUNG_MASK_COLUMNS:
        per[column] = [zs.dice(split_lungs(m)[column], t) for m, t in zip(masks, truth[column])]
    out = {f"dice_{k.removeprefix('mask_')}": float(np.mean(v)) for k, v in per.items()}
    out["dice_both_std"] = float(np.std(per["both"]))
    if distances:
        values = [hd95(m, t) for m, t in zip(masks, both) if m.any()]
        out["hd95_px"] = float(np.nanmean(values)) if values else float("nan")
    out["empty_masks"] = int(sum(not m.any() for m in masks))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True)
    parser.add_argument("--denoiser_args", default="", help="overrides of configs/heads/zero_shot.json naming the "
                        "pre-trained denoiser, e.g. '--work_dir runs/heads128/pretrain'")
    parser.add_argument("--latent_args", default="", help="overrides of configs/heads/zero_shot.json naming the "
                        "trained generator, e.g. '--work_dir runs/corpus_cpu128' (or '--model_path' a snapshot)")
    parser.add_argument("--select_on", type=int, default=16, help="train films used to choose the settings")
    parser.add_argument("--torch_threads", type=int)
    parser.add_argument("--skip_measured", action="store_true", help="do nothing where <out>/zero_shot.json was "
                        "measured on these models (by content) with the same --select_on, --train and --test")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results/zero_shot")
    args = parser.parse_args()
    os.chdir(ROOT)
    set_threads(args.torch_threads)
    start = time.perf_counter()
    if not args.denoiser_args and not args.latent_args:
        raise SystemExit("Give --denoiser_args, --latent_args or both.")
    models = {}
    for name, overrides in (("denoiser", args.denoiser_args), ("generator", args.latent_args)):
        if overrides:
            models[name] = config_workflow("configs/heads/zero_shot.json", "inference", zero_shot_model=name,
                                           **parse_overrides(shlex.split(overrides))).parser.get_parsed_content("zero_shot_unet")
    if len({m.image_size for m in models.values()}) > 1:
        raise SystemExit(f"The UNets work at different sizes ({ {k: m.image_size for k, m in models.items()} }): compare "
                         "models of one size.")
    measured_on = {"model_ids": {k: content_id(m.path) for k, m in models.items()}, "select_on_train_images":
                   args.select_on, "train_list": str(args.train), "test_list": str(args.test)}
    earlier = args.out / "zero_shot.json"
    if args.skip_measured and earlier.is_file():
        if {k: json.loads(earlier.read_text()).get(k) for k in measured_on} == measured_on:
            print(f"{earlier} was measured on these models and films: nothing to do (delete it to measure again).")
            return
    first = next(iter(models.values()))
    size, preprocessing = first.image_size, first.preprocessing

    def load(rows):
        images = preprocessed_stack(rows, preprocessing)
        truth = {c: torch.stack([read_masks(r, [c], (size, size))[0] for r in rows]).bool() for c in LUNG_MASK_COLUMNS}
        return images, truth

    def internals(name, images, timestep):
        """One UNet call for the attention maps and the finest decoder features, one more for the block above."""
        maps, finest = models[name].internals(images, timestep, feature_block=-1)
        coarser = models[name].internals(images, timestep, attention=False, feature_block=-2)[1]
        return maps, {-1: finest, -2: coarser}

    def apply(setting, maps, features, images):
        """The cluster labels of a setting (its lung rule is applied by lungs_of)."""
        if setting["method"] == "intensity":
            return zs.pixel_labels(images)
        if setting["method"] == "features":
            return zs.feature_segment(features[setting["feature_block"]], images, setting["clusters"])[0]
        return zs.segment(maps, images, setting["grid"], setting["threshold"], merge=setting["merge"],
                          grids=setting["grids"])[0]

    def lungs_of(setting, labels, images):
        return zs.lung_masks(labels, images, zs.lung_rule(setting["lung_threshold"], setting["lung_scale"]))

    def evaluate(setting, labels, lungs, truth, distances=True):
        both = truth["mask_right_lung"] | truth["mask_left_lung"]
        matched = torch.stack([zs.oracle_clusters(lab, t) for lab, t in zip(labels, both)])
        return {**setting, "label_free": scores(lungs, truth, distances),
                "matched_upper_bound": scores(matched, truth, distances),
                "mean_clusters": float(np.mean([lab.unique().numel() for lab in labels]))}

    def sweep_settings(settings, maps, features, images, truth):
        """Every setting with every lung rule: its clusters once, the rule on them per variant."""
        rows = []
        for setting in settings:
            labels = apply(setting, maps, features, images)
            for rule in RULES:
                full = {**setting, **rule}
                rows.append(evaluate(full, labels, lungs_of(full, labels, images), truth, distances=False))
        return rows

    def settings_of(r):
        return {k: v for k, v in r.items() if k not in ("label_free", "matched_upper_bound", "mean_clusters")}

    train_images, train_truth = load(read_datalist(args.train)[: args.select_on])
    test_rows = read_datalist(args.test)
    test_images, test_truth = load(test_rows)
    result: dict = {"image_size": size, **measured_on, "models": {k: m.path for k, m in models.items()},
                    "sweep": {}, "test": {}, "attention_entropy": {}}
    kept = {}
    for name in [*models, "intensity"]:  # intensity: the lung rule on single pixels, no UNet (its preprocessing only)
        sweep = []
        for t in ([None] if name == "intensity" else TIMESTEPS[name]):
            maps, features = internals(name, train_images, t) if t is not None else (None, None)
            settings = [{"method": "intensity"}] if t is None else candidates(
                [t], max(int(round(m.shape[-1] ** 0.5)) for m in maps))
            sweep += sweep_settings(settings, maps, features, train_images, train_truth)
            print(f"{name} t={t}: {len(settings)} settings x {len(RULES)} lung rules on train", flush=True)
        result["sweep"][name] = sweep
        for method in ("intensity",) if name == "intensity" else ("attention", "features"):
            runs = [r for r in sweep if r["method"] == method]
            # (a) the setting with the best label-free Dice on train; (b) the paper-style reading's own best setting
            readings = [("label_free", name if name == "intensity" else f"{name}_{method}")]
            if method != "intensity":  # the matched reading of single pixels is the truth itself
                readings.append(("matched_upper_bound", f"{name}_{method}_matched"))
            for reading, key in readings:
                best = max(runs, key=lambda r: r[reading]["dice_both"])
                chosen = settings_of(best)
                t0 = time.perf_counter()  # only the UNet call this setting needs, as the config makes it
                maps = features = None
                if chosen["method"] == "features":
                    features = {chosen["feature_block"]: models[name].internals(
                        test_images, chosen["timestep"], attention=False, feature_block=chosen["feature_block"])[1]}
                elif chosen["method"] == "attention":
                    maps = models[name].internals(test_images, chosen["timestep"], features=False)[0]
                labels = apply(chosen, maps, features, test_images)
                lungs = lungs_of(chosen, labels, test_images)
                seconds = (time.perf_counter() - t0) / len(test_images)
                result["test"][key] = {**evaluate(chosen, labels, lungs, test_truth), "chosen_by": reading,
                                       "train_dice_both": best[reading]["dice_both"], "seconds_per_image": seconds}
                if reading == "label_free":
                    kept[key] = (labels, lungs)
                print(key, json.dumps(result["test"][key][reading]), flush=True)
            if method == "attention":  # how far from uniform each layer's attention is (1 = uniform), on test
                result["attention_entropy"][name] = [
                    {"grid": int(round(m.shape[-1] ** 0.5)),
                     "entropy_over_uniform": float(-(m * m.clamp_min(1e-12).log()).sum(-1).mean() / np.log(m.shape[-1]))}
                    for m in maps]
    # the served method: the UNet and method with the best label-free Dice on train
    served = max((k for k in result["test"] if not k.endswith("_matched")),
                 key=lambda k: result["test"][k]["train_dice_both"])
    result["served"] = {"name": served, "model": served.split("_")[0] if served != "intensity" else first.model,
                        "settings": settings_of({k: v for k, v in result["test"][served].items()
                                                                 if k not in ("chosen_by", "train_dice_both",
                                                                              "seconds_per_image")})}
    # beside them, always: the lung rule with no network, on every pixel and on 16 x 16 square blocks, and the mean
    # training mask (which uses labels)
    side = size // 16
    grids = {"pixels_rule": torch.arange(size * size).reshape(size, size),
             "blocks_16x16_rule": (torch.arange(size)[:, None] // side * 16 + torch.arange(size)[None, :] // side).long()}
    for key, labels in grids.items():
        train_lungs = zs.lung_masks(labels.expand(len(train_images), -1, -1), train_images)
        lungs = zs.lung_masks(labels.expand(len(test_images), -1, -1), test_images)
        matched = torch.stack([zs.oracle_clusters(labels, t) for t in test_truth["mask_right_lung"] |
                               test_truth["mask_left_lung"]])
        result["test"][key] = {"lung_threshold": "mean", "lung_scale": 1.0, "description": (
                                   "single pixels" if key == "pixels_rule" else "16 x 16 square blocks") + ", no UNet",
                               "label_free": scores(lungs, test_truth), "matched_upper_bound": scores(matched, test_truth),
                               "mean_clusters": float(labels.unique().numel()),
                               "train_dice_both": scores(train_lungs, train_truth)["dice_both"]}
    train_all, train_all_truth = load(read_datalist(args.train))
    mean_mask = torch.stack([train_all_truth[c].float().mean(0) > 0.5 for c in LUNG_MASK_COLUMNS]).any(0)
    result["test"]["mean_training_mask"] = {"label_free": scores(mean_mask.expand(len(test_images), -1, -1), test_truth)}
    result["wall_seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "zero_shot_table.md").write_text(table(result))
    overlay(test_images, test_truth, kept, args.out / "zero_shot.png")
    entropy_plot(result["attention_entropy"], args.out / "attention_entropy.png")
    atomic_write_json(args.out / "zero_shot.json", result)  # last: what --skip_measured reads as done
    print(table(result))


def _setting(r: dict) -> str:
    rule = (f"lung rule: {'Otsu' if r['lung_threshold'] == 'otsu' else 'image mean'} x {r['lung_scale']:g}"
            if "lung_threshold" in r else "")
    if r.get("method") == "features":
        return f"k-means, {r['clusters']} clusters, decoder block {r['feature_block']}, t={r['timestep']}; {rule}"
    if r.get("method") == "attention":
        layers = "all layers" if not r["grids"] else f"grid {r['grids'][0]} only"
        return f"{r['merge']} merge {r['threshold']:g}, anchors {r['grid']}, {layers}, t={r['timestep']}; {rule}"
    return f"{r.get('description', 'single pixels, no UNet')}; {rule}" if rule else "-"


CONFIG_KEYS = {"method": "zero_shot_method", "timestep": "attention_timestep", "clusters": "feature_clusters",
               "feature_block": "feature_block", "merge": "merge", "threshold": "merge_threshold", "grid": "anchor_grid",
               "grids": "attention_grids", "lung_threshold": "lung_threshold", "lung_scale": "lung_scale"}


def served_overrides(served: dict) -> str:
    """The served method as overrides of configs/heads/zero_shot.json."""
    model = served.get("model") or served["name"].split("_")[0]
    pairs = [("zero_shot_model", model)] + [(CONFIG_KEYS[k], v) for k, v in served["settings"].items() if k in CONFIG_KEYS]
    def shell(v):  # as `python -m monai.bundle run` (fire) reads it: None for null
        return v if isinstance(v, str) else "None" if v is None else shlex.quote(json.dumps(v).replace(" ", ""))

    return " ".join(f"--{k} {shell(v)}" for k, v in pairs)


def table(result: dict) -> str:
    lines = ["| method | setting (chosen on train) | clusters | right lung | left lung | both lungs | HD95 px | "
             "matched reading, both (upper bound) | s / image |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["test"].items():
        free, matched = r["label_free"], r.get("matched_upper_bound")
        if r.get("method") == "intensity" or name == "pixels_rule":
            matched = None  # single pixels matched to the truth are the truth
        chosen = " (setting chosen by the matched reading)" if r.get("chosen_by") == "matched_upper_bound" else ""
        clusters = f"{r['mean_clusters']:.0f}" if "mean_clusters" in r else "-"
        lines.append(f"| {name}{chosen} | {_setting(r)} | {clusters} | {free['dice_right_lung']:.3f} | "
                     f"{free['dice_left_lung']:.3f} | {free['dice_both']:.3f} ± {free['dice_both_std']:.3f} | "
                     f"{free['hd95_px']:.1f} | {matched['dice_both']:.3f} |" if matched else
                     f"| {name} | {_setting(r)} | - | {free['dice_right_lung']:.3f} | {free['dice_left_lung']:.3f} | "
                     f"{free['dice_both']:.3f} ± {free['dice_both_std']:.3f} | {free['hd95_px']:.1f} | - |")
        lines[-1] += f" {r['seconds_per_image']:.2f} |" if "seconds_per_image" in r else " - |"
    served = result.get("served")
    if served:
        lines.append(f"\nServed (best label-free Dice on train): **{served['name']}**, i.e. configs/heads/zero_shot.json "
                     f"with `{served_overrides(served)}`.")
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
            if np.unique(lab).size < lab.size:  # single pixels (intensity) have no cluster edges to draw
                edges = np.zeros_like(lab, dtype=bool)
                edges[1:] |= lab[1:] != lab[:-1]
                edges[:, 1:] |= lab[:, 1:] != lab[:, :-1]
                ax.imshow(np.ma.masked_where(~edges, np.ones_like(image)), cmap="autumn", alpha=0.9)
            ax.set_title(f"{name}: clusters" if np.unique(lab).size < lab.size else f"{name}: image", fontsize=6)
            ax = axes[2 * row + 1, j]
            ax.imshow(image, cmap="gray")
            ax.contour(both[j].numpy().T.astype(float), levels=[0.5], colors="lime", linewidths=0.8)
            if lungs[j].any():
                ax.contour(lungs[j].numpy().T.astype(float), levels=[0.5], colors="red", linewidths=0.8)
            ax.set_title(f"label-free Dice {zs.dice(lungs[j], both[j]):.2f}", fontsize=6)
        for ax in axes[2 * row : 2 * row + 2].flat:
            ax.axis("off")
    fig.suptitle("zero-shot lungs on JSRT test: red = label-free choice, green = truth", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # a band for the title above the panels' own
    fig.savefig(path, dpi=70)  # 8 films x 8 rows: about 1 MB
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
