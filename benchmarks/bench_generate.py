"""Throughput of ``medsynth generate``: cases per hour, CPU seconds per case and the share of each stage.

Runs the generator with the shipped model on the real data (1 mm BraTS grid: the BraTS 2021
cases, their tumour-only label maps, the BraTS 2020 label maps and the template), once per
setting given, each into a fresh output folder, with the anatomy cache shared and filled
beforehand (deriving anatomy is a one-off per source, reported separately).  A setting is
``workers:precision`` (e.g. ``2:bf16``).

The machine this runs on is usually shared, so every run is measured together with a
reference taken in the same process right before and after it: one plain forward pass of the
network on a fixed real brain box (bf16, the run's torch threads per process), its wall and
CPU seconds, and the load average.  Per run it records

* ``cases_per_hour``: wall clock of the case phase (worker start and model load included);
* ``cpu_seconds_per_case`` and the stage table (wall and CPU seconds per case, share of CPU) from
  the provenance files: ``sample`` (cached sources + edits), ``privacy_stats``, ``synthesis``
  (one-hot, network, scanner units; its ``forward_wall_s`` is the network alone), ``encode``, ``nifti`` (NIfTI + gzip), ``hash``; plus ``card`` and ``sources``
  (once per run);
* ``cores_used``: CPU seconds per case x cases per second, i.e. how much of the machine the run
  got; and ``projected_idle_cases_per_hour`` = 3600 x cores / CPU seconds per case.  That last
  figure is a projection (it assumes CPU seconds per case do not change when nothing else runs
  and the stages parallelise over the cores), not a measurement;
* ``cases_per_reference_forward``: cases made in the time of one reference forward pass, a
  load-independent-ish ratio.

``--code DIR`` runs another checkout's MedSynthLib (e.g. an earlier commit exported with
``git archive``) with the same measurement, for before/after comparisons in one session;
``--nifti`` adds the NIfTI gzip measurement (SimpleITK's levels, Python's gzip 1 and 6).

Usage::

    nice -n 10 .venv/bin/python benchmarks/bench_generate.py --n 16 --settings 2:bf16 1:bf16 \\
        --nifti --json docs/benchmarks/generate_cpu_2core.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    return Path(os.environ.get("MEDSYNTH_DATA", REPO.parent / "shared" / "data"))


def reference_forward(source: Any, threads: int, precision: str) -> dict[str, float]:
    """One plain forward pass in ``precision`` (the run's) on the brain box of ``source`` (best of 2), with
    ``threads`` torch threads.  Not always bf16: where the CPU lacks it, torch emulates bf16 (~28x slower)."""
    import torch

    from MedSynthLib.generate.sources import load_source
    from MedSynthLib.synthesis.inference import brain_box
    from MedSynthLib.synthesis.models import resolve_model
    from MedSynthLib.synthesis.synthesize import SynthesisEngine

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        engine = SynthesisEngine(resolve_model(None), "cpu", precision)
        labels = load_source(source).array
        box = brain_box(labels)
        best: dict[str, float] | None = None
        for _ in range(2):
            wall, cpu = time.perf_counter(), time.process_time()
            engine.synth.predict_region(labels, box)
            took = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
            best = took if best is None or took["wall_s"] < best["wall_s"] else best
        assert best is not None
        return {k: round(v, 3) for k, v in best.items()}
    finally:
        torch.set_num_threads(before)


def _per_case(records: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """Wall/CPU seconds per case of every stage found in the records (fine ``stages`` when present)."""
    table: dict[str, dict[str, float]] = {}
    for record in records:
        stages = record.get("stages")
        if not stages:  # an older checkout: the coarse stages only
            stages = {k: {"wall_s": record["timings_s"][k], "cpu_s": record["cpu_s"][k]}
                      for k in ("edit", "network", "write")}
        for name, values in stages.items():
            row = table.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0})
            for key, value in values.items():
                row[key] = row.get(key, 0.0) + value
    return {name: {k: round(v / n, 3) for k, v in row.items()} for name, row in table.items()}


def run(setting: str, n: int, seed: int, cache: Path, work: Path, sources: list[Path], reference_source: Any,
        cores: int) -> dict[str, Any]:
    from MedSynthLib.generate.runner import GenerateOptions, generate

    workers, precision = setting.split(":")
    threads = max(1, cores // int(workers))
    out = work / f"run-{setting.replace(':', '-')}"
    shutil.rmtree(out, ignore_errors=True)
    ref_before = reference_forward(reference_source, threads, precision)
    load_before = os.getloadavg()
    start, cpu_start = time.perf_counter(), time.process_time()
    summary = generate(GenerateOptions(n=n, output=out, labels_from=sources, template=True, layout="nnunet",
                                       workers=int(workers), seed=seed, device="cpu", precision=precision,
                                       cache=cache, progress=False))
    total = time.perf_counter() - start
    load_after = os.getloadavg()
    ref_after = reference_forward(reference_source, threads, precision)
    records = [json.loads(p.read_text()) for p in sorted((out / "provenance").glob("*.json"))]
    stages = _per_case(records, n)
    cpu_per_case = round(sum(row.get("cpu_s", 0.0) for row in stages.values()), 3)
    case_phase = summary["seconds"]
    cases_per_hour = 3600.0 * n / case_phase
    ref_wall = (ref_before["wall_s"] + ref_after["wall_s"]) / 2
    kinds: dict[str, int] = {}
    for record in records:
        kinds[record["generation"]["kind"]] = kinds.get(record["generation"]["kind"], 0) + 1
    draws = sum(1 + record["generation"].get("attempt", 0) for record in records)
    # Each worker's peak resident memory after its first and after its last case (case order is
    # the order the pool hands cases out): bounded workers plateau after the first cases.
    by_worker: dict[int, list[tuple[int, float]]] = {}
    for record in records:
        worker = record.get("worker") or {}
        if worker.get("peak_rss_mb") is not None:
            index = int(record["case_id"].rsplit("_", 1)[-1])
            voxels = int(np.prod(record["edit_grid"]["grid"]["size"]))
            by_worker.setdefault(worker["pid"], []).append((index, worker["peak_rss_mb"], voxels))
    worker_memory = [{"cases": len(rows), "peak_rss_mb_after_first_case": min(rows)[1],
                      "peak_rss_mb_after_last_case": max(rows)[1],
                      "by_case": [{"index": i, "peak_rss_mb": m, "edit_grid_voxels": v} for i, m, v in sorted(rows)]}
                     for rows in by_worker.values()]
    size = sum(p.stat().st_size for p in (out / "Dataset501_BrainTumourSynth").rglob("*.nii.gz"))
    result = {
        "setting": {"workers": int(workers), "precision": precision, "torch_threads_per_worker": threads},
        "cases": n,
        "case_phase_seconds": case_phase,
        "cases_per_hour": round(cases_per_hour, 1),
        "whole_call_seconds": round(total, 1),
        "sources_seconds": summary.get("sources_seconds"),
        "card_seconds": summary.get("card_seconds"),
        "cpu_seconds_per_case": cpu_per_case,
        "stage_seconds_per_case": stages,
        "stage_cpu_share": {k: round(v["cpu_s"] / cpu_per_case, 3) for k, v in stages.items() if "cpu_s" in v},
        "cores_used": round(cpu_per_case * n / case_phase, 2),
        "projected_idle_cases_per_hour": round(3600.0 * cores / cpu_per_case, 1),
        "reference_forward": {"before": ref_before, "after": ref_after, "threads": threads},
        "cases_per_reference_forward": round(cases_per_hour / 3600.0 * ref_wall, 3),
        "load_average_1min_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "bench_process_cpu_seconds": round(time.process_time() - cpu_start, 1),
        "kinds": kinds,
        "draws_per_case": round(draws / n, 2),
        "dataset_mb_per_case": round(size / n / 1e6, 2),
        "worker_memory": worker_memory,
    }
    shutil.rmtree(out, ignore_errors=True)
    return result


def nifti_gzip(reference_source: Any, work: Path) -> dict[str, Any]:
    """Write one synthetic int16 BraTS-grid volume with SimpleITK's levels and with Python's gzip 1 / 6."""
    import gzip
    import hashlib

    import numpy as np
    import SimpleITK as sitk

    from MedSynthLib.generate.layouts import encode_images
    from MedSynthLib.generate.sources import load_source
    from MedSynthLib.schema.grid import Grid
    from MedSynthLib.synthesis.models import resolve_model
    from MedSynthLib.synthesis.synthesize import SynthesisEngine

    # Content for the writers only: "auto" takes bf16 only where the CPU has it natively (emulated, ~28x slower).
    result = SynthesisEngine(resolve_model(None), "cpu", "auto").synthesize(load_source(reference_source))
    t1 = reference_source.to_full(encode_images(result.images)["t1"])
    image = Grid.from_json(reference_source.output_grid).image(np.ascontiguousarray(t1))

    def timed(write: Any, path: Path) -> dict[str, Any]:
        best = None
        for _ in range(3):
            wall, cpu = time.perf_counter(), time.process_time()
            write(path)
            took = (time.perf_counter() - wall, time.process_time() - cpu)
            best = took if best is None or took[0] < best[0] else best
        assert best is not None
        data = path.read_bytes()
        return {"wall_s": round(best[0], 4), "cpu_s": round(best[1], 4), "mb": round(len(data) / 1e6, 3),
                "sha256": hashlib.sha256(data).hexdigest()[:16]}

    out: dict[str, Any] = {"volume": f"T1 int16 {t1.shape[::-1]} (i, j, k)"}
    for level in (None, 1, 9):
        path = work / f"sitk{level}.nii.gz"
        out[f"simpleitk_level_{level or 'default'}"] = timed(
            lambda p, lv=level: sitk.WriteImage(image, str(p), True) if lv is None
            else sitk.WriteImage(image, str(p), True, lv), path)
    raw = work / "raw.nii"
    sitk.WriteImage(image, str(raw), False)
    payload = raw.read_bytes()
    out["uncompressed"] = timed(lambda p: sitk.WriteImage(image, str(p), False), work / "raw2.nii")
    for level in (1, 6):
        out[f"python_gzip_{level}_of_the_nifti_bytes"] = timed(
            lambda p, lv=level: p.write_bytes(gzip.compress(payload, compresslevel=lv, mtime=0)),
            work / f"py{level}.nii.gz")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=16, help="cases per run")
    parser.add_argument("--settings", nargs="+", default=["2:bf16", "1:bf16"], help="workers:precision per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "medsynth-bench-anatomy")
    parser.add_argument("--code", type=Path, default=REPO, help="checkout whose MedSynthLib runs (default: this one)")
    parser.add_argument("--label", default="", help="name of this measurement in the JSON (e.g. before/after)")
    parser.add_argument("--nifti", action="store_true", help="also measure NIfTI gzip levels")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    sys.path.insert(0, str(args.code.resolve()))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(args.code.resolve()), os.environ.get("PYTHONPATH", "")])

    import MedSynthLib
    from MedSynthLib.generate.sources import find_sources, prepare_case, prepare_tumour
    from MedSynthLib.synthesis.models import resolve_model
    from MedSynthLib.synthesis.runtime import avoid_hugepage_stalls

    avoid_hugepage_stalls()  # as the medsynth program does
    cores = os.cpu_count() or 1
    root = data_root()
    sources = [root / "brats2021" / "cases", root / "brats2021" / "seg_only", root / "brats2020_seg"]
    cases, tumours = find_sources(sources)
    start = time.perf_counter()
    prepared = [prepare_case(case, args.cache) for case in cases]
    for tumour in tumours:
        prepare_tumour(tumour, args.cache)
    prepare_seconds = time.perf_counter() - start
    model = resolve_model(None)
    with tempfile.TemporaryDirectory(prefix="medsynth-bench-") as work:
        runs = [run(s, args.n, args.seed, args.cache, Path(work), sources, prepared[0], cores)
                for s in args.settings]
        nifti = nifti_gzip(prepared[0], Path(work)) if args.nifti else None
    report = {
        "benchmark": "medsynth generate throughput (nnU-Net layout, CPU)",
        "label": args.label,
        "code": str(Path(MedSynthLib.__file__).resolve().parent),
        "command": "nice -n 10 python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "model": {"name": model.name, "sha256": model.sha256},
        "sources": {"real_cases": len(cases), "tumour_label_maps": len(tumours), "template": True,
                    "grid": "BraTS 240 x 240 x 155 at 1 mm (template 197 x 233 x 189 at 1 mm)"},
        "source_preparation_seconds_cached": round(prepare_seconds, 1),
        "machine": {"cpus": cores, "platform": platform.platform(), "python": platform.python_version(),
                    "nice": os.nice(0)},
        "runs": runs,
        "nifti_gzip": nifti,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
