"""MedSynth fast-preview benchmark: edit -> updated preview, the worker protocol beside the old path.

On a real BraTS 2021 case (its derived 7-class label map, the shipped model, CPU)
the tumour is moved ``--moves`` times by 10-15 mm (seeded directions); after each
move the preview is updated.  Measured in one run, each path ``--repeats`` times
(the minimum per move is kept: the machine may be shared):

* **worker** - the new path: the long-lived worker of ``MedSynthSlicerLib.jobs``
  (model loaded once), the label map sent as an array file in RAM, only the
  changed box of the four images sent back;
* **old** - the path the module used before (``preview_worker.py`` of git commit
  ``--old-commit``): the label map written as NRRD, the worker's ``rerender`` result
  written as four gzipped NIfTI (+ labels, provenance), read back with SimpleITK;
* **logic** (with slicer-core) - the module's own call on a real ``vtkMRMLScene``:
  ``WorkflowLogic.start_preview`` -> poll -> ``finish_preview`` (the label map read
  back from the segmentation node, the box copied into the preview volumes), and
  how long of it the GUI thread is busy (the rest runs in the worker);
* cancel: a full preview cancelled mid-network, until the call returns;
* **engine** - the floor: ``SynthesisEngine.rerender`` alone in this process (no
  transport, no scene), to show what the protocol adds.

Usage::

    python benchmarks/bench_preview.py [--case DIR] [--moves 10] [--repeats 2] [--json OUT]

Every process is limited to ``--threads`` (default 2) threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "MedSynth"))
DEFAULT_CASES = Path(os.environ.get("MEDSYNTH_DATA", REPO.parent / "shared" / "data")) / "brats2021" / "cases"


def moves(labelmap, count: int, seed: int):
    """``count`` tumour moves of 10-15 mm in seeded random directions, each applied to the previous map.

    A direction that would push the tumour core out of the brain is drawn again.

    Returns:
        (shifts in RAS mm, the label map after each move)
    """
    from MedSynthLib.edits import Translate
    from MedSynthLib.schema.errors import MedSynthError

    rng = np.random.default_rng(seed)
    shifts, maps, current = [], [], labelmap
    while len(maps) < count:
        direction = rng.normal(size=3)
        shift = tuple(float(v) for v in rng.uniform(10.0, 15.0) * direction / np.linalg.norm(direction))
        try:
            moved = Translate(shift).apply(current)
        except MedSynthError:
            continue
        shifts.append(shift)
        maps.append(moved)
        current = moved
    return shifts, maps


def backend_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


# --- the new path ---------------------------------------------------------------------------------


def run_worker(labelmap, maps, threads: int, device: str) -> dict:
    from MedSynthSlicerLib.jobs import WorkerClient, labelmap_request

    client = WorkerClient(sys.executable, env=backend_env(threads))
    volume = {m: np.zeros(labelmap.array.shape, np.float32) for m in ("t1", "t1ce", "t2", "flair")}

    def preview(lm, reset=False) -> tuple[float, dict]:
        start = time.perf_counter()
        params, arrays = labelmap_request(lm)
        task = client.submit("preview", dict(params, device=device, reset=reset), arrays)
        while task.poll():
            time.sleep(0.002)
        if task.status != "done":
            raise RuntimeError(task.error)
        (k0, j0, i0), (k1, j1, i1) = task.result.data["box"]
        for modality, region in task.arrays().items():  # what the module does: copy the box in place
            volume[modality][k0:k1, j0:j1, i0:i1] = region
        return time.perf_counter() - start, task.result.data

    try:
        first, _ = preview(labelmap, reset=True)
        per_move, boxes = [], []
        for lm in maps:
            seconds, data = preview(lm)
            per_move.append(seconds)
            boxes.append(data["box"])
        # cancel a full preview in the middle of its network pass
        cancels = []
        for _ in range(3):
            params, arrays = labelmap_request(labelmap)
            task = client.submit("preview", dict(params, device=device, reset=True), arrays)
            while task.poll() and task.text != "model loaded":
                time.sleep(0.002)
            time.sleep(0.3)
            start = time.perf_counter()
            client.cancel(task)
            cancels.append(time.perf_counter() - start)
    finally:
        client.close()
    return {"first_s": first, "per_move_s": per_move, "boxes": boxes, "cancel_s": cancels}


# --- the floor: the engine's re-render alone, in this process ------------------------------------------


def run_engine(labelmap, maps, device: str) -> dict:
    from MedSynthLib.synthesis.models import resolve_model
    from MedSynthLib.synthesis.synthesize import SynthesisEngine

    engine = SynthesisEngine(resolve_model(None), device, "auto")
    start = time.perf_counter()
    previous = engine.synthesize(labelmap)
    first = time.perf_counter() - start
    per_move = []
    for lm in maps:
        start = time.perf_counter()
        previous = engine.rerender(previous, lm)
        per_move.append(time.perf_counter() - start)
    return {"first_s": first, "per_move_s": per_move}


# --- the old path ---------------------------------------------------------------------------------


def run_old(labelmap, maps, threads: int, device: str, commit: str, work: Path) -> dict:
    import SimpleITK as sitk

    from MedSynthLib.schema.labelmap import write_label_map

    script = work / "old_preview_worker.py"
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:MedSynth/MedSynthSlicerLib/preview_worker.py"],
                            capture_output=True, text=True)
    if source.returncode != 0:
        raise RuntimeError(f"the old preview worker is not in this checkout's history ({source.stderr.strip()})")
    script.write_text(source.stdout)
    proc = subprocess.Popen([sys.executable, str(script), "--device", device], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=backend_env(threads))

    def reply(expected: int) -> dict:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("MEDSYNTH_REPLY "):
                message = json.loads(line.split(" ", 1)[1])
                if message.get("id") == expected:
                    if not message.get("ok"):
                        raise RuntimeError(message.get("error"))
                    return message
        raise RuntimeError("the old worker ended")

    counter = [0]

    def preview(lm, cmd: str) -> float:
        start = time.perf_counter()
        counter[0] += 1
        run = work / f"old-{counter[0]:03d}"
        run.mkdir()
        labels = write_label_map(lm, run / "labels.nrrd")
        proc.stdin.write(json.dumps({"id": counter[0], "cmd": cmd, "labels": str(labels),  # type: ignore[union-attr]
                                     "out": str(run / "case"), "seed": 0}) + "\n")
        proc.stdin.flush()  # type: ignore[union-attr]
        reply(counter[0])
        for modality in ("t1", "t1ce", "t2", "flair"):  # the module loaded these four back
            sitk.GetArrayFromImage(sitk.ReadImage(str(run / "case" / f"{modality}.nii.gz")))
        return time.perf_counter() - start

    try:
        start = time.perf_counter()
        reply(0)  # model loaded
        first = time.perf_counter() - start + preview(labelmap, "synthesize")
        per_move = [preview(lm, "rerender") for lm in maps]
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait(timeout=60)
    return {"first_s": first, "per_move_s": per_move}


# --- the module's logic on a real scene ----------------------------------------------------------------


def run_logic(case_dir: Path, shifts, threads: int, device: str, work: Path) -> dict:
    from MedSynthLib.edits import Translate
    from MedSynthSlicerLib import mrml
    from MedSynthSlicerLib.logic import WorkflowLogic
    from MedSynthSlicerLib.parameters import GenerateOptions

    os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    scene, _ = mrml.create_headless_scene()
    logic = WorkflowLogic(scene, work_dir=work)
    nodes = logic.load_case(case_dir)
    seg = logic.prepare(nodes["t1"], nodes["tumour"], "brats2021")
    options = GenerateOptions(device=device)

    def preview() -> tuple[float, float]:
        start = time.perf_counter()
        job = logic.start_preview(seg, options)
        busy = time.perf_counter() - start
        while job.poll():
            time.sleep(0.002)
        before = time.perf_counter()
        logic.finish_preview(job)
        end = time.perf_counter()
        return end - start, busy + end - before

    try:
        first, _ = preview()
        per_move, gui = [], []
        for shift in shifts:
            logic.apply_edit(seg, Translate(shift))
            seconds, busy = preview()
            per_move.append(seconds)
            gui.append(busy)
    finally:
        logic.cleanup()
    return {"first_s": first, "per_move_s": per_move, "gui_thread_s": gui}


def summary(values: list[float]) -> dict:
    array = np.asarray(values, float)
    return {"median": round(float(np.median(array)), 3), "min": round(float(array.min()), 3),
            "max": round(float(array.max()), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--case", type=Path, help="a BraTS 2021 case folder (default: the first real case)")
    parser.add_argument("--moves", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--old-commit", default="56846da213ca5fd5fc443a850150d24005ad0412",
                        help="the commit whose preview_worker.py is the old path")
    parser.add_argument("--skip-logic", action="store_true", help="no slicer-core run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from MedSynthLib.cases.anatomy import derive_label_map
    from MedSynthLib.cases.readers import read_case

    case_dir = args.case or sorted(p for p in DEFAULT_CASES.iterdir() if p.is_dir())[0]
    print(f"case {case_dir.name}: deriving the label map ...", flush=True)
    labelmap = derive_label_map(read_case(case_dir))
    shifts, maps = moves(labelmap, args.moves, args.seed)
    changed = [int((b.array != a.array).sum()) for a, b in zip([labelmap] + maps[:-1], maps)]
    work = Path(tempfile.mkdtemp(prefix="medsynth-bench-preview-"))
    runs: dict[str, list[dict]] = {"worker": [], "old": [], "logic": [], "engine": []}
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    try:
        for repeat in range(args.repeats):
            print(f"repeat {repeat + 1}/{args.repeats}: engine alone ...", flush=True)
            runs["engine"].append(run_engine(labelmap, maps, args.device))
            print(f"repeat {repeat + 1}/{args.repeats}: worker ...", flush=True)
            runs["worker"].append(run_worker(labelmap, maps, args.threads, args.device))
            print(f"repeat {repeat + 1}/{args.repeats}: old path ...", flush=True)
            runs["old"].append(run_old(labelmap, maps, args.threads, args.device, args.old_commit,
                                       Path(tempfile.mkdtemp(dir=work))))
            if not args.skip_logic:
                print(f"repeat {repeat + 1}/{args.repeats}: logic on a vtkMRMLScene ...", flush=True)
                runs["logic"].append(run_logic(case_dir, shifts, args.threads, args.device,
                                               Path(tempfile.mkdtemp(dir=work))))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def best(kind: str, key: str) -> list[float]:
        return [min(values) for values in zip(*(run[key] for run in runs[kind]))]

    results: dict = {
        "case": case_dir.name, "shape_kji": list(labelmap.array.shape), "moves_mm": [list(s) for s in shifts],
        "changed_voxels": changed, "threads": args.threads, "device": args.device, "repeats": args.repeats,
        "load_average_at_start": load, "cpus": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__,
        "note": "minimum over the repeats per move (the machine was shared); the module polls every 50 ms, "
                "add up to that much in the GUI",
        "runs": runs,
    }
    for kind in ("worker", "old", "logic", "engine"):
        if runs[kind]:
            results[kind] = {"first_s": round(min(r["first_s"] for r in runs[kind]), 3),
                             "per_move_s": summary(best(kind, "per_move_s"))}
    results["worker"]["cancel_s"] = summary([c for r in runs["worker"] for c in r["cancel_s"]])
    if runs["logic"]:
        results["logic"]["gui_thread_s"] = summary(best("logic", "gui_thread_s"))
    results["ratio_old_over_worker_per_move_median"] = round(
        results["old"]["per_move_s"]["median"] / results["worker"]["per_move_s"]["median"], 2)
    results["ratio_old_over_worker_first"] = round(results["old"]["first_s"] / results["worker"]["first_s"], 2)
    results["ratio_worker_over_engine_per_move_median"] = round(
        results["worker"]["per_move_s"]["median"] / results["engine"]["per_move_s"]["median"], 2)

    print(f"\n{case_dir.name} {labelmap.array.shape}, {args.moves} moves of 10-15 mm, {args.threads} threads, "
          f"{args.device}, min of {args.repeats} repeats (load average at start {load})")
    print(f"{'path':<34}{'first':>8}{'per move median':>18}{'min':>8}{'max':>8}")
    for kind, title in (("old", "old (NRRD + 4 gz NIfTI round trip)"), ("worker", "worker (arrays in RAM, box only)"),
                        ("logic", "module logic on a vtkMRMLScene"), ("engine", "engine re-render alone (floor)")):
        if kind in results:
            r = results[kind]
            print(f"{title:<34}{r['first_s']:>8.2f}{r['per_move_s']['median']:>18.3f}{r['per_move_s']['min']:>8.3f}"
                  f"{r['per_move_s']['max']:>8.3f}")
    if "logic" in results:
        print(f"GUI thread busy per move (logic): median {results['logic']['gui_thread_s']['median']:.3f} s")
    print(f"cancel of a running full preview: median {results['worker']['cancel_s']['median']:.3f} s, "
          f"max {results['worker']['cancel_s']['max']:.3f} s")
    print(f"ratio old / worker: per move {results['ratio_old_over_worker_per_move_median']}x, "
          f"first {results['ratio_old_over_worker_first']}x; worker / engine alone per move "
          f"{results['ratio_worker_over_engine_per_move_median']}x")
    print(f"changed voxels per move: {changed}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
