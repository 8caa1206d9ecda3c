"""MedSynth interactive preview benchmark: edit -> updated preview, stage by stage, on a real case.

A real BraTS 2021 case (default ``BraTS2021_00006``) is loaded into a real slicer-core
``vtkMRMLScene`` and prepared by the module's logic (``WorkflowLogic``) as the tests do;
the first preview synthesises the whole case, then the tumour is moved ``--moves``
times by 10-15 mm in seeded random directions (``WorkflowLogic.apply_edit`` with
MedSynthLib's ``Translate``), each followed by a preview in the background worker
(``start_preview`` -> poll -> ``finish_preview``).  Per move it records:

* **edit**: the label map read from the segmentation (``labels_sync``), MedSynthLib's
  edit, the edited labels written into the segmentation (``write_segmentation``);
* **preview, this side**: the label map (``labels``), the changed region found
  (``diff``), the request sent (``submit``); the result read (``receive``) and
  copied into the four MRML volume nodes (``write_volumes``);
* **worker** (reported by it): the label region applied, the render
  (``network``: the generator's forward alone), the arrays sent back;
  ``round_trip`` is the rest (pipes, polling, the reader threads);
* **end to end**: from the edit to the updated volumes (``edit_to_preview``) and from
  the edited segmentation to the updated volumes (``preview``);
* CPU seconds of this process and of the worker process (``/proc``), and the load average.

Reference, measured in the same run: right after each move, the engine's ROI forward
alone (``Synthesizer.predict_region`` on the box the worker rendered, in a separate clean
process set up as the worker is, nothing else running); the ratio end-to-end / reference
shows what the module adds to the network.  With ``--before COMMIT`` the same moves also run through that
commit's module (the path before this work, from ``git archive``) in the same run,
alternating with the current one (``--repeats``: per move the best repeat is kept).

Usage::

    python benchmarks/bench_preview.py [--case DIR] [--moves 8] [--repeats 2] [--before COMMIT] [--json OUT] \
        [--renderers synthesis,inpainting] [--inpainting-model NAME]

``--renderers synthesis,inpainting`` runs the same moves with both preview renderers, alternating:
``synthesis`` previews a whole synthetic case (the real case's anatomy), ``inpainting`` keeps the real
case's images and inpaints the edited region (what the module does for a real case with inpainting on;
its reference is the inpainting network's forward alone on the same region's box).

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
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CASE = (Path(os.environ.get("MEDSYNTH_DATA", REPO.parent / "shared" / "data")) / "brats2021" / "cases"
                / "BraTS2021_00006")
STAGES = ("labels_sync", "edit", "write_segmentation", "labels", "diff", "submit", "apply_labels", "network",
          "render_other", "send_arrays", "round_trip", "receive", "write_volumes")


def proc_cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a process so far (Linux ``/proc``), ``None`` elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, TypeError):
        return None


# --- one path, in a child process (its own tree on sys.path) --------------------------------------


def child(args: argparse.Namespace) -> int:
    tree = Path(args.tree)
    sys.path[:0] = [str(tree), str(tree / "MedSynth")]
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from MedSynthLib.edits import Translate
    from MedSynthSlicerLib import label_segmentation, mrml
    from MedSynthSlicerLib.errors import WorkflowError
    from MedSynthSlicerLib.logic import WorkflowLogic
    from MedSynthSlicerLib.parameters import GenerateOptions

    timings: dict[str, float] = {}

    def timed(owner, name: str, stage: str) -> None:
        original = getattr(owner, name)

        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start

        setattr(owner, name, wrapper)

    timed(label_segmentation.LabelSegmentation, "labelmap", "labelmap_calls")
    timed(label_segmentation.LabelSegmentation, "_commit", "write_segmentation")

    reference = None
    if args.reference:  # a clean process set up as the worker is, doing nothing but the forward
        reference = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--reference-server",
                                      "--tree", str(tree), "--threads", str(args.threads), "--device", args.device,
                                      "--renderer", args.renderer, "--inpainting-model", args.inpainting_model,
                                      "--case", str(args.case)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=dict(os.environ))

    work = Path(tempfile.mkdtemp(prefix="medsynth-bench-preview-"))
    scene, _ = mrml.create_headless_scene()
    logic = WorkflowLogic(scene, work_dir=work)
    out: dict = {"tree": str(tree), "renderer": args.renderer, "moves": []}
    try:
        nodes = logic.load_case(Path(args.case))
        seg = logic.prepare(nodes["t1"], nodes["tumour"], "brats2021")
        inpainting = args.renderer == "inpainting"  # the real case's images kept, the edited region inpainted
        options = GenerateOptions(device=args.device, inpaint=inpainting,
                                  inpainting_model=args.inpainting_model if inpainting else None)
        start = time.perf_counter()
        job = logic.start_preview(seg, options)
        while job.poll():
            time.sleep(0.002)
        logic.finish_preview(job)
        out["first_preview_s"] = time.perf_counter() - start
        rng = np.random.default_rng(args.seed)
        refused = 0
        while len(out["moves"]) < args.moves:
            direction = rng.normal(size=3)
            shift = tuple(float(v) for v in rng.uniform(10.0, 15.0) * direction / np.linalg.norm(direction))
            before = logic.labelmap(seg).array.copy()
            timings.clear()
            worker_pid = logic.worker().pid
            cpu_main, cpu_worker = time.process_time(), proc_cpu_seconds(worker_pid)
            t0 = time.perf_counter()
            try:
                logic.apply_edit(seg, Translate(shift))
            except WorkflowError:  # pushed the core out of the brain: draw another direction, not counted
                refused += 1
                continue
            t1 = time.perf_counter()
            edit_sync = timings.pop("labelmap_calls", 0.0)
            job = logic.start_preview(seg, options)
            t2 = time.perf_counter()
            while job.poll():
                time.sleep(0.002)
            t3 = time.perf_counter()
            logic.finish_preview(job)
            t4 = time.perf_counter()
            cpu_main = time.process_time() - cpu_main
            after_cpu = proc_cpu_seconds(worker_pid)
            data = dict(logic.last_preview or {})
            labels = logic.labelmap(seg).array
            changed = labels != before
            move = {"shift_mm": shift, "changed_voxels": int(changed.sum()), "box": data.get("box"),
                    "full": data.get("full"), "edit_to_preview_s": t4 - t0, "preview_s": t4 - t1,
                    "cpu_main_s": cpu_main,
                    "cpu_worker_s": None if cpu_worker is None or after_cpu is None else after_cpu - cpu_worker,
                    "load_1min": os.getloadavg()[0]}
            stages = {"labels_sync": edit_sync, "write_segmentation": timings.get("write_segmentation", 0.0)}
            stages["edit"] = t1 - t0 - stages["labels_sync"] - stages["write_segmentation"]
            client = getattr(job, "seconds", None) or {}
            worker = data.get("stages_s") or {}
            if client and worker:  # this work's path reports its stages
                stages.update({k: client[k] for k in ("labels", "diff", "submit", "receive", "write_volumes")})
                stages.update(apply_labels=worker["apply_labels"], network=worker["network"],
                              render_other=worker["render"] - worker["network"], send_arrays=worker["send_arrays"])
                stages["round_trip"] = (t3 - t2) - worker["worker_total"]
            else:  # the earlier path: only what can be seen from outside
                stages.update(start_preview=t2 - t1, worker_wait=t3 - t2, finish_preview=t4 - t3,
                              worker_reported=float(data.get("seconds") or 0.0))
            move["stages_s"] = stages
            move["renderer"] = data.get("renderer", "synthesis")
            if reference is not None and data.get("box") and not data.get("full"):
                labels_file = work / "reference-labels.npy"
                np.save(labels_file, labels)
                reference.stdin.write(json.dumps({"labels": str(labels_file), "box": data["box"]}) + "\n")
                reference.stdin.flush()
                answer = json.loads(reference.stdout.readline())
                move["reference_forward_s"] = answer["wall"]
                move["reference_forward_cpu_s"] = answer["cpu"]
                move["box_voxels"] = int(np.prod([b - a for a, b in zip(*data["box"])]))
                if "box_voxels" in answer:  # the inpainting network's input box (the region + its context)
                    move["network_box_voxels"] = answer["box_voxels"]
            out["moves"].append(move)
            print(f"  move {len(out['moves'])}: {move['changed_voxels']} voxels changed, edit -> preview "
                  f"{move['edit_to_preview_s']:.2f} s (load {move['load_1min']:.1f})", flush=True)
        out["refused_moves"] = refused
        # cancel: a preview of a further move stopped by the user, until the call returns; the worker stays
        cancels = []
        for _ in range(2 if args.reference else 0):  # noqa: B007
            direction = rng.normal(size=3)
            try:
                logic.apply_edit(seg, Translate(tuple(float(v) for v in 12.0 * direction / np.linalg.norm(direction))))
            except WorkflowError:
                continue
            job = logic.start_preview(seg, options)
            pid = logic.worker().pid
            time.sleep(0.1)
            start = time.perf_counter()
            logic.cancel_preview(job)
            cancels.append({"seconds": time.perf_counter() - start, "status": job.task.status,
                            "same_worker": logic.worker().pid == pid})
        out["cancel"] = cancels
    finally:
        logic.cleanup()
        if reference is not None:
            reference.stdin.close()
            reference.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)
    Path(args.child_json).write_text(json.dumps(out))
    return 0


def reference_server(args: argparse.Namespace) -> int:
    """The reference: the engine's ROI forward alone, for each (label map file, box) line read on stdin."""
    tree = Path(args.tree)
    sys.path[:0] = [str(tree)]
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from MedSynthLib.synthesis.models import resolve_model
    from MedSynthLib.synthesis.runtime import avoid_hugepage_stalls
    from MedSynthLib.synthesis.synthesize import SynthesisEngine

    avoid_hugepage_stalls()  # as the worker does
    if args.renderer == "inpainting":
        return reference_server_inpainting(args)
    engine = SynthesisEngine(resolve_model(None), args.device, "auto")
    engine._use_seed(0)
    for line in sys.stdin:
        request = json.loads(line)
        labels = np.load(request["labels"])
        box = tuple(slice(int(a), int(b)) for a, b in zip(*request["box"]))
        cpu, start = time.process_time(), time.perf_counter()
        engine.synth.predict_region(labels, box)
        print(json.dumps({"wall": time.perf_counter() - start, "cpu": time.process_time() - cpu}), flush=True)
    return 0


def reference_server_inpainting(args: argparse.Namespace) -> int:
    """The reference of the inpainting renderer: the inpainting network's forward alone on the region's box.

    The region is the one the worker inpaints (the case's own tumour and the moved one, grown by the default
    margin); its box, normalised images and condition are prepared untimed; only the forward is timed.
    """
    import numpy as np

    from MedSynthLib.schema.labels import MODALITIES, brain_mask
    from MedSynthLib.synthesis.inpainting import (DEFAULT_MARGIN_MM, InpaintingEngine, case_normalizers,
                                                  changed_region, lattice_box, read_context)
    from MedSynthLib.synthesis.models import resolve_model

    engine = InpaintingEngine(resolve_model(args.inpainting_model, kind="inpainting"), args.device, "auto")
    context = None
    for line in sys.stdin:
        request = json.loads(line)
        labels = np.load(request["labels"])
        if context is None:
            from MedSynthLib.schema.grid import LabelMap

            from MedSynthLib.cases.readers import read_case

            grid = read_case(args.case).grid
            context = read_context(args.case, LabelMap(labels, grid, []))
            spacing = tuple(float(s) for s in grid.spacing[::-1])
        region = changed_region(labels, context.tumour > 0, DEFAULT_MARGIN_MM, spacing)
        box = lattice_box(region, engine.network.size_multiple)  # the box the engine runs
        normalizers = case_normalizers(context.images, labels, region)
        brain = brain_mask(labels[box])
        normalized = np.stack([normalizers[m].forward(context.images[m][box], brain) for m in MODALITIES])
        cpu, start = time.process_time(), time.perf_counter()
        engine.predict_normalized(labels[box], normalized, region[box])
        print(json.dumps({"wall": time.perf_counter() - start, "cpu": time.process_time() - cpu,
                          "box_voxels": int(np.prod([s.stop - s.start for s in box]))}), flush=True)
    return 0


# --- the parent: runs the paths, prints and writes the summary ---------------------------------------


def export_tree(commit: str, folder: Path) -> Path:
    """The module and backend of ``commit`` (``git archive``), unpacked into ``folder``."""
    archive = folder / "tree.tar"
    subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", "-o", str(archive), commit,
                    "MedSynth", "MedSynthLib", "Resources"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder / "tree", filter="data")
    archive.unlink()
    return folder / "tree"


def run_child(tree: Path, args: argparse.Namespace, reference: bool, work: Path, renderer: str = "synthesis") -> dict:
    result = work / f"child-{time.monotonic_ns()}.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join([str(tree), str(tree / "MedSynth")]))
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--tree", str(tree), "--case", str(args.case),
               "--moves", str(args.moves), "--seed", str(args.seed), "--threads", str(args.threads),
               "--device", args.device, "--child-json", str(result), "--renderer", renderer,
               "--inpainting-model", args.inpainting_model] + (["--reference"] if reference else [])
    subprocess.run(command, env=env, check=True)
    return json.loads(result.read_text())


def median(values) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else 0.5 * (values[middle - 1] + values[middle])


# Variables that narrow the instruction sets the libraries use (oneDNN, ATen's kernels, NumPy's dispatch): set
# to run an AVX2-class CPU's code paths on a newer CPU, so a result must say whether they were.
ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "NPY_DISABLE_CPU_FEATURES")


def cpu_description() -> dict:
    """The CPU model, whether it computes bf16 natively for MedSynth, and any instruction-set caps in force."""
    from MedSynthLib.synthesis.inference import cpu_has_native_bf16

    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), model)
    except OSError:
        pass
    return {"model": model, "native_bf16": cpu_has_native_bf16(),
            "isa_caps": {name: os.environ[name] for name in ISA_VARIABLES if os.environ.get(name)}}


def best_of(runs: list[dict]) -> dict:
    """One run from repeats: per move the repeat with the shortest edit -> preview (the machine is shared)."""
    moves = [min(repeat, key=lambda m: m["edit_to_preview_s"]) for repeat in zip(*(r["moves"] for r in runs))]
    return {"first_preview_s": min(r["first_preview_s"] for r in runs), "moves": moves,
            "cancel": [c for r in runs for c in r.get("cancel", [])]}


def summarise(run: dict) -> dict:
    moves = run["moves"]
    keys = sorted({k for m in moves for k in m["stages_s"]})
    summary = {"first_preview_s": round(run["first_preview_s"], 3),
               "stages_median_s": {k: round(median(m["stages_s"].get(k) for m in moves), 4) for k in keys}}
    for key in ("edit_to_preview_s", "preview_s", "cpu_main_s", "cpu_worker_s", "reference_forward_s",
                "reference_forward_cpu_s", "load_1min"):
        values = [m.get(key) for m in moves if m.get(key) is not None]
        if values:
            summary[key] = {"median": round(median(values), 3), "min": round(min(values), 3),
                            "max": round(max(values), 3)}
    ratios = [m["edit_to_preview_s"] / m["reference_forward_s"] for m in moves if m.get("reference_forward_s")]
    if ratios:
        summary["ratio_edit_to_preview_over_reference"] = round(median(ratios), 2)
        summary["ratio_preview_over_reference"] = round(
            median(m["preview_s"] / m["reference_forward_s"] for m in moves if m.get("reference_forward_s")), 2)
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--case", type=Path, default=DEFAULT_CASE, help="a BraTS 2021 case folder")
    parser.add_argument("--moves", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each path, alternating; per move the best")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--before", metavar="COMMIT", help="also run the same moves through this commit's module")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--renderers", default="synthesis",
                        help="comma-separated preview renderers to run side by side: synthesis (a whole synthetic "
                             "case) and/or inpainting (the real case's images, the edited region inpainted)")
    parser.add_argument("--inpainting-model", default="medsynth-inpaint-brats27-f0d",
                        help="the inpainting model of the inpainting renderer (registered name or folder)")
    parser.add_argument("--renderer", default="synthesis", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    parser.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-json", help=argparse.SUPPRESS)
    parser.add_argument("--reference-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference_server:
        return reference_server(args)
    if args.child:
        return child(args)

    work = Path(tempfile.mkdtemp(prefix="medsynth-bench-preview-"))
    load_start = os.getloadavg()
    repeats: dict[str, list[dict]] = {}
    try:
        renderers = [r.strip() for r in args.renderers.split(",") if r.strip()]
        # The first renderer's run is "after" (the name earlier results use); the others go by their name.
        order = [("after" if i == 0 else r, REPO, r) for i, r in enumerate(renderers)]
        if args.before:
            order.append(("before", export_tree(args.before, work), renderers[0]))
        for repeat in range(args.repeats):  # the paths alternate, so both see the same load
            for name, tree, renderer in order:
                print(f"repeat {repeat + 1}/{args.repeats}, {name} ({renderer}): {tree} on {args.case.name}, "
                      f"{args.moves} moves ...", flush=True)
                repeats.setdefault(name, []).append(run_child(tree, args, reference=(name != "before"), work=work,
                                                              renderer=renderer))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    runs = {name: best_of(values) for name, values in repeats.items()}
    load_end = os.getloadavg()

    results = {"case": args.case.name, "moves": args.moves, "threads": args.threads, "device": args.device,
               "seed": args.seed, "before_commit": args.before, "cpus": os.cpu_count(),
               "load_average_start": [round(v, 2) for v in load_start],
               "load_average_end": [round(v, 2) for v in load_end], "platform": platform.platform(),
               "cpu": cpu_description(),
               "python": platform.python_version(), "command": " ".join(["python"] + sys.argv),
               "repeats": args.repeats, "note": "per move the repeat with the shortest edit -> preview",
               "summary": {name: summarise(run) for name, run in runs.items()}, "runs": repeats}
    after = results["summary"]["after"]
    print(f"\n{args.case.name}: {args.moves} moves of 10-15 mm, {args.threads} threads, {args.device}; "
          f"load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end, {os.cpu_count()} CPUs")
    print(f"{'stage (median s)':<22}" + "".join(f"{name:>10}" for name in runs))
    keys = [k for k in STAGES if any(k in results["summary"][n]["stages_median_s"] for n in runs)]
    keys += sorted({k for n in runs for k in results["summary"][n]["stages_median_s"]} - set(keys))
    for key in keys:
        row = [results["summary"][n]["stages_median_s"].get(key) for n in runs]
        print(f"{key:<22}" + "".join(f"{v:>10.3f}" if v is not None else f"{'-':>10}" for v in row))
    for key, title in (("preview_s", "edited segmentation -> updated volumes"),
                       ("edit_to_preview_s", "edit -> updated volumes"),
                       ("cpu_main_s", "CPU s, module process"), ("cpu_worker_s", "CPU s, worker process")):
        row = [results["summary"][n].get(key, {}).get("median") for n in runs]
        print(f"{title:<40}" + "".join(f"{v:>10.3f}" if v is not None else f"{'-':>10}" for v in row))
    for name in runs:
        summary = results["summary"][name]
        if "reference_forward_s" in summary:
            print(f"{name}: reference, ROI forward alone (same region, a clean process): median "
                  f"{summary['reference_forward_s']['median']:.3f} s "
                  f"(CPU {summary['reference_forward_cpu_s']['median']:.3f} s); ratio edit -> preview / reference: "
                  f"{summary['ratio_edit_to_preview_over_reference']}x; preview / reference: "
                  f"{summary['ratio_preview_over_reference']}x")
    for name in [n for n in runs if n not in ("after", "before")]:
        a = after["edit_to_preview_s"]["median"]
        other = results["summary"][name]["edit_to_preview_s"]["median"]
        results[f"ratio_{name}_over_after_edit_to_preview"] = round(other / a, 2)
        print(f"{name} / {renderers[0]}, edit -> preview: {other:.2f} / {a:.2f} s = {other / a:.2f}x; CPU s worker "
              f"{results['summary'][name].get('cpu_worker_s', {}).get('median')} / "
              f"{after.get('cpu_worker_s', {}).get('median')}")
    if "before" in runs:
        b = results["summary"]["before"]["edit_to_preview_s"]["median"]
        a = after["edit_to_preview_s"]["median"]
        results["ratio_before_over_after_edit_to_preview"] = round(b / a, 2)
        print(f"before / after, edit -> preview: {b:.2f} / {a:.2f} s = {b / a:.2f}x")
    for name in runs:
        for cancel in runs[name].get("cancel", []):
            print(f"{name}: cancel of a running preview: {cancel['seconds']:.3f} s, {cancel['status']}, "
                  f"worker kept: {cancel['same_worker']}")
        print(f"per move ({name}): " + ", ".join(f"{m['edit_to_preview_s']:.2f}" for m in runs[name]["moves"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
