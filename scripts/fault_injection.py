"""Kill a real (tiny) training run with SIGKILL at random moments, re-run the same command each time, and check
that it always finishes with what an uninterrupted run gives.

    python scripts/fault_injection.py --trials 6 --kills 5 --out docs/results     (about 15 min on 2 CPU cores)

The run is README command 1's pipeline (in-domain DINO pre-training, autoencoder, cache, diffusion, report) with
tiny networks on 16 JSRT images, so that kills land in every stage, in checkpoint, cache and sample writes
alike. Each trial kills the command up to --kills times at a uniformly random moment of its expected length,
then lets it finish. Checked after every trial: exit 0; every model and report file present and readable; each
stage trained its configured epochs; no temporary file left; no more checkpoints than configured; the
autoencoder's reconstruction PSNR within 1 dB of the uninterrupted run's. Lost work per kill: the seconds
between the newest checkpoint or model file and the kill. Writes <out>/reliability.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bundle.checkpoints import checkpoint_files  # noqa: E402
from bundle.cli import report_json  # noqa: E402
from bundle.models import model_path  # noqa: E402

EPOCHS = {"dino": 3, "autoencoder": 4, "diffusion": 4}
SETTINGS = [
    "--image_size", "32", "--autoencoder_channels", "[8,16]", "--latent_channels", "2", "--unet_channels", "[16,32]",
    "--unet_attention_levels", "[False,True]", "--unet_res_blocks", "1", "--unet_head_channels", "16",
    "--dino_model", "vit_tiny_patch16_224", "--dino_weights", "pretrain", "--dino_input_size", "32",
    "--dino_kwargs", "{'patch_size': 8, 'depth': 2}", "--dino_batch_size", "8", "--num_local_crops", "2",
    "--dino_epochs", str(EPOCHS["dino"]), "--ae_epochs", str(EPOCHS["autoencoder"]),
    "--diffusion_epochs", str(EPOCHS["diffusion"]), "--ae_batch_size", "4", "--diffusion_batch_size", "4",
    "--adv_warmup_epochs", "1", "--preview_interval", "2", "--preview_count", "2", "--num_inference_steps", "4",
    "--report_count", "8", "--torch_threads", "1",
]


def command(dataset: Path, work: Path) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(ROOT / "configs/train.json"),
            "--bundle_root", str(ROOT), "--dataset_dir", str(dataset), "--work_dir", str(work), *SETTINGS]


def newest_save(work: Path) -> float:
    files = [p for p in (work / "models").rglob("*") if p.is_file() and not p.name.endswith(".tmp")]
    return max((p.stat().st_mtime for p in files), default=0.0)


def stage_of(work: Path) -> str:
    if (work / "report" / "evaluation.json").exists():
        return "report done"
    for stage, path in (("report", model_path(work, "diffusion")), ("diffusion", work / "cache" / "latents.pt"),
                        ("cache", model_path(work, "autoencoder")), ("autoencoder", model_path(work, "dino"))):
        if Path(path).exists():
            return stage
    return "dino"


def check(work: Path) -> dict:
    """What a finished run must leave behind; returns the facts, raises nothing."""
    import torch

    facts: dict = {}
    temps = [str(p) for p in work.rglob("*.tmp")]
    facts["temporary_files_left"] = temps
    counts = {stage: len(checkpoint_files(work / "models" / "checkpoints" / stage)) for stage in EPOCHS}
    facts["checkpoints_per_stage"] = counts
    epochs = {}
    for stage in EPOCHS:
        files = checkpoint_files(work / "models" / "checkpoints" / stage)
        epochs[stage] = int(files[-1].stem.split("=")[-1]) if files else None
    facts["epochs_trained"] = epochs
    for name in ("autoencoder", "diffusion"):
        torch.load(model_path(work, name), map_location="cpu", weights_only=True)  # readable
    report = json.loads((work / "report" / "evaluation.json").read_text())
    facts["reconstruction_psnr_db"] = report["reconstruction"]["psnr_db"]["mean"]
    facts["report_files"] = sorted(p.name for p in (work / "report").iterdir())
    return facts


def run_trial(dataset: Path, work: Path, kills: int, expected: float, rng: random.Random, log) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    events = []
    for _ in range(kills):
        proc = subprocess.Popen(command(dataset, work), stdout=log, stderr=log, start_new_session=True)
        delay = rng.uniform(2.0, expected)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            stage = stage_of(work)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            killed_at = time.time()
            last = newest_save(work)
            events.append({"after_s": round(delay, 1), "stage": stage,
                           "lost_work_s": round(killed_at - last, 1) if last else round(delay, 1)})
            continue
        events.append({"after_s": None, "stage": "finished before the kill", "returncode": proc.returncode})
        break
    start = time.time()
    final = subprocess.run(command(dataset, work), stdout=log, stderr=log)
    return {"kills": [e for e in events if e["after_s"] is not None], "final_returncode": final.returncode,
            "final_seconds": round(time.time() - start, 1), "check": check(work) if final.returncode == 0 else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--kills", type=int, default=5, help="kills per trial before it may finish")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "fault_injection")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--jsrt", type=Path, default=ROOT.parent / "shared" / "data" / "jsrt", help="the JSRT folder")
    args = parser.parse_args()
    images = sorted((args.jsrt / "images").glob("*.png"))[:16]
    if not images:
        raise SystemExit(f"error: no JSRT images in {args.jsrt / 'images'}: pass --jsrt to the JSRT folder.")
    args.work.mkdir(parents=True, exist_ok=True)
    dataset = args.work / "train.csv"
    dataset.write_text("image\n" + "".join(f"{p}\n" for p in images))
    log = open(args.work / "runs.log", "w")
    rng = random.Random(args.seed)

    start = time.time()
    reference = subprocess.run(command(dataset, args.work / "reference"), stdout=log, stderr=log)
    expected = time.time() - start
    if reference.returncode != 0:
        raise SystemExit(f"error: the uninterrupted run failed; see {args.work / 'runs.log'}")
    ref = check(args.work / "reference")
    trials = []
    for t in range(args.trials):
        trial = run_trial(dataset, args.work / f"trial_{t}", args.kills, expected, rng, log)
        c = trial["check"]
        trial["passed"] = bool(
            c and trial["final_returncode"] == 0 and not c["temporary_files_left"]
            and all(n <= 1 for n in c["checkpoints_per_stage"].values()) and c["epochs_trained"] == EPOCHS
            and abs(c["reconstruction_psnr_db"] - ref["reconstruction_psnr_db"]) <= 1.0
            and c["report_files"] == ref["report_files"])
        trials.append(trial)
        print(f"trial {t}: {len(trial['kills'])} kills, passed={trial['passed']}", flush=True)
    kills = [k for t in trials for k in t["kills"]]
    result = {
        "command": "python scripts/fault_injection.py " + " ".join(sys.argv[1:]),
        "uninterrupted_seconds": round(expected, 1), "reference": ref, "trials": trials,
        "summary": {"kills": len(kills), "trials": len(trials), "recovered": sum(t["passed"] for t in trials),
                    "kills_per_stage": {s: sum(k["stage"] == s for k in kills) for s in
                                        ("dino", "autoencoder", "cache", "diffusion", "report", "report done")},
                    "largest_lost_work_s": max((k["lost_work_s"] for k in kills), default=0.0)},
    }
    report_json(result, args.out / "reliability.json")
    s = result["summary"]
    lines = [
        "# Reliability: SIGKILL at random moments, then the same command again",
        "",
        f"`{result['command']}` (tiny networks on 16 JSRT images, the whole `training` run ID with in-domain DINO "
        f"pre-training and the closing report; an uninterrupted run takes {expected:.0f} s here).",
        "",
        f"- **{s['kills']} kills in {s['trials']} trials; {s['recovered']} of {s['trials']} trials finished with every check "
        "passed** (exit 0, all models and report files readable, each stage at its configured epochs, no "
        "temporary file left, at most one checkpoint per stage, reconstruction PSNR within 1 dB of the "
        f"uninterrupted run's {ref['reconstruction_psnr_db']:.2f} dB).",
        f"- Kills per stage (where the run was when killed): {s['kills_per_stage']}.",
        f"- Largest work lost to one kill: {s['largest_lost_work_s']:.1f} s (time since the newest checkpoint or model "
        "file; at most one epoch of a stage, as checkpoints are written every epoch).",
        "",
        "| trial | kills (after s: stage) | final run s | PSNR dB | passed |",
        "|---|---|---|---|---|",
    ]
    for i, t in enumerate(trials):
        where = ", ".join(f"{k['after_s']}: {k['stage']}" for k in t["kills"])
        psnr = f"{t['check']['reconstruction_psnr_db']:.2f}" if t["check"] else "-"
        lines.append(f"| {i} | {where} | {t['final_seconds']} | {psnr} | {t['passed']} |")
    text = "\n".join(lines) + "\n"
    from bundle.io import atomic_write

    atomic_write(args.out / "reliability.md", lambda tmp: Path(tmp).write_text(text))
    print(text)


if __name__ == "__main__":
    main()
