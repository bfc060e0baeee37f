"""Generator quality against CPU core-hours: the 64- and 128-px runs on one figure (docs/results/quality.md).

    # per-step cost of each training stage, both profiles on one thread, one after the other on the same machine
    python -m evidence.benchmark --profile cpu64 --stages dino autoencoder diffusion --threads 1 \\
        --out docs/results/benchmark_cpu64_1thread
    python -m evidence.benchmark --profile cpu128 --stages dino autoencoder diffusion --threads 1 \\
        --out docs/results/benchmark_cpu128_1thread
    # the figure: every run's curves (quality.json of evidence/evaluate_quality) against the core-hours spent
    python -m evidence.quality_compute --run "64 px=docs/results/quality_cpu64,docs/results/benchmark_cpu64_1thread.json" \\
        --run "128 px=docs/results/quality_cpu128,docs/results/benchmark_cpu128_1thread.json" \\
        --out docs/results/quality_compute

A snapshot's x-value is the compute of the recipe up to it, at the benchmark's measured cost per image of each stage
(seconds per step / batch size x threads): for an autoencoder snapshot the DINO pre-training (``--dino_epochs``, the
16 of ``run_quality_cpu.sh``) plus the autoencoder epochs so far; for a diffusion snapshot DINO, every autoencoder
epoch trained (the last snapshot of the autoencoder curve) and the diffusion epochs so far, each epoch being one pass over the run's training images.
The logged wall times of a run on a shared machine vary 2-4x with what else ran; the per-step benchmark, measured
side by side, is the comparable figure. The benchmark's autoencoder step is the one after the adversarial warm-up, so
the warm-up epochs are counted at that (higher) cost. Writes OUT.png and OUT.json (the points).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from bundle.cli import pyplot
from bundle.io import atomic_write_json
from bundle.workflow import load_profile
from evidence.evaluate_quality import save_curves

ROOT = Path(__file__).resolve().parents[1]


def stage_cost(benchmark: dict) -> dict[str, float]:
    """Core-seconds per training image of each stage a benchmark measured."""
    return {s["stage"]: s["seconds_median"] / s["batch_size"] * s["threads"] for s in benchmark["stages"]
            if s.get("per") == "iteration"}


def points(quality: dict, benchmark: dict, dino_epochs: int) -> dict:
    """Every curve point of one run with the core-hours spent to reach it."""
    cost = stage_cost(benchmark)
    missing = {"dino", "autoencoder", "diffusion"} - set(cost)
    if missing:
        raise SystemExit(f"the benchmark of profile {benchmark['environment']['profile']} has no "
                         f"{', '.join(sorted(missing))} stage: run evidence.benchmark with --stages dino autoencoder diffusion.")
    profile = load_profile(ROOT, benchmark["environment"]["profile"])
    n = int(quality["train_images"])
    hours = lambda stage, epochs: epochs * n * cost[stage] / 3600  # noqa: E731
    dino = hours("dino", dino_epochs)

    def epochs_of(curve: list[dict], stage: str) -> list[tuple[float, dict]]:
        """(epochs trained, point) of every point, the final model included (its epochs from its iterations), once
        per epoch count: a final model that is one of the snapshots is not drawn twice."""
        per_epoch = math.ceil(n / int(profile[f"{stage}_batch_size"]))
        found = {}
        for p in curve:
            epochs = p.get("epoch") or (p["iterations"] / per_epoch if p.get("iterations") else None)
            if epochs:
                found.setdefault(round(epochs, 3), p)
        return sorted(found.items(), key=lambda item: item[0])

    ae_points, diffusion_points = epochs_of(quality["autoencoder_curve"], "ae"), epochs_of(quality["diffusion_curve"], "diffusion")
    ae_total = hours("autoencoder", max((e for e, _ in ae_points), default=int(profile["ae_epochs"])))
    out = {"profile": benchmark["environment"]["profile"], "train_images": n,
           "core_seconds_per_image": {k: round(v, 4) for k, v in cost.items()},
           "core_hours": {"dino": round(dino, 3), "autoencoder": round(ae_total, 3)}, "autoencoder": [], "diffusion": []}
    for epochs, p in ae_points:
        out["autoencoder"].append({"epoch": epochs, "core_hours": round(dino + hours("autoencoder", epochs), 3),
                                   "sets": {k: v["psnr_db"]["mean"] for k, v in p["sets"].items()}})
    for epochs, p in diffusion_points:
        out["diffusion"].append({
            "epoch": epochs, "core_hours": round(dino + ae_total + hours("diffusion", epochs), 3),
            "sets": {k: {space: v[f"fd_{space}"] / v[f"fd_{space}_reference"] for space in ("pixels", "dino")}
                     for k, v in p["sets"].items()}})
    return out


def plot(runs: dict[str, dict], path: Path) -> None:
    plt = pyplot()
    from matplotlib.ticker import ScalarFormatter

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    markers = "osd^v"
    for r, (label, run) in enumerate(runs.items()):
        names = sorted({k for p in run["autoencoder"] + run["diffusion"] for k in p["sets"]})
        for s, name in enumerate(names):
            style = dict(marker=markers[r % len(markers)], color=f"C{s}", ls=("-", "--", ":")[r % 3], label=f"{label}, {name}")
            ae = [p for p in run["autoencoder"] if name in p["sets"]]
            axes[0].plot([p["core_hours"] for p in ae], [p["sets"][name] for p in ae], **style)
            dif = [p for p in run["diffusion"] if name in p["sets"]]
            for ax, space in ((axes[1], "pixels"), (axes[2], "dino")):
                ax.plot([p["core_hours"] for p in dif], [p["sets"][name][space] for p in dif], **style)
    axes[0].set(title="autoencoder PSNR on test (dB)", xlabel="core-hours (DINO + autoencoder so far)")
    for ax, space in ((axes[1], "pixels"), (axes[2], "DINO")):
        ax.axhline(1.5, color="grey", lw=0.8, ls=":")
        ax.set(title=f"FD / same-source reference FD, {space}", xlabel="core-hours (whole recipe so far)", yscale="log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
    save_curves(fig, axes, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=QUALITY_DIR,BENCHMARK_JSON",
                        help="a folder with evaluate_quality's quality.json and the benchmark of the run's profile")
    parser.add_argument("--dino_epochs", type=int, default=16, help="the runs' DINO epochs (run_quality_cpu.sh: 16)")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.png and OUT.json")
    args = parser.parse_args(argv)
    runs = {}
    for item in args.run:
        label, _, rest = item.partition("=")
        folder, _, bench = rest.partition(",")
        quality, benchmark = Path(folder) / "quality.json", Path(bench)
        if not label or not quality.is_file() or not benchmark.is_file():
            raise SystemExit(f"--run {item!r}: give LABEL=QUALITY_DIR,BENCHMARK_JSON with QUALITY_DIR/quality.json "
                             "(evidence.evaluate_quality) and the profile's benchmark JSON (evidence.benchmark).")
        runs[label] = points(json.loads(quality.read_text()), json.loads(benchmark.read_text()), args.dino_epochs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out.with_suffix(".json"), runs)
    plot(runs, args.out.with_suffix(".png"))
    for label, run in runs.items():
        last = run["diffusion"][-1] if run["diffusion"] else None
        print(f"{label}: DINO {run['core_hours']['dino']:.2f} + autoencoder {run['core_hours']['autoencoder']:.2f} "
              f"core-hours" + (f"; diffusion to epoch {last['epoch']}: {last['core_hours']:.2f} in all" if last else ""))
    print(f"wrote {args.out.with_suffix('.png')} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
