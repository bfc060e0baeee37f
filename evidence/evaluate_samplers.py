"""Fewer network calls at the same quality: samplers and step counts against a many-step reference.

    python -m evidence.evaluate_samplers --work_dir runs/foundation_profile --conditions runs/foundation_profile/test.csv \\
        --out docs/results/samplers

Every setting samples the same images (same conditions: the DINO embeddings of the given held-out images,
same seeds, the configured guidance) with a trained generator. Reported per setting: network calls, seconds and
images/s, the PSNR of each sample against the same sample from the reference setting (DDIM with
``--reference_steps``: how far the solver is from the converged trajectory), and the Fréchet distance of the
samples to the real held-out images in pixels and in the generator's DINO space.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from bundle.cli import config_workflow, parse_overrides, report_json
from bundle.diffusion import sample_latents, seeded_noise
from bundle.evaluation import extract, feature_space, frechet_distance, load_images

SETTINGS = [("ddim", 50), ("ddim", 20), ("ddim", 10), ("dpmpp_2m", 25), ("dpmpp_2m", 20), ("dpmpp_2m", 15),
            ("dpmpp_2m", 10), ("pndm", 20)]


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = (a.clamp(0, 1) - b.clamp(0, 1)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", required=True, help="work_dir of the trained models")
    parser.add_argument("--conditions", required=True, help="held-out images: their embeddings condition the "
                        "samples and they are the real set of the Fréchet distances")
    parser.add_argument("--samples_per_condition", type=int, default=2)
    parser.add_argument("--reference_steps", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None, help="writes OUT.json and OUT.md")
    parser.add_argument("overrides", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    os.chdir(ROOT)
    wf = config_workflow("configs/inference.json", "sample", work_dir=args.work_dir,
                         **parse_overrides(args.overrides))
    get = wf.parser.get_parsed_content
    generator, device, guidance = get("generator"), get("device"), get("guidance_scale")
    real, _ = load_images(args.conditions, generator.preprocessing)
    with torch.no_grad():
        embeddings = torch.cat([generator.dino(real[i : i + 32].to(device)).cpu() for i in range(0, len(real), 32)])
    contexts = embeddings.repeat_interleave(args.samples_per_condition, 0)
    seeds = list(range(len(contexts)))
    dino_space, pixel_space = feature_space("dino", generator.dino), feature_space("pixels")
    real_features = {"pixels": extract(pixel_space, real), "dino": extract(dino_space, real, device=device)}

    def generate(sampler: str, steps: int) -> tuple[torch.Tensor, float]:
        scheduler = generator.sampler(sampler)
        images = []
        start = time.perf_counter()
        for i in range(0, len(contexts), args.batch_size):
            context = contexts[i : i + args.batch_size].to(device)
            noise = seeded_noise(seeds[i : i + args.batch_size], generator.latent_shape, device)
            latents = sample_latents(generator.unet, scheduler, context, noise, steps, guidance)
            images.append(generator.codec.decode(latents).clamp(0, 1).cpu())
        return torch.cat(images), time.perf_counter() - start

    reference, reference_seconds = generate("ddim", args.reference_steps)
    rows = []
    for sampler, steps in [("ddim", args.reference_steps)] + SETTINGS:
        images, seconds = (reference, reference_seconds) if steps == args.reference_steps else generate(sampler, steps)
        agreement = psnr(images, reference)
        rows.append({
            "sampler": sampler, "steps": steps, "network_calls": steps * (2 if guidance != 1 else 1),
            "seconds": round(seconds, 1), "images_per_second": round(len(images) / seconds, 2),
            "psnr_to_reference_db": round(float(agreement[torch.isfinite(agreement)].mean()), 2)
            if steps != args.reference_steps else None,
            "fd_pixels": round(frechet_distance(real_features["pixels"], extract(pixel_space, images)), 3),
            "fd_dino": round(frechet_distance(real_features["dino"], extract(dino_space, images, device=device)), 3),
        })
        print(rows[-1], flush=True)
    result = {"work_dir": str(args.work_dir), "conditions": str(args.conditions), "real_images": len(real),
              "samples": len(contexts), "guidance_scale": guidance, "reference": f"ddim {args.reference_steps}",
              "device": str(device), "threads": torch.get_num_threads(), "settings": rows}
    header = [f"Samplers on the generator in `{args.work_dir}`: {len(contexts)} samples ({args.samples_per_condition} per "
              f"condition, the DINO embeddings of the {len(real)} images of `{args.conditions}`), guidance "
              f"{guidance}, the same seeds for every setting; {device}, {torch.get_num_threads()} threads. PSNR: each "
              f"sample against the same sample from DDIM at {args.reference_steps} steps (the converged trajectory); "
              f"FD: against the {len(real)} real images, in pixels (32x32) and in the generator's DINO space.", "",
              "    python -m evidence.evaluate_samplers " + " ".join(sys.argv[1:]), ""]
    table = ["| sampler | steps | s | images/s | PSNR to reference (dB) | FD pixels | FD DINO |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        agreement = "reference" if r["psnr_to_reference_db"] is None else f"{r['psnr_to_reference_db']:.2f}"
        table.append(f"| {r['sampler']} | {r['steps']} | {r['seconds']:.1f} | {r['images_per_second']:.2f} | "
                     f"{agreement} | {r['fd_pixels']:.2f} | {r['fd_dino']:.2f} |")
    print("\n".join(table))
    if args.out:
        from bundle.io import atomic_write

        report_json(result, args.out.with_suffix(".json"))
        atomic_write(args.out.with_suffix(".md"), lambda t: Path(t).write_text("\n".join(header + table) + "\n"))


if __name__ == "__main__":
    main()
