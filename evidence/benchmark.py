"""Images per second and peak memory of every stage of the bundle, with one profile's settings.

    python -m evidence.benchmark --profile cpu64 --out docs/results/benchmark_cpu64
    python -m evidence.benchmark --profile gpu256 --out docs/results/benchmark_gpu256          (on a GPU)
    python -m evidence.benchmark --profile cpu64 --stages diffusion sampling -- --channels_last true

Each stage runs in its own process (so that its peak memory is its own) on the bundle's default images (or
``--dataset_dir``) with the networks the profile builds; the weights are untrained, which changes nothing
about speed. Timed iterations follow warm-up iterations (which include any compilation). Stages:

- ``image_cache``: reading, decoding and preprocessing the image files into the image cache;
- ``autoencoder``: one stage-1 step (autoencoder + discriminator, the steady state after the adversarial warm-up);
- ``latent_cache``: encoding images into latents + DINO tokens (the stage-2 cache);
- ``dino``: one DINO pre-training step (2 global + local crops, student and teacher);
- ``diffusion``: one stage-2 step from the latent cache, EMA included;
- ``diffusion_reencode``: the same step when every batch is loaded, preprocessed and encoded again (the
  Model Zoo latent diffusion bundles' loop);
- ``sampling``: the bundle's sampler (batched classifier-free guidance) + decoding, with the configured sampler;
- ``sampling_monai``: MONAI's stock ``LatentDiffusionInferer.sample`` with its DDIM scheduler on the same networks
  and steps; ``sampling_monai_ddim50``: the same at 50 DDIM steps, which a 20-step DPM-Solver++ matches in
  accuracy (docs/results/samplers.md);
- ``head``: one few-shot landmark fine-tuning step of the denoiser head at the profile's image size, under the
  heads' ``amp`` setting (needs $DINO_DIFFUSION_DATA/jsrt; skipped without it).

Prints a Markdown table and writes ``<out>.json`` and ``<out>.md``. Any ``--key value`` after ``--`` overrides
the bundle config (e.g. ``--channels_last true --compile true``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STAGES = ("image_cache", "autoencoder", "latent_cache", "dino", "diffusion", "diffusion_reencode", "sampling",
          "sampling_monai", "sampling_monai_ddim50", "head")


# ---- one stage, in its own process -----------------------------------------------------------------------


def _memory() -> dict:
    import torch

    out = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def _reset_gpu_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed_loop(step, warmup: int, iterations: int) -> list[float]:
    for _ in range(warmup):
        step()
    _sync()
    _reset_gpu_peak()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        step()
        _sync()
        times.append(time.perf_counter() - start)
    return times


def _run_trainer(trainer, warmup: int, iterations: int, extra=()) -> list[float]:
    """Run an Ignite trainer for warmup + iterations iterations and time each one after the warm-up."""
    from ignite.engine import Events

    for handler in extra:
        handler.attach(trainer)
    stamps: list[float] = []

    def stamp(engine):
        _sync()
        if engine.state.iteration == warmup:
            _reset_gpu_peak()
        stamps.append(time.perf_counter())

    trainer.add_event_handler(Events.ITERATION_COMPLETED, stamp)
    trainer.state.max_epochs, trainer.state.epoch_length = 1, warmup + iterations
    trainer.run()
    return [b - a for a, b in zip(stamps[warmup - 1 : -1], stamps[warmup:])]


def _workflow(args, run_id: str = "cache", **extra):
    from bundle.cli import config_workflow, parse_overrides

    overrides = {"work_dir": args.work_dir, "profile": args.profile, "dino_weights": "random",
                 "time_budget_minutes": None, **parse_overrides(args.overrides), **extra}
    return config_workflow("configs/train.json", run_id, **overrides)


def _ensure_autoencoder(get) -> None:
    """An (untrained) autoencoder file with its fitted scale factor, which the latent cache needs."""
    if not Path(get("autoencoder_path")).is_file():
        get("ae_export")()


def stage_image_cache(args) -> dict:
    from bundle.data import preprocessed_images

    wf = _workflow(args)
    get = wf.parser.get_parsed_content
    datalist, preprocessing = get("datalist"), get("preprocessing")
    path = Path(args.work_dir) / "cache" / "images.pt"
    path.unlink(missing_ok=True)
    start = time.perf_counter()
    cache = preprocessed_images(datalist, preprocessing, path)
    seconds = time.perf_counter() - start
    return {"images": len(cache["images"]), "batch_size": 1, "seconds": [seconds], "per": "run"}


def stage_autoencoder(args) -> dict:
    wf = _workflow(args, adv_warmup_epochs=0)
    get = wf.parser.get_parsed_content
    times = _run_trainer(get("ae_trainer"), args.warmup, args.iterations)
    return {"batch_size": get("ae_batch_size"), "seconds": times}


def stage_latent_cache(args) -> dict:
    from bundle.cache import encode_images
    from bundle.models import load_codec

    wf = _workflow(args)
    get = wf.parser.get_parsed_content
    _ensure_autoencoder(get)
    images, device = get("image_cache")["images"], get("device")
    codec = load_codec(get("autoencoder_path")).to(device)
    dino = get("dino").to(device)
    batch = 16
    count = min(len(images), batch * (args.warmup + args.iterations))
    encode_images(images[: batch * args.warmup], codec, dino, device, batch)
    _sync()
    _reset_gpu_peak()
    start = time.perf_counter()
    encode_images(images[batch * args.warmup : count], codec, dino, device, batch)
    _sync()
    seconds = time.perf_counter() - start
    return {"batch_size": batch, "images": count - batch * args.warmup, "seconds": [seconds], "per": "run"}


def stage_dino(args) -> dict:
    wf = _workflow(args, run_id="train_dino")
    get = wf.parser.get_parsed_content
    times = _run_trainer(get("dino_trainer"), args.warmup, args.iterations)
    return {"batch_size": get("dino_loader").batch_size, "seconds": times}


def _diffusion_parts(args):
    wf = _workflow(args)
    get = wf.parser.get_parsed_content
    _ensure_autoencoder(get)
    get("latent_cache")
    return get


# dense bf16 tensor-core peaks (TFLOP/s, without sparsity) of GPUs the GPU profiles are sized for
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A6000": 155.0}


def unet_step_flops(get) -> float:
    """Floating-point operations of one UNet training step (forward + backward) at the configured batch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    unet, device, batch = get("unet"), get("device"), get("diffusion_batch_size")
    tokens = get("latent_cache")["tokens"]
    latents = torch.randn(batch, *get("latent_shape"), device=device)
    context = torch.randn(batch, *tokens.shape[1:], device=device)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    with FlopCounterMode(display=False) as counter:
        unet(latents, timesteps, context=context).float().pow(2).mean().backward()
    unet.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def stage_diffusion(args) -> dict:
    import torch

    get = _diffusion_parts(args)
    ema = get("ema")
    times = _run_trainer(get("diffusion_trainer"), args.warmup, args.iterations, extra=[ema] if ema else [])
    flops = unet_step_flops(get)
    median = sorted(times)[len(times) // 2]
    result = {"batch_size": get("diffusion_batch_size"), "seconds": times,
              "unet_step_tflop": round(flops / 1e12, 4), "achieved_tflops": round(flops / median / 1e12, 4)}
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
        if peak:
            result["fraction_of_bf16_peak"] = round(flops / median / 1e12 / peak, 3)
    return result


def stage_diffusion_reencode(args) -> dict:
    """The Model Zoo loop: every batch read from its files, preprocessed and encoded, then the same UNet step."""
    import torch
    from monai.inferers import DiffusionInferer

    from bundle.data import apply_to_file
    from bundle.models import load_codec

    get = _diffusion_parts(args)
    device, batch_size = get("device"), get("diffusion_batch_size")
    codec = load_codec(get("autoencoder_path")).to(device)
    dino, preprocessing, rows = get("dino").to(device), get("preprocessing"), get("datalist")
    unet, optimizer, prepare = get("unet"), get("diffusion_optimizer"), get("prepare_batch")
    inferer, loss_fn = DiffusionInferer(get("train_scheduler")), torch.nn.MSELoss()
    position = [0]

    def step():
        batch_rows = [rows[(position[0] + i) % len(rows)] for i in range(batch_size)]
        position[0] += batch_size
        images = torch.stack([torch.as_tensor(apply_to_file(preprocessing, r)["image"]) for r in batch_rows])
        images = images.float().to(device)
        inputs, target, _, kwargs = prepare({"image": codec.encode(images), "context": dino(images)}, device)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(inferer(inputs, unet, **kwargs), target).backward()
        optimizer.step()

    return {"batch_size": batch_size, "seconds": _timed_loop(step, args.warmup, args.iterations)}


def _sampling_parts(args):
    import torch

    from bundle.models import load_codec

    get = _diffusion_parts(args)
    device = get("device")
    codec = load_codec(get("autoencoder_path")).to(device).eval()
    unet = get("unet").eval()
    batch = args.sample_batch_size or get("diffusion_batch_size")
    context = get("latent_cache")["tokens"][:batch].float().to(device)
    context = torch.cat([context] * (-(-batch // len(context))))[:batch]
    return get, device, codec, unet, batch, context


def stage_sampling(args) -> dict:
    import torch

    from bundle.diffusion import sample_latents, seeded_noise
    from bundle.performance import autocast_dtype, precision_name

    get, device, codec, unet, batch, context = _sampling_parts(args)
    scheduler, steps, guidance = get("sampling_scheduler"), get("num_inference_steps"), get("guidance_scale")
    dtype = autocast_dtype(args.sampling_amp, device)

    @torch.no_grad()
    def step():
        noise = seeded_noise(range(batch), get("latent_shape"), device)
        codec.decode(sample_latents(unet, scheduler, context, noise, steps, guidance, dtype=dtype))

    times = _timed_loop(step, 1, max(1, args.iterations // 4))
    return {"batch_size": batch, "seconds": times, "num_inference_steps": steps, "sampler": get("sampler"),
            "precision": precision_name(dtype)}


def stage_sampling_monai(args, steps: int | None = None) -> dict:
    import torch
    from monai.inferers import LatentDiffusionInferer

    from bundle.diffusion import make_sampler, seeded_noise

    get, device, codec, unet, batch, context = _sampling_parts(args)
    steps, guidance = steps or get("num_inference_steps"), get("guidance_scale")
    scheduler = make_sampler("ddim", **get("noise_schedule_settings"))
    scheduler.set_timesteps(steps, device=device)
    inferer = LatentDiffusionInferer(scheduler, scale_factor=float(codec.scale_factor))

    @torch.no_grad()
    def step():
        noise = seeded_noise(range(batch), get("latent_shape"), device)
        # cfg_fill_value 0: the bundle's null condition, so both arms compute the same guided prediction
        inferer.sample(input_noise=noise, autoencoder_model=codec.autoencoder, diffusion_model=unet,
                       scheduler=scheduler, conditioning=context, cfg=guidance, cfg_fill_value=0.0, verbose=False)

    times = _timed_loop(step, 1, max(1, args.iterations // 4))
    return {"batch_size": batch, "seconds": times, "num_inference_steps": steps, "sampler": "ddim"}


def stage_sampling_monai_ddim50(args) -> dict:
    """MONAI's inferer with DDIM at 50 steps: as close to a converged 200-step trajectory as the bundle's
    default (DPM-Solver++ at 20 steps) is, or less (docs/results/samplers.md)."""
    return stage_sampling_monai(args, 50)


def stage_head(args) -> dict:
    from bundle.cli import config_workflow, data_folder, jsrt_rows, parse_overrides
    from bundle.errors import BundleInputError

    try:
        jsrt = data_folder("jsrt")
    except BundleInputError as err:
        return {"skipped": f"the landmark head needs the JSRT landmarks: {err}"}
    import csv

    from bundle.workflow import load_profile

    # the denoiser head at the profile's image size (the pre-training config's own default is 64 px)
    size = int(load_profile(ROOT, args.profile)["image_size"])
    work = Path(args.work_dir) / f"head{size}"
    work.mkdir(parents=True, exist_ok=True)
    datalist = work / "jsrt_train.csv"
    rows = jsrt_rows(jsrt, "train")
    with open(datalist, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    common = {"work_dir": str(work), **{k: v for k, v in parse_overrides(args.overrides).items()
                                        if k in ("device", "torch_threads")}}
    pretrain = config_workflow("configs/heads/pretrain.json", "training", image_size=size, **common)
    if not Path(pretrain.parser.get_parsed_content("denoiser_path")).is_file():
        pretrain.parser.get_parsed_content("denoiser_export")()
    wf = config_workflow("configs/heads/landmarks.json", "training", labelled_dir=str(datalist), num_labelled=10,
                         head_iterations=args.warmup + args.iterations, **common)
    get = wf.parser.get_parsed_content
    trainer = get("head_trainer")
    times = _run_trainer(trainer, args.warmup, args.iterations)
    return {"batch_size": get("head_batch_size"), "image_size": size, "seconds": times}


def run_stage(args) -> dict:
    import torch

    from bundle.workflow import set_threads

    os.chdir(ROOT)
    set_threads(args.threads)
    result = globals()[f"stage_{args.stage}"](args)
    if "skipped" in result:
        return {"stage": args.stage, **result}
    seconds = sorted(result.pop("seconds"))
    median = seconds[len(seconds) // 2]
    images = result.pop("images", result["batch_size"])
    per = result.pop("per", "iteration")
    return {"stage": args.stage, **result, "per": per, "seconds_median": round(median, 4),
            "seconds_min": round(seconds[0], 4), "repeats": len(seconds),
            "images_per_second": round(images / median, 2), "threads": torch.get_num_threads(), **_memory()}


# ---- the whole benchmark ---------------------------------------------------------------------------------


def environment(args) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "profile": args.profile, "overrides": args.overrides}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    except (OSError, StopIteration):
        pass
    info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return info


def markdown(results: list[dict], info: dict) -> str:
    lines = [f"Device: {info['device']} ({info['cpu']}); torch {info['torch']}; profile `{info['profile']}`"
             + (f"; overrides `{' '.join(info['overrides'])}`" if info["overrides"] else ""), "",
             "| stage | batch | s per iteration (median) | images/s | peak RSS (MiB) | peak GPU (MiB) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['stage']} | | skipped: {r['skipped']} | | | |")
            continue
        per = "whole run" if r["per"] == "run" else f"{r['seconds_median']:.3f}"
        name = f"{r['stage']} ({r['sampler']}, {r['num_inference_steps']} steps)" if "sampler" in r else r["stage"]
        lines.append(f"| {name} | {r['batch_size']} | {per} | {r['images_per_second']:.1f} | "
                     f"{r['peak_rss_mib']:.0f} | {r.get('peak_gpu_mib', '-')} |")
    ratios = {r["stage"]: r["images_per_second"] for r in results if "images_per_second" in r}
    for r in results:
        if "achieved_tflops" in r:
            peak = (f", {100 * r['fraction_of_bf16_peak']:.0f}% of the GPU's dense bf16 peak"
                    if "fraction_of_bf16_peak" in r else "")
            lines.append(f"\nThe UNet step ({r['unet_step_tflop'] * 1000:.1f} GFLOP forward + backward) runs at "
                         f"{r['achieved_tflops'] * 1000:.1f} GFLOP/s{peak}.")
    if "diffusion" in ratios and "diffusion_reencode" in ratios:
        lines.append(f"\nStage 2 from the cache is {ratios['diffusion'] / ratios['diffusion_reencode']:.1f}x the "
                     "re-encoding loop.")
    for name, what in (("sampling_monai", "at the same number of steps"),
                       ("sampling_monai_ddim50", "with DDIM at 50 steps")):
        if "sampling" in ratios and name in ratios:
            lines.append(f"The bundle's sampler is {ratios['sampling'] / ratios[name]:.2f}x MONAI's "
                         f"LatentDiffusionInferer.sample {what}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="auto", help="a profile name (configs/profiles/NAME.json)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--iterations", type=int, default=8, help="timed iterations per training stage")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first (compilation, allocator)")
    parser.add_argument("--sample_batch_size", type=int, default=None, help="images per sampling call "
                        "(default: the diffusion batch size)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    parser.add_argument("--sampling_amp", default="auto", help="the sampling stage's UNet precision, as inference.json's "
                        "sampling_amp: auto (bf16 where the device has it), none (float32), bf16")
    parser.add_argument("--work_dir", default=None, help="where caches and untrained models go (default: a "
                        "temporary folder)")
    parser.add_argument("--out", type=Path, default=None, help="writes OUT.json and OUT.md")
    parser.add_argument("--scaling", action="store_true", help="instead of the stages: the autoencoder and diffusion "
                        "steps against image size and batch size, as a table and a plot (OUT.png)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256], help="image sizes for --scaling")
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="-- --key value ... bundle overrides")
    args = parser.parse_args()
    args.overrides = [t for t in args.overrides if t != "--"]
    if args.stage:
        print("BENCHMARK " + json.dumps(run_stage(args)))
        return
    os.chdir(ROOT)
    with tempfile.TemporaryDirectory(prefix="benchmark_") as tmp:
        args.work_dir = args.work_dir or tmp
        if args.scaling:
            scaling(args)
            return
        results = [run_in_process(args, stage, args.overrides) for stage in args.stages]
    info = environment(args)
    table = markdown(results, info)
    print(table)
    if args.out:
        write(args.out.with_suffix(".json"), json.dumps({"environment": info, "stages": results}, indent=2) + "\n")
        write(args.out.with_suffix(".md"), table)


def write(path: Path, text: str) -> None:
    from bundle.io import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda t: Path(t).write_text(text))


def run_in_process(args, stage: str, overrides: list[str], work_dir: str | None = None) -> dict:
    """One stage in a fresh Python process (its own peak memory); returns its result."""
    command = [sys.executable, "-m", "evidence.benchmark", "--stage", stage, "--profile", args.profile,
               "--iterations", str(args.iterations), "--warmup", str(args.warmup),
               "--work_dir", work_dir or args.work_dir]
    command += ["--threads", str(args.threads)] if args.threads else []
    command += ["--sample_batch_size", str(args.sample_batch_size)] if args.sample_batch_size else []
    done = subprocess.run(command + ["--", *overrides], capture_output=True, text=True, cwd=ROOT)
    line = next((x for x in done.stdout.splitlines() if x.startswith("BENCHMARK ")), None)
    if done.returncode or line is None:
        sys.exit(f"Stage {stage} failed:\n{done.stderr[-3000:]}")
    result = json.loads(line[len("BENCHMARK "):])
    print(f"{stage} {' '.join(overrides)}: {result.get('images_per_second', result.get('skipped'))} images/s, "
          f"peak RSS {result.get('peak_rss_mib')} MiB", flush=True)
    return result


SCALING = {"autoencoder": ("ae_batch_size", (4, 8, 16)), "diffusion": ("diffusion_batch_size", (8, 16, 32, 64))}


def scaling(args) -> None:
    """Images/s and peak memory of the autoencoder and diffusion steps against image size and batch size."""
    from bundle.cli import pyplot

    rows = []
    for size in args.sizes:
        work = str(Path(args.work_dir) / f"size{size}")
        for stage, (key, batches) in SCALING.items():
            for batch in batches:
                result = run_in_process(args, stage, [*args.overrides, "--image_size", str(size), f"--{key}",
                                                      str(batch)], work)
                rows.append({"image_size": size, **result})
    info = environment(args)
    lines = [f"Device: {info['device']} ({info['cpu']}); torch {info['torch']}; profile `{info['profile']}` networks",
             "", "| stage | image size | batch | s per iteration | images/s | peak RSS (MiB) | peak GPU (MiB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['stage']} | {r['image_size']} | {r['batch_size']} | {r['seconds_median']:.3f} | "
              f"{r['images_per_second']:.1f} | {r['peak_rss_mib']:.0f} | {r.get('peak_gpu_mib', '-')} |" for r in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    if not args.out:
        return
    write(args.out.with_suffix(".json"), json.dumps({"environment": info, "runs": rows}, indent=2) + "\n")
    write(args.out.with_suffix(".md"), table)
    plt = pyplot()
    memory_key = "peak_gpu_mib" if any("peak_gpu_mib" in r for r in rows) else "peak_rss_mib"
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for stage, marker in (("autoencoder", "o"), ("diffusion", "s")):
        for size in args.sizes:
            runs = [r for r in rows if r["stage"] == stage and r["image_size"] == size]
            label = f"{stage}, {size} px"
            axes[0].plot([r["batch_size"] for r in runs], [r["images_per_second"] for r in runs], marker=marker,
                         label=label)
            axes[1].plot([r["batch_size"] for r in runs], [r[memory_key] for r in runs], marker=marker, label=label)
    for ax, title in ((axes[0], "training images/s"), (axes[1], f"peak memory (MiB, {memory_key[5:-4]})")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Cost against image size and batch size ({info['device']}, profile {info['profile']} networks)",
                 fontsize=10)
    fig.tight_layout()
    png = args.out.with_suffix(".png")
    from bundle.io import atomic_write

    atomic_write(png, lambda t: fig.savefig(t, dpi=110, format="png"))
    plt.close(fig)


if __name__ == "__main__":
    main()
