"""Few-shot landmark and segmentation heads: the diffusion-pre-trained denoiser against the same network from
scratch, for several numbers N of labelled training images (the first N), scored on a test split.

    python -m evidence.run_heads --train runs/heads/train.csv --test runs/heads/test.csv \\
        --denoiser runs/heads/models/heads/denoiser.pt --sizes 1 5 10 25 50 --seeds 0 --out docs/results \\
        -- --image_size 64          (the overrides configs/heads/pretrain.json was run with)

Trivial baselines from all training images, scored on test: the mean landmark shape (MRE/SDR) and the mean
mask per structure (Dice). Results per run are appended to <work>/heads_results.jsonl, so an interrupted
run continues.
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
from monai.losses import DiceCELoss

ROOT = Path(__file__).resolve().parents[1]

from bundle.cli import config_workflow, parse_overrides, pyplot
from bundle.constants import JSRT_MASK_COLUMNS, LUNG_MASK_COLUMNS, MASK_COLUMN_PREFIX
from bundle.data import read_datalist
from bundle.io import append_jsonl
from bundle.heads.inference import predict
from bundle.heads.landmarks import HeatmapCrossEntropy, decode_heatmaps, landmark_metrics, load_landmarks
from bundle.heads.networks import MASK_PRIOR_BIAS, LatentDenseHead, build_head
from bundle.heads.segmentation import dice_and_hausdorff
from bundle.heads.training import fine_tune, landmark_items, mask_items

INITS = {"pretrained": "image denoiser, pre-trained", "pretrained_large": "image denoiser, pre-trained on the larger set",
         "scratch": "same network, from scratch",
         "latent": "latent UNet (main pipeline), pre-trained"}
STRUCTURES = list(JSRT_MASK_COLUMNS)


def segmentation_scores(predicted: torch.Tensor, true: torch.Tensor) -> dict:
    """Per-structure Dice/HD95 of ``(B, C, X, Y)`` masks, their mean Dice and the mean Dice of the two lungs."""
    per = dice_and_hausdorff(predicted, true, STRUCTURES)
    return {"per_structure": per, "mean_dice": float(np.mean([v["dice"] for v in per.values()])),
            "lung_dice": float(np.mean([per[c]["dice"] for c in LUNG_MASK_COLUMNS]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True)
    parser.add_argument("--denoiser", type=Path, required=True, help="pre-trained denoiser (configs/heads/pretrain.json)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 5, 10, 25, 50])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--pixel_spacing", type=float, default=0.7, help="mm per pixel of the landmark frame (JSRT 512 px)")
    parser.add_argument("--tasks", nargs="+", default=["landmarks", "segmentation"])
    parser.add_argument("--denoiser_large", type=Path, help="a second pre-trained denoiser (e.g. on a larger unlabelled "
                        "set), the init 'pretrained_large'")
    parser.add_argument("--inits", nargs="+", default=["pretrained", "scratch"],
                        choices=["pretrained", "pretrained_large", "scratch", "latent"],
                        help="pretrained: the image-space denoiser; scratch: the same network untrained; latent: the main "
                             "pipeline's latent UNet and autoencoder (give --latent_args)")
    parser.add_argument("--latent_args", default="", help="overrides for configs/inference.json naming the trained latent "
                        "model, as one string: '--work_dir runs/foundation_dino --image_size 64 ...'")
    parser.add_argument("--work", type=Path, default=ROOT / "runs/heads")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results")
    parser.add_argument("--report_only", action="store_true", help="train nothing: tables and plot from the runs on record")
    parser.add_argument("overrides", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    overrides = parse_overrides(args.overrides)
    os.chdir(ROOT)

    wf = config_workflow("configs/heads/pretrain.json", "training", **overrides)
    get = wf.parser.get_parsed_content
    size, preprocessing = int(get("image_size")), get("preprocessing")
    sigma = 5.0 * size / 256  # Di Via et al.: sigma 5 at 256 pixels
    train_rows, test_rows = read_datalist(args.train), read_datalist(args.test)
    args.work.mkdir(parents=True, exist_ok=True)
    results_path = args.work / "heads_results.jsonl"
    done = {}
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            r = json.loads(line)
            done[(r["task"], r["size"], r["init"], r["seed"])] = r

    data: dict = {}
    if "landmarks" in args.tasks:
        data["landmarks"] = (landmark_items(train_rows[: max(args.sizes)], preprocessing, size, None, sigma),
                             landmark_items(test_rows, preprocessing, size, None, sigma))
    if "segmentation" in args.tasks:
        data["segmentation"] = (mask_items(train_rows[: max(args.sizes)], preprocessing, size, STRUCTURES),
                                mask_items(test_rows, preprocessing, size, STRUCTURES))

    def score(task: str, outputs: torch.Tensor, test_items: list) -> dict:
        if task == "landmarks":
            pred = decode_heatmaps(outputs).numpy()
            pred = np.stack([it["frame"].to_original(p) for it, p in zip(test_items, pred)])
            true = np.stack([it["frame"].to_original(it["points"]) for it in test_items])
            return landmark_metrics(pred, true, pixel_spacing=args.pixel_spacing)
        masks = (torch.sigmoid(outputs) > 0.5).float()
        return segmentation_scores(masks, torch.stack([it["label"] for it in test_items]))

    # seed-major, so an interrupted invocation leaves whole seeds done
    runs = [(t, n, init, s) for s in args.seeds for t in args.tasks for n in args.sizes for init in args.inits]
    latent = None
    if "pretrained_large" in args.inits and args.denoiser_large is None and not args.report_only:
        raise SystemExit("--inits pretrained_large needs --denoiser_large (the second pre-trained denoiser file).")
    if "latent" in args.inits and not args.report_only:
        lwf = config_workflow("configs/inference.json", "sample", **parse_overrides(shlex.split(args.latent_args)))
        if lwf.parser.get_parsed_content("generator").image_size != size:
            raise SystemExit("--latent_args must give the same --image_size as the heads.")
        latent = lwf.parser
    start = time.perf_counter()
    for i, (task, n, init, seed) in enumerate(runs):
        if (task, n, init, seed) in done or args.report_only:
            continue
        train_items, test_items = data[task]
        torch.manual_seed(seed)
        channels = train_items[0]["label"].shape[0]
        bias = MASK_PRIOR_BIAS if task == "segmentation" else 0.0
        if init == "latent":
            generator = latent.get_parsed_content("generator", lazy=False)  # a fresh copy to fine-tune
            head = LatentDenseHead(generator.codec, generator.unet, channels,
                                   (generator.dino.num_tokens, generator.dino.embed_dim), bias)
        else:
            unet = wf.parser.get_parsed_content("denoiser_def", lazy=False)()
            weights = {"pretrained": args.denoiser, "pretrained_large": args.denoiser_large}.get(init)
            head = build_head(unet, channels, weights, bias)
        loss = HeatmapCrossEntropy() if task == "landmarks" else DiceCELoss(sigmoid=True)
        t0 = time.perf_counter()
        losses = fine_tune(head, train_items[:n], loss, args.iterations, lr=args.lr, seed=seed)
        outputs = predict(head, torch.stack([it["image"] for it in test_items]))
        record = {"task": task, "size": n, "init": init, "seed": seed, "iterations": args.iterations,
                  "first_loss": float(np.mean(losses[:10])), "last_loss": float(np.mean(losses[-10:])),
                  "seconds": time.perf_counter() - t0, **score(task, outputs, test_items)}
        append_jsonl(results_path, record)
        done[(task, n, init, seed)] = record
        print(f"[{i + 1}/{len(runs)}] {task} N={n} {init} seed {seed}: "
              f"{record.get('mre_px', record.get('mean_dice')):.4g} ({record['seconds']:.0f} s)", flush=True)

    # trivial baselines from all training images
    baselines = {}
    if "landmarks" in args.tasks:
        mean_shape = np.mean([load_landmarks(r["landmark_file"]) for r in train_rows], axis=0)
        true = np.stack([it["frame"].to_original(it["points"]) for it in data["landmarks"][1]])
        baselines["landmarks_mean_shape"] = landmark_metrics(np.broadcast_to(mean_shape, true.shape), true,
                                                             pixel_spacing=args.pixel_spacing)
    if "segmentation" in args.tasks:
        all_train = mask_items(train_rows, preprocessing, size, STRUCTURES)
        mean_mask = (torch.stack([it["label"] for it in all_train]).mean(0) > 0.5).float()
        test_masks = torch.stack([it["label"] for it in data["segmentation"][1]])
        baselines["segmentation_mean_mask"] = segmentation_scores(mean_mask.expand_as(test_masks), test_masks)
    records = [done[r] for r in runs if r in done]
    result = {"settings": {**overrides, "image_size": size, "heatmap_sigma_px": sigma, "iterations": args.iterations,
                           "lr": args.lr, "sizes": args.sizes, "seeds": args.seeds, "denoiser": str(args.denoiser),
                           "denoiser_large": str(args.denoiser_large) if args.denoiser_large else None},
              "baselines": baselines, "runs": records, "wall_seconds_this_invocation": time.perf_counter() - start}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "heads.json").write_text(json.dumps(result, indent=2))
    plot(records, baselines, args.out / "heads.png")
    (args.out / "heads_table.md").write_text(table(records, baselines))
    print(json.dumps(baselines, indent=1)[:2000])


def table(records: list, baselines: dict) -> str:
    """Markdown: landmark MRE/SDR and segmentation Dice per N, pre-trained vs scratch (mean over seeds), baselines."""
    lines = []
    marks = [r for r in records if r["task"] == "landmarks"]
    if marks:
        lines += ["| landmarks | N | seeds | MRE px (512 frame) | MRE mm | SDR 2 px | SDR 4 px | SDR 10 px |",
                  "|---|---|---|---|---|---|---|---|"]
        for n in sorted({r["size"] for r in marks}):
            for init in INITS:
                rows = [r for r in marks if r["size"] == n and r["init"] == init]
                if not rows:
                    continue
                mean = {k: np.mean([r[k] for r in rows]) for k in ("mre_px", "mre_mm", "sdr_2px", "sdr_4px", "sdr_10px")}
                spread = f" ± {np.std([r['mre_px'] for r in rows]):.1f}" if len(rows) > 1 else ""
                lines.append(f"| {init} | {n} | {len(rows)} | {mean['mre_px']:.1f}{spread} | {mean['mre_mm']:.1f} | {mean['sdr_2px']:.3f} | "
                             f"{mean['sdr_4px']:.3f} | {mean['sdr_10px']:.3f} |")
        if "landmarks_mean_shape" in baselines:
            b = baselines["landmarks_mean_shape"]
            lines.append(f"| mean training shape | all | - | {b['mre_px']:.1f} | {b['mre_mm']:.1f} | {b['sdr_2px']:.3f} | "
                         f"{b['sdr_4px']:.3f} | {b['sdr_10px']:.3f} |")
        lines.append("")
    segs = [r for r in records if r["task"] == "segmentation"]
    if segs:
        names = list(segs[0]["per_structure"])
        lines += ["| segmentation | N | seeds | " + " | ".join(n.removeprefix(MASK_COLUMN_PREFIX) for n in names) + " | mean Dice |",
                  "|---|---|---|" + "---|" * (len(names) + 1)]
        for n in sorted({r["size"] for r in segs}):
            for init in INITS:
                rows = [r for r in segs if r["size"] == n and r["init"] == init]
                if not rows:
                    continue
                cells = [np.mean([r["per_structure"][k]["dice"] for r in rows]) for k in names]
                spread = f" ± {np.std([r['mean_dice'] for r in rows]):.3f}" if len(rows) > 1 else ""
                lines.append(f"| {init} | {n} | {len(rows)} | " + " | ".join(f"{c:.3f}" for c in cells) +
                             f" | {np.mean([r['mean_dice'] for r in rows]):.3f}{spread} |")
        if "segmentation_mean_mask" in baselines:
            b = baselines["segmentation_mean_mask"]
            lines.append("| mean training mask | all | - | " + " | ".join(f"{b['per_structure'][k]['dice']:.3f}" for k in names)
                         + f" | {b['mean_dice']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(records: list, baselines: dict, path: Path) -> None:
    plt = pyplot()

    panels = [("landmarks", "mre_px", "landmark MRE (px, 512 frame)", "landmarks_mean_shape"),
              ("segmentation", "lung_dice", "lung Dice", "segmentation_mean_mask")]
    panels = [p for p in panels if any(r["task"] == p[0] for r in records)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (task, key, label, base) in zip(axes[0], panels):
        for init in INITS:
            rows = [r for r in records if r["task"] == task and r["init"] == init]
            if not rows:
                continue
            sizes = sorted({r["size"] for r in rows})
            values = [[r[key] for r in rows if r["size"] == s] for s in sizes]
            ax.errorbar(sizes, [np.mean(v) for v in values], yerr=[np.std(v) for v in values], marker="o", capsize=3,
                        label=INITS[init])
        if base in baselines:
            ax.axhline(baselines[base][key], color="grey", linestyle="--", label="mean of training set")
        ax.set_xscale("log")
        ax.set_xlabel("labelled training images N")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
