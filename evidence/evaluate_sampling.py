"""Sampling evidence: one grid per strategy on held-out images, an interpolation strip, an inpainting example
and the generation speed, with a trained model (docs/results/sampling.{json,md} figures).

    python -m evidence.evaluate_sampling --work_dir runs/foundation_dino --test runs/foundation/test.csv \\
        --masks $DINO_DIFFUSION_DATA/jsrt/masks/left_lung -- --image_size 64 ... (the overrides training used)
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

from bundle.cli import config_workflow, parse_overrides, pyplot, report_json
from bundle.data import apply_to_file, build_datalist, read_mask
from bundle.sampling import interpolate
from bundle.strategies import STRATEGIES
from bundle.writers import to_display


def load_png(path: Path) -> np.ndarray:
    array = np.asarray(Image.open(path)).astype(np.float32)
    return array / (65535.0 if array.max() > 255 else 255.0)


def shown(params):
    """Strategy parameters as a figure or JSON shows them: a file path by its folder and name only (where the data
    lie on this machine is not part of the result)."""
    if isinstance(params, dict):
        return {k: shown(v) for k, v in params.items()}
    if isinstance(params, str) and ("/" in params or os.sep in params):
        return f"{Path(params).parent.name}/{Path(params).name}"
    return params


def grid(rows: list[list[np.ndarray | None]], path: Path, row_titles: list[str], col_titles: list[str], title: str) -> None:
    plt = pyplot()

    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.25 * n_cols, 1.25 * n_rows + 0.4), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i, j]
            if j < len(row) and row[j] is not None:
                ax.imshow(row[j], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0 and j < len(col_titles):
                ax.set_title(col_titles[j], fontsize=7)
        axes[i, 0].set_ylabel(row_titles[i], fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(pad=0.2, rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))  # the title above the column titles
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", type=Path, required=True, help="work_dir of the trained models")
    parser.add_argument("--test", type=Path, required=True, help="datalist of held-out images (conditions)")
    parser.add_argument("--masks", type=Path, help="folder of masks named like the test images, for inpainting")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results")
    parser.add_argument("--num_conditions", type=int, default=6)
    parser.add_argument("--num_samples", type=int, default=4)
    parser.add_argument("--speed_images", type=int, default=32)
    parser.add_argument("--no_speed", action="store_true", help="keep the speed figures of sampling.json as they are")
    parser.add_argument("--strategies", nargs="+", choices=[s for s in STRATEGIES if s != "concept"],
                        help="only these strategies' grids (nothing else: no strip, inpainting, sweep or speed)")
    parser.add_argument("--strip_guidance", type=float, nargs="*", default=[],
                        help="also draw the interpolation strip at these guidance scales (how hard the condition pulls)")
    parser.add_argument("overrides", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    overrides = parse_overrides(args.overrides)
    os.chdir(ROOT)

    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work_dir / "sampling_evidence" / args.test.stem  # one folder per list of conditions
    test_rows = build_datalist(args.test, work)[: args.num_conditions]
    if args.masks:
        for row in test_rows:
            row["mask"] = str(args.masks / Path(row["image"]).name)
    pool = work / "pool.csv"
    pool.parent.mkdir(parents=True, exist_ok=True)
    with open(pool, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(test_rows[0]))
        writer.writeheader()
        writer.writerows(test_rows)

    settings = {**overrides, "work_dir": str(args.work_dir), "input_dir": str(pool), "num_inputs": None}
    wf = config_workflow("configs/inference.json", "sample", **settings)
    get = wf.parser.get_parsed_content
    generation, inputs, preprocessing = get("generation"), get("inputs"), get("preprocessing")
    real = [to_display(apply_to_file(preprocessing, dict(r))["image"]) for r in inputs]
    ids = [Path(r["image"]).stem for r in inputs]
    result: dict = {"settings": overrides, "conditions": ids, "strategies": {}}

    strategies = args.strategies or [s for s in STRATEGIES if s != "concept"]  # concepts need learning first: concepts.md
    for strategy in strategies:
        out = work / strategy
        rows = generation(inputs, output_dir=out, strategy=strategy, num_samples=args.num_samples, seed=0)
        by_anchor = [[load_png(out / r["image"]) for r in rows if r["image"].startswith(f"{i}_")] for i in ids]
        grid([[real[i]] + by_anchor[i] for i in range(len(ids))], args.out / f"sampling_{strategy}.png",
             ids, ["real (anchor)"] + [f"seed {k}" for k in range(args.num_samples)],
             f"{strategy}: {shown(json.loads(rows[0]['params'])) or 'embedding of the real image'}")
        result["strategies"][strategy] = {"images": len(rows), "params": shown(json.loads(rows[0]["params"]))}

    if args.strategies:
        report_json(result, args.out / "sampling.json")
        return

    # interpolation strip through three held-out images, one seed
    strip_dir = work / "interpolation_strip"
    rows = interpolate(inputs[:3], 7, strip_dir, seed=0, generate=generation)
    frames = [load_png(strip_dir / r["image"]) for r in rows]
    strip_titles = [ids[0]] + [""] * 5 + [ids[1]] + [""] * 5 + [ids[2]]
    strip_real = [real[0]] + [None] * 5 + [real[1]] + [None] * 5 + [real[2]]
    grid([strip_real, frames], args.out / "sampling_interpolation_strip.png", ["real", "generated"], strip_titles,
         f"slerp through three test embeddings, one seed, guidance {get('guidance_scale'):g}")
    for scale in args.strip_guidance:
        strip_dir = work / f"interpolation_strip_guidance{scale:g}"
        rows = interpolate(inputs[:3], 7, strip_dir, seed=0, generate=functools.partial(generation, guidance_scale=scale))
        grid([strip_real, [load_png(strip_dir / r["image"]) for r in rows]],
             args.out / f"sampling_interpolation_strip_guidance{scale:g}.png", ["real", "generated"], strip_titles,
             f"slerp through three test embeddings, one seed, guidance {scale:g}")
    result["strip_guidance"] = args.strip_guidance

    # inpainting: real image, mask, three results
    if args.masks:
        out = work / "inpainting"
        size = real[0].shape
        mask = to_display(read_mask(inputs[0]["mask"], size))
        rows = [r for r in generation(inputs, output_dir=out, strategy="inpainting", num_samples=args.num_samples,
                                      seed=0) if r["source_ids"] == ids[0]]
        grid([[real[0], mask] + [load_png(out / r["image"]) for r in rows]], args.out / "sampling_inpainting.png",
             [ids[0]], ["real", "mask (regenerated)"] + [f"seed {r['seed']}" for r in rows],
             "inpainting inside the mask, real pixels kept outside")

    # img2img strength sweep on the first image: how much of the real image survives
    strengths = [0.05, 0.1, 0.2, 0.6]
    sweep = []
    for strength in strengths:
        out = work / f"img2img_strength{strength:g}"
        rows = generation(inputs[:1], output_dir=out, strategy="img2img", num_samples=args.num_samples, seed=0,
                          params={"img2img": {"strength": strength}})
        sweep.append([real[0]] + [load_png(out / r["image"]) for r in rows])
    grid(sweep, args.out / "sampling_img2img_strength.png", [f"strength {s:g}" for s in strengths],
         ["real"] + [f"seed {k}" for k in range(args.num_samples)], f"img2img from {ids[0]}")
    result["img2img_strengths"] = strengths

    if args.no_speed and (args.out / "sampling.json").exists():
        result["speed"] = json.loads((args.out / "sampling.json").read_text()).get("speed")
        (args.out / "sampling.json").write_text(json.dumps(result, indent=2))
        return

    # speed: DDIM with the configured steps, reconstructions, batch of 8, nothing cached on disk but the pool
    speed_dir = work / "speed"
    for old in speed_dir.glob("*.png"):
        old.unlink()
    generation(inputs, output_dir=speed_dir, strategy="reconstruction", num_samples=1, seed=0)  # warm-up, pool cache
    for old in speed_dir.glob("*.png"):
        old.unlink()
    start = time.perf_counter()
    generation(inputs, output_dir=speed_dir, strategy="reconstruction", total_samples=args.speed_images, seed=1000)
    seconds = time.perf_counter() - start
    result["speed"] = {
        "images": args.speed_images, "seconds": seconds, "images_per_second": args.speed_images / seconds,
        "sampler": type(get("sampling_scheduler")).__name__, "num_inference_steps": get("num_inference_steps"),
        "guidance_scale": get("guidance_scale"), "batch_size": get("sample_batch_size"),
        "image_size": get("generator").image_size, "threads": torch.get_num_threads(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    report_json(result, args.out / "sampling.json")


if __name__ == "__main__":
    main()
