"""Train the cross-validation folds and the all-cases model side by side on one GPU, sized to a time budget.

A lent GPU machine is held for minutes, so the run's length cannot be chosen beforehand.  Every run
starts with a long planned length (its learning rate is constant for the first half either way); once
each has written checkpoints for ``--probe-s`` seconds its measured rate (all runs sharing the GPU)
gives the length that fits the budget.  Each run is then stopped just after a checkpoint and resumed
with ``medsynth train --resume --steps N``, which records the change in its ``train_config.json``.
All runs get the same N.  Each finished run comes back as ``OUT/<run>.tar`` (model, run record,
TensorBoard log, console log); ``OUT/device_summary.json`` holds the measured rates and times.

    python benchmarks/gpu_training/device_train.py --prepared /root/prepared27 \\
        --config Resources/configs/spade_brats27_gpu64_cv.json --budget-s 440 --out "$OUT"
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def latest_step(run: Path) -> int:
    try:
        return int(json.loads((run / "checkpoints" / "latest.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def launch(name: str, args: argparse.Namespace, extra: list[str]) -> subprocess.Popen:
    run = args.work / name
    log = open(args.work / f"{name}.log", "a")
    fold = [] if name == "all" else ["--fold", name.removeprefix("fold")]
    command = [sys.executable, "-m", "MedSynthLib", "train", "--data", str(args.prepared), "-o", str(run),
               "--device", args.device] + extra
    if "--resume" not in extra:
        command += ["--config", str(args.config), "--threads", str(args.threads)] + fold
    print(f"[{time.time() - T0:6.1f}s] {name}: {' '.join(command[2:])}", flush=True)
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--runs", nargs="+", default=["fold0", "fold1", "fold2", "all"])
    parser.add_argument("--budget-s", type=float, required=True, help="seconds from start to the last export")
    parser.add_argument("--probe-s", type=float, default=45.0)
    parser.add_argument("--work", type=Path, default=Path("/root/medsynth_gpu_runs"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--export-s", type=float, default=150.0,
                        help="time kept for the final validation and export (a fold validates 9 whole brains; "
                             "in session 24 three folds at once took about 90 s a pass)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"budget_s": args.budget_s, "runs": {}}
    try:
        import torch

        summary["torch"] = torch.__version__
        summary["device_name"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception as error:  # the summary says what was there
        summary["torch"] = repr(error)
    print(json.dumps(summary), flush=True)

    # Phase 1: start every run and measure its rate while all share the device.
    procs = {name: launch(name, args, []) for name in args.runs}
    first: dict[str, tuple[float, int]] = {}
    last: dict[str, tuple[float, int]] = {}
    while True:
        now = time.time()
        for name in args.runs:
            if procs[name].poll() is not None:
                print(open(args.work / f"{name}.log").read()[-3000:], flush=True)
                raise SystemExit(f"{name} stopped during the probe (exit {procs[name].returncode})")
            step = latest_step(args.work / name)
            if step and name not in first:
                first[name] = (now, step)
            if step and step != last.get(name, (0, 0))[1]:
                last[name] = (now, step)
        if len(first) == len(args.runs) and all(last[n][0] - first[n][0] >= args.probe_s for n in args.runs):
            break
        if now - T0 > args.budget_s / 2:
            raise SystemExit("the probe took half the budget: too slow to fit a useful run")
        time.sleep(0.2)
    rates = {n: (last[n][1] - first[n][1]) / (last[n][0] - first[n][0]) for n in args.runs}
    startup = max(first[n][0] - T0 - first[n][1] / rates[n] for n in args.runs)
    print(f"[{time.time() - T0:6.1f}s] rates (steps/s): {rates}; start-up {startup:.1f} s", flush=True)

    # Phase 2: stop each run just after its next checkpoint.
    stopped: dict[str, int] = {}
    while len(stopped) < len(args.runs):
        for name in args.runs:
            if name in stopped:
                continue
            step = latest_step(args.work / name)
            if step != last[name][1]:
                procs[name].send_signal(signal.SIGINT)
                procs[name].wait()
                stopped[name] = latest_step(args.work / name)
        time.sleep(0.05)
    remaining = args.budget_s - (time.time() - T0) - startup - args.export_s
    steps = int(min(rates.values()) * remaining) // 100 * 100
    floor = 2 * max(stopped.values())  # the decay begins at half the length: it must not have begun yet
    summary.update(rates_steps_per_s=rates, startup_s=startup, probe_steps=stopped, steps=steps)
    print(f"[{time.time() - T0:6.1f}s] stopped at {stopped}; resuming to {steps} steps", flush=True)
    if steps < floor:
        raise SystemExit(f"only {steps} steps fit the budget (at least {floor} needed)")

    # Phase 3: resume all to the same length, with a hard stop at the budget.
    procs = {name: launch(name, args, ["--resume", "--steps", str(steps)]) for name in args.runs}
    deadline = T0 + args.budget_s + 60
    while any(p.poll() is None for p in procs.values()) and time.time() < deadline:
        time.sleep(1)
    for name, proc in procs.items():
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait()
        run = args.work / name
        done = (run / "model" / "weights.safetensors").is_file()
        summary["runs"][name] = {"exit": proc.returncode, "model": done, "final_step": latest_step(run)}
        with tarfile.open(args.out / f"{name}.tar", "w") as tar:
            for item in ("model", "train_config.json", "tensorboard"):
                if (run / item).exists():
                    tar.add(run / item, arcname=f"{name}/{item}")
            tar.add(args.work / f"{name}.log", arcname=f"{name}/console.log")
    summary["wall_s"] = time.time() - T0
    (args.out / "device_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2), flush=True)
    return 0 if all(r["model"] for r in summary["runs"].values()) else 1


T0 = time.time()

if __name__ == "__main__":
    sys.exit(main())
