"""Quality against training compute, and the generator's targets, on fixed held-out sets.

    python -m evidence.evaluate_quality --work_dir runs/corpus_cpu64 --train runs/corpus_cpu64/lists/train.csv \\
        --test jsrt=runs/corpus_cpu64/lists/test_jsrt.csv --test corpus=runs/corpus_cpu64/lists/test_corpus.csv \\
        --out docs/results/quality_cpu64

Every test set is judged on its own. Curves (one point per snapshot in ``work_dir/models/snapshots``, written by
training with ``--snapshot_every N``, plus the final model): autoencoder PSNR and MS-SSIM on every test image;
Fréchet distance of reconstruction-strategy samples (each conditioned on one test image's DINO embedding, the
bundle's default sampler) against the test images, in pixels (32x32) and in the generator's DINO space, on a fixed
random subset of ``--curve_samples`` test images, with one reference (as many training images of the test set's
source) for every point of the curve. Targets (final models only, ``--samples`` samples per test set, test images
reused as conditions round-robin):

- FD against the reference FD of as many randomly drawn training images (what a perfect generator scores);
- divergent samples, by :func:`bundle.evaluation.divergent` (non-finite, flat, noisy or off the real manifold,
  each compared with every real held-out image);
- conditioning: is a sample's source its nearest real image among the pool of test images, in pixel space
  (which the generator was not conditioned on)? top-1/top-5 against chance 1/N and 5/N;
- memorisation: samples conditioned on training images, flagged when closer to a training image than the
  closest real test image is to any (a copy), and the 5%-quantile rate of :func:`bundle.evaluation.memorisation`.

Writes OUT/quality.json, OUT/quality.md (tables), OUT/curves.png and OUT/samples_<set>.png (samples beside their
sources as thumbnails). Nothing is trained; reruns reuse the image caches in ``work_dir/cache`` and every sample set
already made by the same model files with the same conditions, seeds and sampler (``--sample_store``, default
``work_dir/eval/samples``): at 128 px on a CPU the evaluation is hours of sampling, and an interrupted one, or one
run on the snapshots while training goes on, does not make its samples twice. ``--profile`` takes the training
profile's batch sizes to turn snapshot epochs into iterations.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from bundle.cli import pyplot
from bundle.data import build_datalist, file_stamp, hash_bytes, hash_json, modality_preprocessing, preprocessed_images
from bundle.diffusion import sample_latents, seeded_noise
from bundle.dino import DinoFeatures
from bundle.errors import BundleInputError
from bundle.heads.encoders import dino_encoder_spec
from bundle.evaluation import (divergent, extract, feature_space, frechet_distance, memorisation,
                               reconstruction_quality, source_retrieval, two_rows_png)
from bundle.io import atomic_write
from bundle.models import load_codec, load_generator, model_path, read_record
from bundle.performance import autocast_dtype, precision_name
from bundle.workflow import load_profile

EPOCH = re.compile(r"_epoch(\d+)\.pt$")


def snapshots(work_dir: Path, name: str) -> list[tuple[int | None, Path]]:
    """``(epoch, path)`` of every snapshot of ``name`` in epoch order, then the final model (epoch None)."""
    found = sorted((int(EPOCH.search(p.name).group(1)), p) for p in (work_dir / "models" / "snapshots").glob(f"{name}_epoch*.pt")
                   if EPOCH.search(p.name))
    final = Path(model_path(work_dir, name))
    return found + ([(None, final)] if final.is_file() else [])


def trained_epochs(work_dir: Path, name: str) -> int | None:
    """The last epoch training checkpointed for ``name`` (``models/checkpoints/<name>/*_epoch=N.pt``): how long the
    final model trained, where it is none of the snapshots (a run that stopped past its last snapshot)."""
    epochs = [int(p.stem.rsplit("=", 1)[1]) for p in (work_dir / "models" / "checkpoints" / name).glob("*_epoch=*.pt")
              if p.stem.rsplit("=", 1)[1].isdigit()]
    return max(epochs, default=None)


def copies_cell(memorisation: dict | None) -> str:
    return "not checked" if memorisation is None else f"{memorisation['copies']} of {memorisation['samples']}"


def date_final_model(curve: list[dict], last_epoch: int | None, per_epoch: int) -> None:
    """Give the curve's last point, when it is the final model and none of the snapshots, the iterations it trained:
    its checkpointed epochs (``last_epoch``), else the last snapshot's."""
    if not curve or curve[-1]["iterations"] is not None:
        return
    previous = [p["iterations"] for p in curve if p["iterations"] is not None]
    curve[-1]["iterations"] = last_epoch * per_epoch if last_epoch else max(previous, default=0) or None


def image_set(source: str, preprocessing, cache: Path) -> torch.Tensor:
    rows = build_datalist(source, None)
    if not rows:
        raise BundleInputError(f"Image set '{source}' has no images.")
    return preprocessed_images(rows, preprocessing, cache)["images"].float()


SAMPLE_STORE: Path | None = None  # where finished sample sets are kept (--sample_store), so a rerun skips them
SAMPLE_DTYPE: torch.dtype | None = None  # the UNet's precision while sampling (--sampling_amp)


def model_key(*paths: Path) -> str:
    """Names the model files by name, size and time (:func:`bundle.data.file_stamp`)."""
    return "|".join(file_stamp(p) for p in paths)


@torch.no_grad()
def sample(generator, contexts: torch.Tensor, seeds: list[int], sampler: str, steps: int, guidance: float,
           batch_size: int, key: str | None = None) -> torch.Tensor:
    """Samples for ``contexts`` with one seed each; with ``key`` (the model files, :func:`model_key`) and a
    SAMPLE_STORE, a set made before with the same model, contexts, seeds and sampler is read back instead: the
    evaluation of a long run is hours of sampling on a CPU, and an interrupted one goes on where it stopped."""
    stored = None
    if key is not None and SAMPLE_STORE is not None:
        # sets made in float32 keep the names they had before precision was a setting
        precision = [] if SAMPLE_DTYPE is None else [str(SAMPLE_DTYPE)]
        name = hash_json([key, hash_bytes(contexts.float().numpy().tobytes()), list(seeds), sampler, steps, guidance,
                          *precision])
        stored = SAMPLE_STORE / f"{name[:24]}.pt"
        if stored.is_file():
            return torch.load(stored, weights_only=True).float()
    if stored is None:
        return _sample(generator, contexts, seeds, sampler, steps, guidance, batch_size)
    # batch by batch, each kept as it is made: a 128-px set of 256 is about an hour of one CPU thread, and an
    # interrupted set goes on from its last finished batch (each sample's noise comes from its own seed, and the
    # batches are the ones _sample would make, so the set is the same either way)
    stored.parent.mkdir(parents=True, exist_ok=True)
    parts = []
    for i in range(0, len(contexts), batch_size):
        part = stored.with_name(f"{stored.stem}.batch{i}.pt")
        if not part.is_file():
            images = _sample(generator, contexts[i : i + batch_size], seeds[i : i + batch_size], sampler, steps,
                             guidance, batch_size)
            atomic_write(part, lambda tmp: torch.save(images.half(), tmp))
        parts.append(part)
    images = torch.cat([torch.load(part, weights_only=True) for part in parts])
    atomic_write(stored, lambda tmp: torch.save(images, tmp))
    for part in parts:
        part.unlink()
    return images.float()  # the same precision whether made now or read back


def _sample(generator, contexts, seeds, sampler, steps, guidance, batch_size) -> torch.Tensor:
    scheduler = generator.sampler(sampler)
    out = []
    for i in range(0, len(contexts), batch_size):
        noise = seeded_noise(seeds[i : i + batch_size], generator.latent_shape, "cpu")
        latents = sample_latents(generator.unet, scheduler, contexts[i : i + batch_size], noise, steps, guidance,
                                 dtype=SAMPLE_DTYPE)
        out.append(generator.codec.decode(latents).clamp(0, 1))
    return torch.cat(out)


@torch.no_grad()
def embed(generator, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    return torch.cat([generator.dino(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def curves_png(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for name in result["test_sets"]:
        # one point per iteration count, in order (a final model that is a chosen snapshot is that snapshot's point)
        ae = sorted({p["iterations"]: p for p in result["autoencoder_curve"] if name in p["sets"]
                     and p["iterations"] is not None}.values(), key=lambda p: p["iterations"])
        if ae:
            axes[0].plot([p["iterations"] for p in ae], [p["sets"][name]["psnr_db"]["mean"] for p in ae], "o-", label=name)
        dif = [p for p in result["diffusion_curve"] if name in p["sets"]]
        for space, style in (("pixels", "o-"), ("dino", "s--")):
            if dif:
                ratio = [p["sets"][name][f"fd_{space}"] / p["sets"][name][f"fd_{space}_reference"] for p in dif]
                axes[1 if space == "pixels" else 2].plot([p["iterations"] for p in dif], ratio, style, label=name)
    lines = result.get("target_lines", {})  # the targets, as dotted lines (results written before they were recorded: 64 px's)
    axes[0].axhline(lines.get("psnr_db", 30.0), color="grey", lw=0.8, ls=":")
    axes[0].set(title="autoencoder PSNR on test (dB)", xlabel="autoencoder iterations")
    for ax, space in ((axes[1], "pixels"), (axes[2], "DINO")):
        ax.axhline(lines.get("fd_ratio", 2.0), color="grey", lw=0.8, ls=":")
        ax.set(title=f"FD / reference FD, {space}", xlabel="diffusion iterations", yscale="log")
    save_curves(fig, axes, path)


def save_curves(fig, axes, path: Path) -> None:
    """Grid and legend on every panel, then the figure written atomically as PNG and closed."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    pyplot().close(fig)


def markdown(result: dict) -> str:
    lines = [f"Targets judged on the diffusion model `{result['target_model']}`; sampler {result['sampler']['name']}, "
             f"{result['sampler']['steps']} steps, guidance {result['sampler']['guidance_scale']}.", "",
             "| test set | AE PSNR (dB) | AE MS-SSIM | FD pixels (ref) | FD DINO (ref) | divergent | source top-1 (chance) "
             "| source top-5 (chance) | copies |", "|---|---|---|---|---|---|---|---|---|"]
    for name, t in result["targets"].items():
        r, c = t["reconstruction"], t["conditioning"]
        lines.append(
            f"| {name} | {r['psnr_db']['mean']:.2f} | {r['ms_ssim']['mean']:.4f} | {t['fd_pixels']:.2f} "
            f"({t['fd_pixels_reference']:.2f}, {t['fd_pixels'] / t['fd_pixels_reference']:.2f}x) | {t['fd_dino']:.2f} "
            f"({t['fd_dino_reference']:.2f}, {t['fd_dino'] / t['fd_dino_reference']:.2f}x) | {t['divergent']['count']} of "
            f"{t['divergent']['of']} | {c['top1']:.3f} ({c['chance_top1']:.3f}) | {c['top5']:.3f} ({c['chance_top5']:.3f}) "
            f"| {copies_cell(t.get('memorisation'))} |")
    lines += ["", "| model | iterations | " + " | ".join(f"{n} PSNR / MS-SSIM (recon FD pixels / DINO)"
                                                       for n in result["test_sets"]) + " |",
              "|---|---|" + "---|" * len(result["test_sets"])]

    def recon_fd(q: dict) -> str:
        found = [f"{q[k]:.2f}" if k in q else "-" for k in ("fd_pixels", "fd_dino")]
        return f" ({' / '.join(found)})" if "fd_pixels" in q else ""

    for p in result["autoencoder_curve"]:
        lines.append(f"| {p['model']} | {p['iterations']} | " + " | ".join(
            f"{p['sets'][n]['psnr_db']['mean']:.2f} / {p['sets'][n]['ms_ssim']['mean']:.4f}{recon_fd(p['sets'][n])}"
            for n in result["test_sets"]) + " |")
    lines += ["", "| model | iterations | " + " | ".join(f"{n} FD pixels / DINO (x reference)" for n in result["test_sets"])
              + " |", "|---|---|" + "---|" * len(result["test_sets"])]
    for p in result["diffusion_curve"]:
        lines.append(f"| {p['model']} | {p['iterations']} | " + " | ".join(
            f"{p['sets'][n]['fd_pixels']:.2f} / {p['sets'][n]['fd_dino']:.2f} "
            f"({p['sets'][n]['fd_pixels'] / p['sets'][n]['fd_pixels_reference']:.2f}x / "
            f"{p['sets'][n]['fd_dino'] / p['sets'][n]['fd_dino_reference']:.2f}x)" for n in result["test_sets"]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", type=Path, required=True)
    parser.add_argument("--train", required=True, help="the generator's training images (datalist or folder)")
    parser.add_argument("--test", action="append", required=True, metavar="NAME=SOURCE",
                        help="a named held-out set; repeat for several (each is judged on its own)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=256, help="samples per test set for the targets")
    parser.add_argument("--curve_samples", type=int, default=128, help="samples per test set per curve point")
    parser.add_argument("--memorisation_samples", type=int, default=128,
                        help="samples conditioned on training images for the copy check (0: no check)")
    parser.add_argument("--profile", default=None,
                        help="the training profile (configs/profiles/NAME.json): its batch sizes turn epochs into iterations")
    parser.add_argument("--ae_batch_size", type=int, default=None, help="to turn epochs into iterations (default: the "
                        "profile's, else 16)")
    parser.add_argument("--diffusion_batch_size", type=int, default=None, help="(default: the profile's, else 32)")
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance_scale", type=float, default=3.0)
    parser.add_argument("--sampling_amp", default="auto", help="the UNet's precision while sampling, as inference.json's "
                        "sampling_amp: auto (bf16 where the CPU has bf16 instructions), none (float32), bf16")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--torch_threads", type=int, default=None, help="CPU threads (default: PyTorch's)")
    parser.add_argument("--final_only", action="store_true", help="skip the snapshots (targets only)")
    parser.add_argument("--target_psnr", type=float, default=30.0,
                        help="the autoencoder's PSNR target, drawn on the curves (64 px: 30 dB; 128 px: 31)")
    parser.add_argument("--target_fd_ratio", type=float, default=2.0,
                        help="the FD / reference FD target, drawn on the curves (64 px: 2; 128 px: 1.5)")
    parser.add_argument("--curve_every", type=int, default=1, help="the diffusion curve's points: the snapshots whose "
                        "epoch is a multiple of this, and the final model (each point samples every test set)")
    parser.add_argument("--curves_only", action="store_true",
                        help="the curves over the snapshots there are so far, no targets (while training goes on)")
    parser.add_argument("--sample_store", type=Path, default=None,
                        help="keep every sample set here and reuse it on a rerun (default: <work_dir>/eval/samples; "
                        "'none': keep nothing)")
    parser.add_argument("--target_model", type=Path, default=None,
                        help="judge the targets on this diffusion snapshot (a run still under way) instead of the final model")
    args = parser.parse_args()
    tests = dict(t.split("=", 1) for t in args.test)
    global SAMPLE_STORE, SAMPLE_DTYPE
    SAMPLE_DTYPE = autocast_dtype(args.sampling_amp, "cpu")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    SAMPLE_STORE = (args.work_dir / "eval" / "samples" if args.sample_store is None
                    else None if str(args.sample_store).lower() == "none" else args.sample_store)
    profile = load_profile(ROOT, args.profile) if args.profile else {}
    args.ae_batch_size = args.ae_batch_size or int(profile.get("ae_batch_size", 16))
    args.diffusion_batch_size = args.diffusion_batch_size or int(profile.get("diffusion_batch_size", 32))
    started = time.perf_counter()
    torch.manual_seed(0)

    ae_final = Path(model_path(args.work_dir, "autoencoder"))
    record = read_record(ae_final, "autoencoder", "train it first (run ID train_autoencoder)")["record"]
    preprocessing = modality_preprocessing(ROOT / "configs" / "modality" / f"{record['modality']}.json",
                                           image_size=record["image_size"])
    cache = args.work_dir / "cache"
    train = image_set(args.train, preprocessing, cache / "eval_train.pt")
    real = {name: image_set(src, preprocessing, cache / f"eval_test_{name}.pt") for name, src in tests.items()}
    # the reference of a test set: training images of its own sources (JSRT test against JSRT train, not against
    # the corpus children), when both lists name their source
    train_rows = build_datalist(args.train, None)
    pools = {}
    for name, src in tests.items():
        sources = {str(r.get("source", "")) for r in build_datalist(src, None)}
        same = [i for i, r in enumerate(train_rows) if str(r.get("source", "")) in sources]
        pools[name] = torch.as_tensor(same if "" not in sources and same else list(range(len(train_rows))))
    per_epoch = {"ae": math.ceil(len(train) / args.ae_batch_size), "diffusion": math.ceil(len(train) / args.diffusion_batch_size)}
    result: dict = {"work_dir": str(args.work_dir), "target_model": str(args.target_model or "final"),
                    "target_lines": {"psnr_db": args.target_psnr, "fd_ratio": args.target_fd_ratio},
                    "train_images": len(train), "test_sets": {n: len(x) for n, x in real.items()},
                    "sampler": {"name": args.sampler, "steps": args.steps, "guidance_scale": args.guidance_scale,
                                "precision": precision_name(SAMPLE_DTYPE)},
                    "autoencoder_curve": [], "diffusion_curve": [], "targets": {}}
    pixels = feature_space("pixels")
    pix_train = extract(pixels, train)
    pix_real = {n: extract(pixels, x) for n, x in real.items()}
    rng = np.random.default_rng(0)

    # the reconstructions' FD from their originals: in pixels, and in the DINO space of the work dir's own DINO
    # teacher when it has one (its sidecar names the architecture and input size)
    recon_spaces = {"pixels": pixels}
    teacher = args.work_dir / "models" / "dino" / "teacher.safetensors"
    if Path(f"{teacher}.json").is_file():
        spec = dino_encoder_spec(teacher)
        recon_spaces["dino"] = feature_space("dino", DinoFeatures(spec["model"], spec["weights"], "cls",
                                                                  spec["input_size"], spec["kwargs"], 0))
    ae_points = snapshots(args.work_dir, "autoencoder")
    weights_of = {}  # a final model that is one of the snapshots (chosen on validation films) takes its iterations
    for epoch, path in (ae_points[-1:] if args.final_only else ae_points):
        codec = load_codec(path)
        digest = hash_bytes(b"".join(t.detach().float().numpy().tobytes() for t in codec.state_dict().values()))
        epoch = weights_of.get(digest) if epoch is None else weights_of.setdefault(digest, epoch)
        point = {"model": path.name, "epoch": epoch, "iterations": None if epoch is None else epoch * per_epoch["ae"],
                 "sets": {n: reconstruction_quality(x, codec, features=recon_spaces) for n, x in real.items()}}
        result["autoencoder_curve"].append(point)
        print(json.dumps({k: v for k, v in point.items()}), flush=True)
    date_final_model(result["autoencoder_curve"], trained_epochs(args.work_dir, "autoencoder"), per_epoch["ae"])

    curve_subsets = {name: torch.as_tensor(np.sort(np.random.default_rng(1).choice(len(x), min(args.curve_samples, len(x)),
                                                                                    replace=False))) for name, x in real.items()}
    # one reference per test set for the whole curve (as many training images of its source as curve samples), so
    # that the curve's ratios move with the model only
    curve_rng = np.random.default_rng([0, 1])
    curve_references = {name: train[pools[name][torch.as_tensor(curve_rng.choice(
        len(pools[name]), min(len(curve_subsets[name]), len(pools[name])), replace=False))]] for name in real}
    diffusion_points = [p for p in snapshots(args.work_dir, "diffusion") if p[0] is None or p[0] % args.curve_every == 0]
    if args.target_model is not None:
        diffusion_points = [p for p in diffusion_points if p[1] != args.target_model and p[0] is not None
                            and p[0] < int(EPOCH.search(args.target_model.name).group(1))] + [(None, args.target_model)]
    final_generator = None
    for epoch, path in (diffusion_points[-1:] if args.final_only else diffusion_points):
        generator = load_generator(ae_final, path, bundle_root=ROOT)
        generator_key = model_key(ae_final, path)
        dino = feature_space("dino", generator.dino)
        if epoch is None and EPOCH.search(path.name):  # a snapshot judged as the target model
            epoch = int(EPOCH.search(path.name).group(1))
            final = True
        else:
            final = epoch is None
        point = {"model": path.name, "epoch": epoch,
                 "iterations": None if epoch is None else epoch * per_epoch["diffusion"], "sets": {}}
        for name, x_all in real.items():
            # a fixed random subset: test lists are ordered by source, and the first rows would be one source only
            x = x_all[curve_subsets[name]]
            n = len(x)
            contexts = embed(generator, x)
            samples = sample(generator, contexts, list(range(n)), args.sampler, args.steps, args.guidance_scale, args.batch_size,
                             key=generator_key)
            reference = curve_references[name]
            n = len(reference)
            samples = samples[:n]
            point["sets"][name] = {
                "samples": n,
                "fd_pixels": frechet_distance(extract(pixels, x), extract(pixels, samples)),
                "fd_pixels_reference": frechet_distance(extract(pixels, x), extract(pixels, reference)),
                "fd_dino": frechet_distance(extract(dino, x), extract(dino, samples)),
                "fd_dino_reference": frechet_distance(extract(dino, x), extract(dino, reference)),
            }
        result["diffusion_curve"].append(point)
        print(json.dumps(point), flush=True)
        final_generator = (generator, generator_key) if final else None
    date_final_model(result["diffusion_curve"], trained_epochs(args.work_dir, "diffusion"), per_epoch["diffusion"])

    if final_generator is not None and not args.curves_only:
        generator, generator_key = final_generator
        dino = feature_space("dino", generator.dino)
        ae_final_quality = result["autoencoder_curve"][-1]["sets"]
        for name, x in real.items():
            count = args.samples
            sources = [i % len(x) for i in range(count)]
            contexts = embed(generator, x)[sources]
            samples = sample(generator, contexts, [10_000 + i for i in range(count)], args.sampler, args.steps,
                             args.guidance_scale, args.batch_size, key=generator_key)
            n_ref = min(count, len(pools[name]))  # FD is biased by set size: both sets get n_ref images
            reference = train[pools[name][torch.as_tensor(rng.choice(len(pools[name]), n_ref, replace=False))]]
            pix_samples, dino_samples, dino_real = extract(pixels, samples), extract(dino, samples), extract(dino, x)
            target = {
                "samples": count,
                "fd_images": n_ref,
                "reference_pool": len(pools[name]),
                "reconstruction": ae_final_quality[name],
                "fd_pixels": frechet_distance(pix_real[name], pix_samples[:n_ref]),
                "fd_pixels_reference": frechet_distance(pix_real[name], extract(pixels, reference)),
                "fd_dino": frechet_distance(dino_real, dino_samples[:n_ref]),
                "fd_dino_reference": frechet_distance(dino_real, extract(dino, reference)),
                "divergent": divergent(samples, pix_samples, pix_train, pix_real[name], x),
                "conditioning": source_retrieval(pix_samples, pix_real[name], sources),
            }
            two_rows_png(x[sources[:8]], samples[:8], ("source", "sample"), args.out / f"samples_{name}.png")
            flagged = target["divergent"]["flagged"][:8]
            if flagged:
                two_rows_png(x[[sources[i] for i in flagged]], samples[flagged], ("source", "flagged"),
                             args.out / f"divergent_{name}.png")
            result["targets"][name] = target
            print(json.dumps({name: {k: v for k, v in target.items() if k != "divergent"}}), flush=True)
        # memorisation (--memorisation_samples 0: none): samples conditioned on training images, the ones a copying
        # model would reproduce
        if args.memorisation_samples > 0:
            m = min(args.memorisation_samples, len(train))
            picks = torch.as_tensor(np.random.default_rng([0, 2]).choice(len(train), m, replace=False))
            copies_of = sample(generator, embed(generator, train[picks]), [20_000 + i for i in range(m)], args.sampler,
                               args.steps, args.guidance_scale, args.batch_size, key=generator_key)
            pix_copies = extract(pixels, copies_of)
            all_test = torch.cat(list(pix_real.values()))
            mem = memorisation(pix_copies, pix_train, all_test, quantile=0.05)
            closest_real = float(torch.cdist(all_test.double(), pix_train.double()).min())
            flagged = (torch.as_tensor(mem["distance"]) < closest_real).nonzero().flatten()
            copies = len(flagged)
            if copies:  # each flagged sample beside the training image it is closest to
                nearest = torch.as_tensor(mem["nearest_train"])[flagged[:8]]
                two_rows_png(copies_of[flagged[:8]], train[nearest], ("sample", "nearest train"), args.out / "copies.png")
            summary = {"samples": m, "copies": copies, "closest_test_to_train": closest_real,
                       "flagged": [{"distance": mem["distance"][i], "nearest_train": int(mem["nearest_train"][i]),
                                    "own_source": int(mem["nearest_train"][i]) == int(picks[i])} for i in flagged.tolist()],
                       "closest_sample_to_train": mem["generated_to_train"]["min"],
                       "median_sample_to_train": mem["generated_to_train"]["median"],
                       "median_test_to_train": mem["test_to_train"]["median"],
                       "quantile_0.05_flagged_fraction": mem["flagged_fraction"],
                       "nearest_is_own_source": float((torch.as_tensor(mem["nearest_train"]) == picks).double().mean())}
            for name in result["targets"]:
                result["targets"][name]["memorisation"] = summary
            result["memorisation"] = summary
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "quality.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
    if result["targets"]:
        atomic_write(args.out / "quality.md", lambda tmp: Path(tmp).write_text(markdown(result)))
    curves_png(result, args.out / "curves.png")
    print(f"wrote {args.out}/quality.json in {result['seconds']} s")


if __name__ == "__main__":
    main()
