"""Kill a real (tiny) training run with SIGKILL at random moments, re-run the same command each time, and check
that it always finishes with what an uninterrupted run gives.

    python -m devtools.fault_injection --trials 5 --kills 5          (about 10 min on 2 CPU cores; writes docs/results)
    python -m devtools.fault_injection --stages autoencoder cache    (kills aimed at those stages only)
    python -m devtools.fault_injection --trials 20 --kills 6         (at least 100 kills, spread over the stages)

The run is README command 1's pipeline (in-domain DINO pre-training, autoencoder, cache, diffusion, report) with
tiny networks on 16 JSRT images. Each trial starts the command up to --kills times; each time it picks a stage
at random (of --stages), waits until the run logs that stage's start, waits 0-1 s more (so kills land
mid-epoch, in checkpoint, cache and sample writes alike) and sends SIGKILL to the whole process group; then
it runs the command once more to the end. Checked after every trial: exit 0; every model and report file
present and readable; each stage trained its configured epochs; no temporary file left; no more checkpoints
than configured; the autoencoder's reconstruction PSNR within 1 dB of the uninterrupted run's. Lost work per
kill: the seconds between the newest checkpoint or model file and the kill. Writes <out>/reliability.{json,md}.
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

from bundle.checkpoints import checkpoint_files
from bundle.cli import data_folder, report_json
from bundle.models import model_path

EPOCHS = {"dino": 6, "autoencoder": 8, "diffusion": 8}
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


# what each stage logs as it starts its work, to kill a run inside a chosen stage
MARKERS = {"dino": "dino: training from epoch", "autoencoder": "autoencoder: training from epoch",
           "cache": "encoding", "diffusion": "diffusion: training from epoch", "report": "generating"}


def check(work: Path) -> dict:
    """The facts a finished run leaves behind (an unreadable model file raises: the trial then fails)."""
    import torch

    facts: dict = {"temporary_files_left": [str(p) for p in work.rglob("*.tmp")],
                   "checkpoints_per_stage": {}, "epochs_trained": {}}
    for stage in EPOCHS:
        files = checkpoint_files(work / "models" / "checkpoints" / stage)
        facts["checkpoints_per_stage"][stage] = len(files)
        facts["epochs_trained"][stage] = int(files[-1].stem.split("=")[-1]) if files else None
    for name in ("autoencoder", "diffusion"):
        torch.load(model_path(work, name), map_location="cpu", weights_only=True)  # readable
    report = json.loads((work / "report" / "evaluation.json").read_text())
    facts["reconstruction_psnr_db"] = report["reconstruction"]["psnr_db"]["mean"]
    facts["report_files"] = sorted(p.name for p in (work / "report").iterdir())
    return facts


def done(work: Path, stage: str) -> bool:
    """Whether a stage's output exists already, so a re-run would skip it (no kill can land there)."""
    outputs = {"dino": model_path(work, "dino"), "autoencoder": model_path(work, "autoencoder"),
               "cache": work / "cache" / "latents.pt", "diffusion": model_path(work, "diffusion"),
               "report": work / "report" / "evaluation.json"}
    return Path(outputs[stage]).exists()


def run_trial(dataset: Path, work: Path, kills: int, rng: random.Random, logs: Path, trial: int,
              stages: list[str] | None = None, tally: dict[str, int] | None = None) -> dict:
    """Up to ``kills`` times: start the command, wait until it is inside a chosen stage (of ``stages``) that is not
    finished yet (its marker in the output), then a random 0-1 s more, and SIGKILL it; then run it once more to the
    end. The stage is drawn at random among those, or, given ``tally`` (kills so far per stage, updated here),
    among those with the fewest kills, so every stage collects about as many."""
    shutil.rmtree(work, ignore_errors=True)
    events = []
    for attempt in range(kills):
        remaining = [stage for stage in (stages or MARKERS) if not done(work, stage)]
        if not remaining:
            break
        if tally is not None:
            fewest = min(tally.get(stage, 0) for stage in remaining)
            remaining = [stage for stage in remaining if tally.get(stage, 0) == fewest]
        target = rng.choice(remaining)
        log_path = logs / f"trial_{trial}_attempt_{attempt}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(command(dataset, work), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            while proc.poll() is None and MARKERS[target] not in log_path.read_text(errors="ignore"):
                time.sleep(0.05)
            if proc.poll() is not None:  # the chosen stage was already done, or the run ended first
                events.append({"target": target, "killed": False, "returncode": proc.returncode})
                continue
            time.sleep(rng.uniform(0.0, 1.0))
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            killed_at, last = time.time(), newest_save(work)
            events.append({"target": target, "killed": True, "lost_work_s": round(killed_at - last, 1) if last else None})
            if tally is not None:
                tally[target] = tally.get(target, 0) + 1
    start = time.time()
    with open(logs / f"trial_{trial}_final.log", "w") as log:
        final = subprocess.run(command(dataset, work), stdout=log, stderr=subprocess.STDOUT)
    seconds, facts, error = round(time.time() - start, 1), None, None
    try:
        facts = check(work) if final.returncode == 0 else None
    except Exception as err:  # an unreadable or missing output fails the trial, it does not stop the script
        error = f"{type(err).__name__}: {err}"
    return {"attempts": events, "kills": [e for e in events if e["killed"]], "final_returncode": final.returncode,
            "final_seconds": seconds, "check": facts, "check_error": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--kills", type=int, default=5, help="kills per trial before it may finish")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", nargs="+", choices=list(MARKERS), default=list(MARKERS),
                        help="the stages kills aim at (default: all; each kill picks one not yet finished)")
    parser.add_argument("--aim", choices=["balanced", "random"], default="balanced",
                        help="balanced: each kill aims at an unfinished stage with the fewest kills so far; random: at "
                             "any unfinished stage (later stages then collect most kills)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "fault_injection")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--jsrt", type=Path, default=None, help="the JSRT folder (default: $DINO_DIFFUSION_DATA/jsrt)")
    args = parser.parse_args()
    args.jsrt = data_folder("jsrt", args.jsrt)
    images = sorted((args.jsrt / "images").glob("*.png"))[:16]
    if not images:
        raise SystemExit(f"error: no JSRT images in {args.jsrt / 'images'}: pass --jsrt to the JSRT folder.")
    args.work.mkdir(parents=True, exist_ok=True)
    dataset = args.work / "train.csv"
    dataset.write_text("image\n" + "".join(f"{p}\n" for p in images))
    logs = args.work / "logs"
    logs.mkdir(exist_ok=True)
    rng = random.Random(args.seed)

    shutil.rmtree(args.work / "reference", ignore_errors=True)
    start = time.time()
    with open(logs / "reference.log", "w") as log:
        reference = subprocess.run(command(dataset, args.work / "reference"), stdout=log, stderr=subprocess.STDOUT)
    expected = time.time() - start
    if reference.returncode != 0:
        raise SystemExit(f"error: the uninterrupted run failed; see {logs / 'reference.log'}")
    ref = check(args.work / "reference")
    trials: list[dict] = []
    tally: dict[str, int] | None = {} if args.aim == "balanced" else None
    for t in range(args.trials):
        trial = run_trial(dataset, args.work / f"trial_{t}", args.kills, rng, logs, t, args.stages, tally)
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
        "command": "python -m devtools.fault_injection " + " ".join(sys.argv[1:]),
        "uninterrupted_seconds": round(expected, 1), "reference": ref, "trials": trials,
        "summary": {"kills": len(kills), "trials": len(trials), "recovered": sum(t["passed"] for t in trials),
                    "kills_per_stage": {s: sum(k["target"] == s for k in kills) for s in MARKERS},
                    "largest_lost_work_s": max((k["lost_work_s"] or 0.0 for k in kills), default=0.0)},
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
        f"- Kills per stage (the run was killed 0-1 s after it entered that stage): {s['kills_per_stage']}.",
        f"- Largest work lost to one kill: {s['largest_lost_work_s']:.1f} s (time since the newest checkpoint or model "
        "file; at most one epoch of a stage, as checkpoints are written every epoch).",
        "",
        "| trial | kills (stage) | final run s | PSNR dB | passed |",
        "|---|---|---|---|---|",
    ]
    for i, t in enumerate(trials):
        where = ", ".join(k["target"] for k in t["kills"])
        psnr = f"{t['check']['reconstruction_psnr_db']:.2f}" if t["check"] else "-"
        lines.append(f"| {i} | {where} | {t['final_seconds']} | {psnr} | {t['passed']} |")
    text = "\n".join(lines) + "\n"
    from bundle.io import atomic_write

    atomic_write(args.out / "reliability.md", lambda tmp: Path(tmp).write_text(text))
    print(text)


if __name__ == "__main__":
    main()
