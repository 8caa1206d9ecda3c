"""Throughput of ``medsynth generate``: cases per hour and the share of each stage.

Runs the generator with the shipped model on the real data (1 mm BraTS grid: the BraTS 2021
cases, their tumour-only label maps, the BraTS 2020 label maps and the template), once per
setting given, each into a fresh output folder, with the anatomy cache shared and filled
beforehand (deriving anatomy is a one-off per source, reported separately).  A setting is
``workers:precision`` (e.g. ``2:bf16``).  Per run it records the wall time of the
case phase (worker start and model load included), cases per hour, and the summed per-case
stage times from the provenance files: edit (drawing and editing the label map, tumour
statistics, privacy Dice), network (the synthesis engine, scanner units included) and write
(encoding, gzip, renames).  The machine's load average is recorded before and after: on a
shared machine the numbers are a lower bound.

Usage::

    nice -n 10 .venv/bin/python benchmarks/bench_generate.py --n 16 --settings 1:bf16 2:bf16 2:fp32 \\
        --json docs/benchmarks/generate_cpu_2core.json
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def data_root() -> Path:
    return Path(os.environ.get("MEDSYNTH_DATA", REPO.parent / "shared" / "data"))


def run(setting: str, n: int, seed: int, cache: Path, work: Path, sources: list[Path], model: str | None) -> dict:
    from MedSynthLib.generate.runner import GenerateOptions, generate

    workers, precision = setting.split(":")
    out = work / f"run-{setting.replace(':', '-')}"
    shutil.rmtree(out, ignore_errors=True)
    load_before = os.getloadavg()
    start = time.perf_counter()
    summary = generate(GenerateOptions(n=n, output=out, labels_from=sources, template=True, model=model,
                                       layout="nnunet", workers=int(workers), seed=seed, device="cpu",
                                       precision=precision, cache=cache,
                                       progress=False))
    total = time.perf_counter() - start
    stages = {"edit": 0.0, "network": 0.0, "write": 0.0}
    cpu = dict(stages)
    kinds: dict[str, int] = {}
    for path in sorted((out / "provenance").glob("*.json")):
        record = json.loads(path.read_text())
        for stage in stages:
            stages[stage] += record["timings_s"][stage]
            cpu[stage] += record["cpu_s"][stage]
        kinds[record["generation"]["kind"]] = kinds.get(record["generation"]["kind"], 0) + 1
    staged = sum(stages.values())
    size = sum(p.stat().st_size for p in (out / "Dataset501_BrainTumourSynth").rglob("*.nii.gz"))
    result = {
        "setting": {"workers": int(workers), "precision": precision},
        "cases": n,
        "case_phase_seconds": summary["seconds"],
        "cases_per_hour": round(3600.0 * n / summary["seconds"], 1),
        "whole_command_seconds": round(total, 1),
        "stage_seconds_per_case": {k: round(v / n, 3) for k, v in stages.items()},
        "stage_share": {k: round(v / staged, 3) for k, v in stages.items()},
        "stage_cpu_seconds_per_case": {k: round(v / n, 3) for k, v in cpu.items()},
        "stage_cpu_share": {k: round(v / sum(cpu.values()), 3) for k, v in cpu.items()},
        # What the CPU seconds allow when every core runs one single-threaded worker and nothing else
        # runs: a projection from CPU time, not a measurement (the wall-clock figure above is that).
        "projected_idle_cases_per_hour": round(3600.0 * (os.cpu_count() or 1) / (sum(cpu.values()) / n), 1),
        "kinds": kinds,
        "dataset_mb_per_case": round(size / n / 1e6, 2),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=16, help="cases per run")
    parser.add_argument("--settings", nargs="+", default=["1:bf16", "2:bf16"], help="workers:precision per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="model (default: the shipped model)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "medsynth-bench-anatomy")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    from MedSynthLib.generate.sources import find_sources, prepare_case, prepare_tumour
    from MedSynthLib.synthesis.models import resolve_model
    from MedSynthLib.synthesis.runtime import avoid_hugepage_stalls

    avoid_hugepage_stalls()  # as the medsynth program does

    root = data_root()
    sources = [root / "brats2021" / "cases", root / "brats2021" / "seg_only", root / "brats2020_seg"]
    cases, tumours = find_sources(sources)
    start = time.perf_counter()
    for case in cases:
        prepare_case(case, args.cache)
    for tumour in tumours:
        prepare_tumour(tumour, args.cache)
    prepare_seconds = time.perf_counter() - start
    model = resolve_model(args.model)
    with tempfile.TemporaryDirectory(prefix="medsynth-bench-") as work:
        runs = [run(s, args.n, args.seed, args.cache, Path(work), sources, args.model) for s in args.settings]
    report = {
        "benchmark": "medsynth generate throughput (nnU-Net layout, CPU)",
        "model": {"name": model.name, "sha256": model.sha256},
        "sources": {"real_cases": len(cases), "tumour_label_maps": len(tumours), "template": True,
                    "grid": "BraTS 240 x 240 x 155 at 1 mm (template 197 x 233 x 189 at 1 mm)"},
        "source_preparation_seconds": round(prepare_seconds, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "nice": os.nice(0)},
        "runs": runs,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
