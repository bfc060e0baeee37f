"""Sampling in bf16 against float32 on a trained generator: time per image and how far apart the two samples of the
same source and seed are, beside how far apart two seeds of the same source are (the spread that matters).

    python -m evidence.sampling_precision --work_dir runs/corpus_cpu128 --images runs/corpus_cpu128/lists/test_jsrt.csv \\
        --diffusion_path runs/corpus_cpu128/models/snapshots/diffusion_epoch0040.pt --out docs/results/sampling_precision_cpu128

Both precisions run the same code (``bundle.diffusion.sample_latents`` with and without ``dtype``, as
``configs/inference.json``'s ``sampling_amp`` chooses), one after the other, so only their ratio counts.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bundle.data import build_datalist
from bundle.diffusion import sample_latents, seeded_noise
from bundle.io import atomic_write, atomic_write_json
from bundle.models import load_generator, model_path
from bundle.performance import cpu_has_bf16


def psnr(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return (10 * torch.log10(1 / mse)).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", type=Path, required=True)
    parser.add_argument("--diffusion_path", type=Path, default=None, help="default: the work dir's final model")
    parser.add_argument("--images", required=True, help="real images whose embeddings condition the samples")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance_scales", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--torch_threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    if not cpu_has_bf16():
        raise SystemExit("This CPU has no bf16 instructions: bf16 sampling runs in float32 here, so there is nothing to compare.")
    torch.set_num_threads(args.torch_threads)
    diffusion = args.diffusion_path or Path(model_path(args.work_dir, "diffusion"))
    generator = load_generator(model_path(args.work_dir, "autoencoder"), diffusion, bundle_root=Path(__file__).parents[1])
    generator.unet.eval()
    rows = build_datalist(args.images, None)[: args.count]
    images = torch.stack([torch.as_tensor(np.asarray(generator.preprocessing(dict(r))["image"])).float() for r in rows])
    with torch.no_grad():
        context = generator.dino(images)
    results = []
    for guidance in args.guidance_scales:
        made, seconds = {}, {}
        for name, dtype, seeds in (("float32", None, range(len(rows))), ("bf16", torch.bfloat16, range(len(rows))),
                                   ("float32_other_seeds", None, range(1000, 1000 + len(rows)))):
            noise = seeded_noise(list(seeds), generator.latent_shape, "cpu")
            start = time.perf_counter()
            latents = sample_latents(generator.unet, generator.sampler("dpmpp_2m"), context, noise, args.steps, guidance,
                                     dtype=dtype)
            seconds[name] = time.perf_counter() - start
            with torch.no_grad():
                made[name] = generator.codec.decode(latents.float()).clamp(0, 1)
        same, other = psnr(made["float32"], made["bf16"]), psnr(made["float32"], made["float32_other_seeds"])
        results.append({"guidance_scale": guidance, "images": len(rows), "steps": args.steps,
                        "seconds_per_image": {k: round(seconds[k] / len(rows), 2) for k in ("float32", "bf16")},
                        "speedup_bf16": round(seconds["float32"] / seconds["bf16"], 2),
                        "psnr_bf16_vs_float32_db": [round(float(v), 1) for v in same],
                        "max_abs_difference": round(float((made["float32"] - made["bf16"]).abs().max()), 4),
                        "psnr_other_seed_vs_float32_db": [round(float(v), 1) for v in other]})
        print(json.dumps(results[-1]), flush=True)
    result = {"work_dir": str(args.work_dir), "diffusion": str(diffusion), "images": args.images,
              "threads": args.torch_threads, "sampler": "dpmpp_2m", "results": results}
    atomic_write_json(args.out.with_suffix(".json"), result)
    lines = [f"Sampling precision ({diffusion.name}, {len(rows)} sources, DPM-Solver++ {args.steps} steps, "
             f"{args.torch_threads} thread(s)):", "",
             "| guidance | s per image float32 | s per image bf16 | speed-up | PSNR bf16 vs float32 (same seed), min-max "
             "| max abs difference | PSNR of another seed vs float32, min-max |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['guidance_scale']:g} | {r['seconds_per_image']['float32']} | {r['seconds_per_image']['bf16']} | "
                     f"{r['speedup_bf16']}x | {min(r['psnr_bf16_vs_float32_db'])}-{max(r['psnr_bf16_vs_float32_db'])} dB | "
                     f"{r['max_abs_difference']} | {min(r['psnr_other_seed_vs_float32_db'])}-"
                     f"{max(r['psnr_other_seed_vs_float32_db'])} dB |")
    atomic_write(args.out.with_suffix(".md"), lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))


if __name__ == "__main__":
    main()
