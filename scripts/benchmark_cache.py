"""Seconds per stage-2 training iteration with the latent cache versus encoding every batch on the fly.

    python scripts/benchmark_cache.py --out docs/results/cache_benchmark.json -- --work_dir runs/foundation ...

Both arms run in one process on the same batch of training images, with the trained autoencoder and the
DINO extractor of the given settings: "cached" takes latents and tokens from the cache (what train.json
does); "on the fly" loads the image files, preprocesses, encodes them with the autoencoder and DINO, then
takes the same UNet step (what the Model Zoo latent diffusion bundles do every iteration). Prints JSON.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from monai.inferers import DiffusionInferer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bundle.cli import config_workflow, parse_overrides, report_json  # noqa: E402
from bundle.data import apply_to_file  # noqa: E402


def timed(step, repeats: int) -> list[float]:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", default=None, help="a configs/profiles/*.json overlay the training used")
    parser.add_argument("overrides", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    os.chdir(ROOT)
    config = ["configs/train.json", args.profile] if args.profile else "configs/train.json"
    wf = config_workflow(config, "cache", **parse_overrides(args.overrides))
    get = wf.parser.get_parsed_content
    cache = get("latent_cache")
    batch_size = get("diffusion_batch_size")
    device = get("device")
    codec, dino, preprocessing = get("codec"), get("dino").to(device), get("preprocessing")
    rows = cache["rows"][:batch_size]
    unet, optimizer = get("unet"), get("diffusion_optimizer")
    prepare, inferer = get("prepare_batch"), DiffusionInferer(get("train_scheduler"))
    loss_fn = torch.nn.MSELoss()

    def unet_step(batch):
        inputs, target, _, kwargs = prepare(batch, device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(inferer(inputs, unet, **kwargs), target)
        loss.backward()
        optimizer.step()

    def cached():
        unet_step({"image": cache["latents"][:batch_size], "context": cache["tokens"][:batch_size].float()})

    def on_the_fly():
        images = torch.stack([torch.as_tensor(apply_to_file(preprocessing, r)["image"]) for r in rows]).float().to(device)
        unet_step({"image": codec.encode(images), "context": dino(images)})

    def encode_only():
        images = torch.stack([torch.as_tensor(apply_to_file(preprocessing, r)["image"]) for r in rows]).float().to(device)
        codec.encode(images), dino(images)

    result = {"batch_size": batch_size, "device": str(device), "threads": torch.get_num_threads(),
              "repeats": args.repeats}
    for name, step in (("cached", cached), ("on_the_fly", on_the_fly), ("load_and_encode_only", encode_only)):
        times = timed(step, args.repeats)
        result[f"{name}_seconds_per_iteration"] = {"median": statistics.median(times), "min": min(times),
                                                   "max": max(times)}
    result["speedup"] = (result["on_the_fly_seconds_per_iteration"]["median"]
                         / result["cached_seconds_per_iteration"]["median"])
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    report_json(result, args.out)


if __name__ == "__main__":
    main()
