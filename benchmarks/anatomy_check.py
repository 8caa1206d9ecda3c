"""Judge anatomy models by anatomy: plausibility on every real case, FreeSurfer agreement.

Runs each named anatomy model on every complete case under the shared data
folder (``brats2021/cases`` and ``brats_more/cases``) and on the healthy T1 with
its FreeSurfer ``aseg``, and prints one Markdown report: per case the healthy
tissue fractions, the octant check, the contrast order and the time, for every
model side by side.  The criteria are :mod:`MedSynthLib.cases.anatomy_check`.

Usage (from the repository root; single-threaded, as on a loaded 2-core machine)::

    ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 OMP_NUM_THREADS=1 \\
        python benchmarks/anatomy_check.py --models kmeans-t1 atlas-em -o docs/anatomy_check.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from MedSynthLib.cases.anatomy import ANATOMY_MODELS, derive_label_map, segment_anatomy  # noqa: E402
from MedSynthLib.cases.anatomy_check import freesurfer_dice, intensity_order, regional_plausibility  # noqa: E402
from MedSynthLib.cases.readers import read_case  # noqa: E402
from MedSynthLib.schema.grid import Grid  # noqa: E402


def data_root() -> Path:
    return Path(os.environ.get("MEDSYNTH_DATA", REPO.parent / "shared" / "data"))


def case_folders(root: Path) -> list[Path]:
    folders = [p for sub in ("brats2021/cases", "brats_more/cases") for p in sorted((root / sub).glob("*"))
               if p.is_dir()]
    return folders


def healthy_dice(root: Path, model) -> tuple[dict[str, float], float]:
    """Dice against FreeSurfer on the healthy T1 (T1 only: the case has no other contrast)."""
    from scipy import ndimage

    folder = root / "healthy_t1"
    image = sitk.ReadImage(str(folder / "vxm_test_t1.nii.gz"))
    t1 = sitk.GetArrayFromImage(image).astype(np.float32)
    aseg = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "vxm_test_aseg.nii.gz")))
    brain = ndimage.binary_fill_holes(t1 > 0)
    start = time.perf_counter()
    labels = segment_anatomy(model, {"t1": t1}, brain, np.zeros_like(brain), Grid.from_image(image))
    return freesurfer_dice(labels, aseg), time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(ANATOMY_MODELS), choices=list(ANATOMY_MODELS))
    parser.add_argument("--cases", nargs="*", help="case folder names to run (default: all)")
    parser.add_argument("-o", "--output", type=Path, help="also write the report here")
    parser.add_argument("--cache", type=Path,
                        help="JSON-lines file of per-case results: cases found there are not run again (lets "
                             "several processes share the cases, then one run writes the report)")
    parser.add_argument("--no-report", action="store_true", help="only fill the cache")
    parser.add_argument("--note", action="append", default=[], help="a paragraph added to the report")
    args = parser.parse_args(argv)
    root = data_root()
    folders = case_folders(root)
    if args.cases:
        folders = [f for f in folders if f.name in args.cases]
    models = {name: ANATOMY_MODELS[name] for name in args.models}

    cached: dict[tuple[str, str], dict] = {}
    if args.cache is not None and args.cache.exists():
        for line in args.cache.read_text().splitlines():
            entry = json.loads(line)
            cached[(entry["case"], entry["model"])] = entry
    rows, passed, times = [], {m: 0 for m in models}, {m: [] for m in models}
    for folder in folders:
        case = None
        for name, model in models.items():
            if (folder.name, name) in cached:
                entry = cached[(folder.name, name)]
                rows.append(entry["row"])
                passed[name] += entry["passed"]
                times[name].append(entry["cpu"])
                continue
            if case is None:
                case = read_case(folder, require_segmentation=True)
            start, cpu_start = time.perf_counter(), time.process_time()
            labels = derive_label_map(case, model).array
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            times[name].append(cpu)
            plausible = regional_plausibility(labels)
            order = intensity_order(labels, case.images)
            ok = plausible.passed and not order
            passed[name] += ok
            checked = [o for o in plausible.octants if o["checked"]]
            gm = [o["GM"] for o in checked]
            wm = [o["WM"] for o in checked]
            problems = "; ".join(plausible.failures + order) or "—"
            rows.append(f"| {folder.name} | {name} | {plausible.overall['CSF']:.1%} | {plausible.overall['GM']:.1%} | "
                        f"{plausible.overall['WM']:.1%} | {len(checked)}: GM {min(gm):.0%}–{max(gm):.0%}, "
                        f"WM ≥ {min(wm):.0%} | {'yes' if not order else 'no'} | {cpu:.1f} s ({seconds:.1f} s) | "
                        f"{'**pass**' if ok else 'FAIL'} | {problems} |")
            print(rows[-1], file=sys.stderr, flush=True)
            if args.cache is not None:
                with open(args.cache, "a") as handle:
                    handle.write(json.dumps({"case": folder.name, "model": name, "row": rows[-1], "passed": bool(ok),
                                             "cpu": cpu}) + "\n")
    if args.no_report:
        return 0

    lines = ["# Anatomy check: is the tissue map anatomy?", "",
             "Produced by `benchmarks/anatomy_check.py` (criteria: `MedSynthLib/cases/anatomy_check.py`):", "",
             "```bash",
             "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 OMP_NUM_THREADS=1 \\",
             f"    python benchmarks/anatomy_check.py --models {' '.join(args.models)} -o docs/anatomy_check.md",
             "```", "",
             f"Data: the {len(folders)} complete real BraTS cases of the shared data folder "
             "(`brats2021/cases`, `brats_more/cases`) and the healthy T1 with FreeSurfer `aseg` (`healthy_t1`). "
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, one thread.", "",
             "Pass = healthy-tissue fractions CSF 3–30 %, GM 30–60 %, WM 25–55 %; in every octant (halves about the "
             "brain's centre of mass) holding ≥ 5 % of the healthy tissue and < 30 % tumour GM 20–70 % and "
             "WM ≥ 15 %; mean T1 CSF < GM < WM and CSF brightest on T2 (raw intensities). Time = CPU seconds "
             "of the anatomy step of `derive_label_map` (reading the case excluded; single-threaded, so on an "
             "idle machine the wall time is the same), wall seconds on the shared, loaded machine in brackets.",
             "", *[line for note in args.note for line in (note, "")],
             "## Summary", "",
             "| model | cases passing | CPU time per case (median, max) | FreeSurfer Dice CSF / GM / WM (healthy T1, T1 only) |",
             "|---|---|---|---|"]
    for name, model in models.items():
        dice, seconds = healthy_dice(root, model)
        lines.append(f"| {name} | {passed[name]} / {len(folders)} | {np.median(times[name]):.1f} s, "
                     f"{max(times[name]):.1f} s | {dice['CSF']:.2f} / {dice['GM']:.2f} / {dice['WM']:.2f} "
                     f"({seconds:.1f} s) |")
    lines += ["", "## Per case", "",
              "| case | model | CSF | GM | WM | octants checked: GM range, WM min | contrast order | CPU (wall) | result | problems |",
              "|---|---|---|---|---|---|---|---|---|---|", *rows, ""]
    report = "\n".join(lines)
    print(report)
    if args.output:
        args.output.write_text(report)
    return 0 if all(passed[m] == len(folders) for m in models) else 1


if __name__ == "__main__":
    raise SystemExit(main())
