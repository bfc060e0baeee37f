"""Few-shot landmark and segmentation heads: the diffusion-pre-trained denoiser against the same network from
scratch, for several numbers N of labelled training images (the first N), scored on a test split.

    python -m evidence.run_heads --train runs/heads/train.csv --test runs/heads/test.csv \\
        --denoiser runs/heads/models/heads/denoiser.pt --sizes 1 5 10 25 50 --seeds 0 --out docs/results \\
        -- --image_size 64          (the overrides configs/heads/pretrain.json was run with)

Trivial baselines from all training images, scored on test: the mean landmark shape (MRE/SDR) and the mean
mask per structure (Dice). Results per run are appended to <work>/heads_results.jsonl (or --results), so an
interrupted run continues; a fine-tune killed on the way goes on from its last checkpoint (<work>/checkpoints,
every 25 iterations, deleted once the run's row is written). Each row names the pre-trained files it started from
by content, and a row made from other weights than the ones given now is run again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric

ROOT = Path(__file__).resolve().parents[1]

from bundle.cli import config_workflow, parse_overrides, pyplot
from bundle.workflow import set_threads
from evidence.blind import record as record_blind
from bundle.constants import JSRT_MASK_COLUMNS, LUNG_MASK_COLUMNS, MASK_COLUMN_PREFIX
from bundle.data import content_id, find_images, read_datalist
from bundle.model_files import read_record
from bundle.models import build_network
from bundle.io import append_jsonl
from bundle.performance import autocast_dtype, precision_name
from bundle.heads.encoders import build_encoder_head, dino_encoder_spec
from bundle.heads.inference import infer, predict
from bundle.heads.landmarks import (SDR_THRESHOLDS_PX, HeatmapCrossEntropy, decode_heatmaps, landmark_layout,
                                   landmark_metrics, load_landmarks)
from bundle.heads.networks import MASK_PRIOR_BIAS, LatentDenseHead, build_head
from bundle.heads.segmentation import dice_and_hausdorff
from bundle.heads.training import fine_tune, landmark_items, mask_items

INITS = {"pretrained": "image denoiser, pre-trained", "pretrained_large": "image denoiser, pre-trained on the larger set",
         "scratch": "same network, from scratch",
         "latent": "latent UNet (main pipeline), pre-trained",
         "dino": "DINO ViT (same films) + light decoder",
         "vit_scratch": "same ViT + decoder, from scratch",
         "supervised": "supervised encoder (local weights file) + light decoder"}
STRUCTURES = list(JSRT_MASK_COLUMNS)
SDR = SDR_THRESHOLDS_PX  # the paper's thresholds, in pixels of the 512 frame
SDR_KEYS = [f"sdr_{t:g}px" for t in SDR]


def segmentation_scores(predicted: torch.Tensor, true: torch.Tensor) -> dict:
    """Per-structure Dice/HD95 of ``(B, C, X, Y)`` masks, their mean Dice and the mean Dice of the two lungs."""
    per = dice_and_hausdorff(predicted, true, STRUCTURES)
    return {"per_structure": per, "mean_dice": float(np.mean([v["dice"] for v in per.values()])),
            "lung_dice": float(np.mean([per[c]["dice"] for c in LUNG_MASK_COLUMNS]))}


def draw(available: int, n: int, seed: int, how: str = "first") -> list[int]:
    """The indices of the N training films of one run: the first N, or for ``how="random"`` and a seed other than 0
    a draw of N without replacement seeded by (seed, N), so seeds differ in their films as well as their start."""
    n = min(n, available)
    if how == "first" or seed == 0:
        return list(range(n))
    return sorted(int(i) for i in np.random.default_rng([seed, n]).choice(available, n, replace=False))


def encoder_spec(init: str, args: argparse.Namespace) -> dict:
    """The encoder of the ``dino``/``vit_scratch``/``supervised`` initialisations (bundle/heads/encoders.py)."""
    if init in ("dino", "vit_scratch"):
        if args.dino_weights is None:
            raise SystemExit(f"--inits {init} needs --dino_weights (a DINO teacher written by train_dino).")
        return dino_encoder_spec(args.dino_weights)
    if not (args.encoder_model and args.encoder_weights):
        raise SystemExit("--inits supervised needs --encoder_model (a timm name) and --encoder_weights (a local file).")
    return {"model": args.encoder_model, "weights": str(args.encoder_weights)}


def start_weights(init: str, args: argparse.Namespace, latent=None) -> str | None:
    """What a run of ``init`` starts from, by content: ``name:sha256[:16]`` of each pre-trained file (None for the
    untrained initialisations). A row records it, so rows fine-tuned from other weights (a denoiser trained again,
    a row file carried over from another machine) are run again rather than reported beside the new ones."""
    files = {"pretrained": [args.denoiser], "pretrained_large": [args.denoiser_large], "dino": [args.dino_weights],
             "supervised": [args.encoder_weights]}.get(init, [])
    if init == "latent" and latent is not None:
        files = [Path(latent.get_parsed_content(key)) for key in ("autoencoder_path", "diffusion_path")]
    files = [Path(f) for f in files if f is not None and Path(f).is_file()]
    return content_id(*files) or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True)
    parser.add_argument("--denoiser", type=Path, help="pre-trained denoiser (configs/heads/pretrain.json); needed by "
                        "--inits pretrained, else only its network is read (the config's with the settings after --, "
                        "where the file is not there)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 5, 10, 25, 50])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--pixel_spacing", type=float, default=0.7, help="mm per pixel of the landmark frame (JSRT 512 px)")
    parser.add_argument("--tasks", nargs="+", default=["landmarks", "segmentation"])
    parser.add_argument("--denoiser_large", type=Path, help="a second pre-trained denoiser (e.g. on a larger unlabelled "
                        "set), the init 'pretrained_large'")
    parser.add_argument("--inits", nargs="+", default=["pretrained", "scratch"], choices=list(INITS),
                        help="pretrained: the image-space denoiser; scratch: the same network untrained; latent: the main "
                             "pipeline's latent UNet and autoencoder (give --latent_args); dino: the DINO ViT of "
                             "--dino_weights with a light decoder (bundle/heads/encoders.py); vit_scratch: that network "
                             "untrained; supervised: --encoder_model with --encoder_weights (e.g. ImageNet) and the decoder")
    parser.add_argument("--dino_weights", type=Path, help="a DINO teacher written by train_dino (with its .json sidecar)")
    parser.add_argument("--encoder_model", help="timm name of the supervised encoder, e.g. resnet50")
    parser.add_argument("--encoder_weights", type=Path, help="its local weights file (nothing is downloaded)")
    parser.add_argument("--blind_dir", type=Path, help="a folder of blind JSRT films: the seed-0 heads at --blind_sizes "
                        "write their predictions for them to --blind_out/<init>_n<N>/ (landmarks/<id>.json in the 512 "
                        "frame, <structure>/<id>.png), listed in its index.json")
    parser.add_argument("--blind_sizes", type=int, nargs="+", default=[5, 25, 150])
    parser.add_argument("--blind_out", type=Path, default=ROOT / "docs/results/blind/heads")
    parser.add_argument("--draws", choices=["first", "random"], default="first",
                        help="which N training films: the first N for every seed, or (random) the first N for seed 0 "
                             "and a seeded random draw of N for every other seed")
    parser.add_argument("--latent_args", default="", help="overrides for configs/inference.json naming the trained latent "
                        "model, as one string: '--work_dir runs/foundation_dino --image_size 64 ...'")
    parser.add_argument("--work", type=Path, default=ROOT / "runs/heads")
    parser.add_argument("--results", type=Path, help="the rows file (default <work>/heads_results.jsonl): every finished "
                        "run is appended to it and skipped when the grid runs again, so a copy kept with the results "
                        "lets a new machine go on where the last one stopped")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results")
    parser.add_argument("--amp", default="auto", help="fine-tuning precision as configs/heads/*.json run it: auto (bf16 "
                        "where the CPU has bf16 instructions), none, bf16; only rows of that precision are reused or "
                        "reported (the 64-px runs on record are float32: --amp none)")
    parser.add_argument("--report_only", action="store_true", help="train nothing: tables and plot from the runs on record")
    parser.add_argument("overrides", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    overrides = parse_overrides(args.overrides)
    set_threads(overrides.get("torch_threads"))
    os.chdir(ROOT)

    wf = config_workflow("configs/heads/pretrain.json", "training", **overrides)
    get = wf.parser.get_parsed_content
    size, preprocessing = int(get("image_size")), get("preprocessing")
    # the denoiser's network as its file records it (the scratch init is the same network, untrained); without the
    # file (not pre-trained yet, or another machine), the network configs/heads/pretrain.json pre-trains with these
    # settings: the untrained initialisations and a report from the rows on record need no pre-trained weights
    if args.denoiser is not None and (args.denoiser.is_file() or "pretrained" in args.inits and not args.report_only):
        denoiser_record = read_record(args.denoiser, "denoiser", "pre-train it (configs/heads/pretrain.json)")["record"]
        if int(denoiser_record["image_size"]) != size:
            raise SystemExit(f"--denoiser works at {denoiser_record['image_size']} px: pass -- --image_size "
                             f"{denoiser_record['image_size']}.")
    elif "pretrained" in args.inits and not args.report_only:
        raise SystemExit("--inits pretrained needs --denoiser (a denoiser pre-trained by configs/heads/pretrain.json).")
    else:
        denoiser_record = get("denoiser_record")
        print(f"no denoiser file{f' at {args.denoiser}' if args.denoiser else ''}: the untrained network is the one "
              "configs/heads/pretrain.json pre-trains with these settings", flush=True)
    # a fresh network per run, with PyTorch's fused attention (as configs/heads/*.json run it: sdpa_attention)
    denoiser_def = lambda: build_network(denoiser_record["network"], use_flash_attention=True)  # noqa: E731
    sigma = 5.0 * size / 256  # Di Via et al.: sigma 5 at 256 pixels
    train_rows, test_rows = read_datalist(args.train), read_datalist(args.test)
    args.work.mkdir(parents=True, exist_ok=True)
    results_path = args.results or args.work / "heads_results.jsonl"
    results_path.parent.mkdir(parents=True, exist_ok=True)
    # rows made in another precision are not this run's (rows from before the setting existed were float32)
    dtype = autocast_dtype(args.amp, "cpu")
    precision = precision_name(dtype)
    on_record, other = [], 0
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            r = json.loads(line)
            if r.get("precision", "float32") != precision:
                other += 1
                continue
            on_record.append(r)
    if other:
        print(f"{results_path}: {other} rows fine-tuned in another precision than {precision} are left out "
              "(--amp chooses)", flush=True)

    data: dict = {}
    loaded = len(train_rows) if args.draws == "random" else max(args.sizes)
    if "landmarks" in args.tasks:
        data["landmarks"] = (landmark_items(train_rows[: loaded], preprocessing, size, None, sigma),
                             landmark_items(test_rows, preprocessing, size, None, sigma))
    if "segmentation" in args.tasks:
        data["segmentation"] = (mask_items(train_rows[: loaded], preprocessing, size, STRUCTURES),
                                mask_items(test_rows, preprocessing, size, STRUCTURES))

    def score(task: str, outputs: torch.Tensor, test_items: list) -> dict:
        if task == "landmarks":
            pred = decode_heatmaps(outputs).numpy()
            pred = np.stack([it["frame"].to_original(p) for it, p in zip(test_items, pred)])
            true = np.stack([it["frame"].to_original(it["points"]) for it in test_items])
            per_image = np.linalg.norm(pred - true, axis=-1).mean(-1)  # each test film's mean radial error
            return {**landmark_metrics(pred, true, pixel_spacing=args.pixel_spacing),
                    "per_image_mre_px": [round(float(v), 3) for v in per_image]}
        masks = (torch.sigmoid(outputs) > 0.5).float()
        true = torch.stack([it["label"] for it in test_items])
        lungs = [STRUCTURES.index(c) for c in LUNG_MASK_COLUMNS]
        per_image = DiceMetric(include_background=True, reduction="none")(masks[:, lungs], true[:, lungs]).mean(1)
        return {**segmentation_scores(masks, true), "per_image_lung_dice": [round(float(v), 4) for v in per_image]}

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
    starts = {init: start_weights(init, args, latent) for init in args.inits}
    if args.report_only:  # a report leaves out rows of other weights only where the files given are here to compare
        starts = {init: s for init, s in starts.items() if s is not None}
    # each run's latest row from the weights and fine-tuning settings given now (rows from before rows recorded
    # weights count as theirs); a report takes the rows of any settings, and names them
    asked, done, stale = set(runs), {}, set()
    for r in on_record:
        key = (r["task"], r["size"], r["init"], r["seed"])
        other_weights = "weights" in r and r["init"] in starts and r["weights"] != starts[r["init"]]
        other_settings = not args.report_only and (r.get("lr"), r.get("iterations")) != (args.lr, args.iterations)
        if key in asked and (other_weights or other_settings):
            stale.add(key)
        else:
            done[key] = r
    stale -= done.keys()
    if stale:
        print(f"{results_path}: {len(stale)} runs on record were fine-tuned from other pre-trained weights or with "
              "other settings (learning rate, iterations) than given now: they run again", flush=True)
    blind_rows = find_images(args.blind_dir) if args.blind_dir else []
    start = time.perf_counter()
    for i, (task, n, init, seed) in enumerate(runs):
        if (task, n, init, seed) in done or args.report_only:
            continue
        train_items, test_items = data[task]
        torch.manual_seed(seed)
        channels = train_items[0]["label"].shape[0]
        bias = MASK_PRIOR_BIAS if task == "segmentation" else 0.0
        if init in ("dino", "vit_scratch", "supervised"):
            spec = encoder_spec(init, args)
            head = build_encoder_head(spec, channels, bias, pretrained=init != "vit_scratch")
        elif init == "latent":
            generator = latent.get_parsed_content("generator", lazy=False)  # a fresh copy to fine-tune
            head = LatentDenseHead(generator.codec, generator.unet, channels,
                                   (generator.dino.num_tokens, generator.dino.embed_dim), bias)
        else:
            unet = denoiser_def()
            weights = {"pretrained": args.denoiser, "pretrained_large": args.denoiser_large}.get(init)
            head = build_head(unet, channels, weights, bias)
        loss = HeatmapCrossEntropy() if task == "landmarks" else DiceCELoss(sigmoid=True)
        t0 = time.perf_counter()
        picked = draw(len(train_items), n, seed, args.draws)
        # a killed run goes on from its last checkpoint (every 25 iterations) when the grid is started again with the
        # same weights and settings (they name the file: a run started otherwise starts anew)
        made = hashlib.sha256(json.dumps([starts[init], args.lr, args.iterations, precision]).encode()).hexdigest()[:8]
        checkpoint = args.work / "checkpoints" / f"{task}_{init}_n{n}_seed{seed}_{made}.pt"
        resumed = len(torch.load(checkpoint, weights_only=True)["losses"]) if checkpoint.is_file() else 0
        losses = fine_tune(head, [train_items[i] for i in picked], loss, args.iterations, lr=args.lr, seed=seed,
                           amp=args.amp, checkpoint=checkpoint)
        outputs = predict(head, torch.stack([it["image"] for it in test_items]))
        if blind_rows and seed == 0 and n in args.blind_sizes:
            names = landmark_layout(train_rows[0]["landmark_file"]) if task == "landmarks" else STRUCTURES
            folder = f"{init}_n{n}"
            infer(head, {"task": task, "names": names, "image_size": size}, blind_rows, preprocessing,
                  args.blind_out / folder)
            record_blind(f"{args.blind_out.name}/{folder}", {task: {
                "what": f"{task} head, {INITS[init]}, fine-tuned on {n} JSRT train films (seed 0)", "images": len(blind_rows),
                "films": [Path(train_items[i]["source"]).stem for i in picked], "iterations": args.iterations,
                "lr": args.lr, "precision": precision, "image_size": size}}, out=args.blind_out.parent, merge=True)
        record = {"task": task, "size": n, "init": init, "seed": seed, "iterations": args.iterations, "lr": args.lr,
                  "precision": precision, "weights": starts[init],
                  "first_loss": float(np.mean(losses[:10])), "last_loss": float(np.mean(losses[-10:])),
                  "seconds": time.perf_counter() - t0, "draws": args.draws,
                  # seconds counts this process only: a resumed run had done this many iterations before
                  "resumed_at_iteration": resumed,
                  "films": [Path(train_items[i]["source"]).stem for i in picked], **score(task, outputs, test_items)}
        append_jsonl(results_path, record)
        checkpoint.unlink(missing_ok=True)
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
    # a report over runs made with several settings names each one the runs used (every row keeps its own)
    used = lambda key, given: sorted({r.get(key) for r in records}) if args.report_only else given  # noqa: E731
    result = {"settings": {**overrides, "image_size": size, "heatmap_sigma_px": sigma,
                           "iterations": used("iterations", args.iterations),
                           "precision": precision, "lr": used("lr", args.lr), "sizes": args.sizes, "seeds": args.seeds, "denoiser": str(args.denoiser) if args.denoiser else None,
                           "denoiser_network": denoiser_record["network"],
                           "denoiser_large": str(args.denoiser_large) if args.denoiser_large else None,
                           "draws": args.draws, "dino_weights": str(args.dino_weights) if args.dino_weights else None,
                           "encoder_model": args.encoder_model,
                           "encoder_weights": str(args.encoder_weights) if args.encoder_weights else None},
              "baselines": baselines, "runs": records, "wall_seconds_this_invocation": time.perf_counter() - start}
    args.out.mkdir(parents=True, exist_ok=True)
    plot(records, baselines, args.out / "heads.png")
    comparisons = [c for task in args.tasks for c in paired_intervals(records, task)]
    result["comparisons"] = comparisons
    (args.out / "heads.json").write_text(json.dumps(result, indent=2))
    (args.out / "heads_table.md").write_text(table(records, baselines) + "\n" + intervals_markdown(comparisons))
    print(json.dumps(baselines, indent=1)[:2000])


def paired_intervals(records: list, task: str, reference: str = "pretrained", boots: int = 2000) -> list[dict]:
    """The reference initialisation against every other one at each N, paired by seed (the same films): the
    difference of the mean per-film score (MRE px for landmarks, lower is better; lung Dice for segmentation) with a
    bootstrap 95% interval over seeds and test films, and win / tie / loss for the reference."""
    key = "per_image_mre_px" if task == "landmarks" else "per_image_lung_dice"
    by = {(r["size"], r["init"], r["seed"]): np.asarray(r[key]) for r in records if r["task"] == task and key in r}
    rng = np.random.default_rng(0)
    out = []
    for n in sorted({k[0] for k in by}):
        for init in [i for i in INITS if i != reference]:
            seeds = sorted(s for (m, i, s) in by if m == n and i == init and (n, reference, s) in by)
            if not seeds:
                continue
            ref, other = (np.stack([by[(n, x, s)] for s in seeds]) for x in (reference, init))
            films = ref.shape[1]
            draws = []
            for _ in range(boots):
                pick, sample = rng.integers(len(seeds), size=len(seeds)), rng.integers(films, size=films)
                draws.append(float(ref[pick][:, sample].mean() - other[pick][:, sample].mean()))
            low, high = np.percentile(draws, [2.5, 97.5])
            better = (high < 0) if task == "landmarks" else (low > 0)
            worse = (low > 0) if task == "landmarks" else (high < 0)
            out.append({"task": task, "size": n, "reference": reference, "other": init, "seeds": len(seeds),
                        "difference": float(ref.mean() - other.mean()), "ci95": [float(low), float(high)],
                        "reading": "win" if better else "loss" if worse else "tie"})
    return out


def intervals_markdown(comparisons: list) -> str:
    lines = []
    for task, unit in (("landmarks", "MRE px, negative = diffusion better"), ("segmentation", "lung Dice, positive = diffusion better")):
        rows = [c for c in comparisons if c["task"] == task]
        if not rows:
            continue
        others = list(dict.fromkeys(c["other"] for c in rows))
        lines += [f"{task}: {INITS[rows[0]['reference']]} minus each other initialisation ({unit}; bootstrap 95% "
                  "interval over seeds and test films)", "", "| N | " + " | ".join(INITS[o] for o in others) + " |",
                  "|---|" + "---|" * len(others)]
        for n in sorted({c["size"] for c in rows}):
            cells = []
            for o in others:
                hit = [c for c in rows if c["size"] == n and c["other"] == o]
                seeds = f"{hit[0]['seeds']} seed{'s' if hit[0]['seeds'] != 1 else ''}" if hit else ""
                cells.append(f"{hit[0]['difference']:+.3g} [{hit[0]['ci95'][0]:+.3g}, {hit[0]['ci95'][1]:+.3g}] "
                             f"{hit[0]['reading']} ({seeds})" if hit else "")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def fine_tuning(rows: list) -> str:
    """The fine-tuning settings of a table row's runs, e.g. ``1e-3 x 400`` (several when its seeds differed)."""
    return ", ".join(("-" if lr is None else f"{lr:.0e}".replace("e-0", "e-")) + f" x {it}"
                     for lr, it in sorted({(r.get("lr"), r.get("iterations")) for r in rows}, key=str))


def mean_hd95(scores: dict) -> float:
    """The mean HD95 (px) over the structures of one run's (or baseline's) ``per_structure`` scores."""
    return float(np.nanmean([v["hd95_px"] for v in scores["per_structure"].values()]))


def table(records: list, baselines: dict) -> str:
    """Markdown: landmark MRE/SDR and segmentation Dice per N, pre-trained vs scratch (mean over seeds), baselines."""
    lines = []
    marks = [r for r in records if r["task"] == "landmarks"]
    if marks:
        lines += ["| landmarks | N | seeds | lr x iterations | MRE px (512 frame) | MRE mm | "
                  + " | ".join(f"SDR {t:g} px" for t in SDR) + " |", "|---|---|---|---|---|---|" + "---|" * len(SDR)]
        for n in sorted({r["size"] for r in marks}):
            for init in INITS:
                rows = [r for r in marks if r["size"] == n and r["init"] == init]
                if not rows:
                    continue
                mean = {k: np.mean([r.get(k, np.nan) for r in rows]) for k in ("mre_px", "mre_mm", *SDR_KEYS)}
                spread = f" ± {np.std([r['mre_px'] for r in rows]):.1f}" if len(rows) > 1 else ""
                lines.append(f"| {init} | {n} | {len(rows)} | {fine_tuning(rows)} | {mean['mre_px']:.1f}{spread} | {mean['mre_mm']:.1f} | "
                             + " | ".join(f"{mean[k]:.3f}" for k in SDR_KEYS) + " |")
        if "landmarks_mean_shape" in baselines:
            b = baselines["landmarks_mean_shape"]
            lines.append(f"| mean training shape | all | - | - | {b['mre_px']:.1f} | {b['mre_mm']:.1f} | "
                         + " | ".join(f"{b[k]:.3f}" for k in SDR_KEYS) + " |")
        lines.append("")
    segs = [r for r in records if r["task"] == "segmentation"]
    if segs:
        names = list(segs[0]["per_structure"])
        lines += ["| segmentation | N | seeds | lr x iterations | " + " | ".join(n.removeprefix(MASK_COLUMN_PREFIX) for n in names)
                  + " | mean Dice | mean HD95 (px of the heads' grid) |", "|---|---|---|---|" + "---|" * (len(names) + 2)]
        for n in sorted({r["size"] for r in segs}):
            for init in INITS:
                rows = [r for r in segs if r["size"] == n and r["init"] == init]
                if not rows:
                    continue
                cells = [np.mean([r["per_structure"][k]["dice"] for r in rows]) for k in names]
                spread = f" ± {np.std([r['mean_dice'] for r in rows]):.3f}" if len(rows) > 1 else ""
                hd95 = np.mean([mean_hd95(r) for r in rows])
                lines.append(f"| {init} | {n} | {len(rows)} | {fine_tuning(rows)} | " + " | ".join(f"{c:.3f}" for c in cells) +
                             f" | {np.mean([r['mean_dice'] for r in rows]):.3f}{spread} | {hd95:.1f} |")
        if "segmentation_mean_mask" in baselines:
            b = baselines["segmentation_mean_mask"]
            lines.append("| mean training mask | all | - | - | " + " | ".join(f"{b['per_structure'][k]['dice']:.3f}" for k in names)
                         + f" | {b['mean_dice']:.3f} | {mean_hd95(b):.1f} |")
    return "\n".join(lines) + "\n"


def plot(records: list, baselines: dict, path: Path) -> None:
    """Error against N, one line per initialisation (the mean over its draws, bars their standard deviation), side
    by side at each N; a point of one draw where another initialisation has several is drawn hollow."""
    plt = pyplot()

    panels = [("landmarks", "mre_px", "landmark MRE (px, 512 frame)", "landmarks_mean_shape"),
              ("segmentation", "mean_dice", "mean Dice (all structures)", "segmentation_mean_mask")]
    panels = [p for p in panels if any(r["task"] == p[0] for r in records)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (task, key, label, base) in zip(axes[0], panels):
        inits = [i for i in INITS if any(r["task"] == task and r["init"] == i for r in records)]
        per_cell = Counter((r["size"], r["init"]) for r in records if r["task"] == task)
        draws = {n: max(c for (m, _), c in per_cell.items() if m == n) for n, _ in per_cell}  # most draws at each N
        single = False
        for k, init in enumerate(inits):
            rows = [r for r in records if r["task"] == task and r["init"] == init]
            sizes = sorted({r["size"] for r in rows})
            values = [[r[key] for r in rows if r["size"] == s] for s in sizes]
            x = [s * 1.06 ** (k - (len(inits) - 1) / 2) for s in sizes]  # side by side on the log axis
            y = [np.mean(v) for v in values]
            line = ax.errorbar(x, y, yerr=[np.std(v) for v in values], marker="o", capsize=3, label=INITS[init])
            hollow = [i for i, (s, v) in enumerate(zip(sizes, values)) if len(v) == 1 and draws[s] > 1]
            if hollow:
                single = True
                ax.plot([x[i] for i in hollow], [y[i] for i in hollow], "o", color=line[0].get_color(),
                        markerfacecolor="white", zorder=3)
        if single:
            ax.plot([], [], "o", color="grey", markerfacecolor="white", label="one draw (others: mean of several)")
        if base in baselines:
            ax.axhline(baselines[base][key], color="grey", linestyle="--", label="mean of training set")
        ax.set_xscale("log")
        if key == "mre_px":  # from ~100 px at N = 1 to a few px: on a linear axis the large-N lines would merge
            ax.set_yscale("log")
        ax.set_xlabel("labelled training images N")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
