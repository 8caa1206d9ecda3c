"""Memory and time of a new parametric tumour on a real BraTS grid, by oedema margin.

Each margin runs in a fresh process and reports the process's peak resident memory and the
edit's wall time.  The canvas is a real BraTS 2021 case (240 x 240 x 155, 1 mm): its brain (any
modality non-zero) as white matter, its expert tumour labels on top; the tumour (radius 10 mm) is
placed at the white-matter voxel nearest the brain's centre.  A margin longer than the grid's
diagonal (373 mm) is refused before anything is allocated.

Usage::

    .venv/bin/python benchmarks/bench_edit_memory.py [--case DIR] [--margins 10 50 150 1e9]

Measured on 2026-12-01 (2 shared cores, load ~12; BraTS2021_00000): margin 10 mm: 0.7-1.0 s, peak
465 MB (the same as before the edit); 150 mm: 5-16 s (load), peak 864 MB; 1e9 mm: refused at once.  Before the box was clipped to the
brain, 150 mm asked for a 399^3 box (a 1.42 GiB array among several) and failed under an 8 GB limit.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_CHILD = r"""
import resource, sys, time
import numpy as np
from MedSynthLib.cases.readers import read_case
from MedSynthLib.edits import ParametricTumour
from MedSynthLib.schema.errors import EditError
from MedSynthLib.schema.grid import LabelMap, lps_to_ras
from MedSynthLib.schema.labels import Label, brain_mask

case = read_case(sys.argv[1])
labels = np.where(case.brain_mask(), Label.WM, Label.BACKGROUND).astype(np.uint8)
labels[case.tumour > 0] = case.tumour[case.tumour > 0]
canvas = LabelMap(labels, case.grid)
wm = np.argwhere(labels == Label.WM)
kji = wm[np.argmin(np.abs(wm - wm.mean(axis=0)).sum(axis=1))]
centre = tuple(float(v) for v in lps_to_ras(case.grid.index_to_lps(kji[::-1].astype(float))))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
try:
    out = ParametricTumour(centre_ras_mm=centre, radii_mm=(10, 10, 10), oedema_mm=float(sys.argv[2]), seed=1)(canvas)
    result = f"ED voxels {int((out.array == Label.ED).sum())}"
except EditError as exc:
    result = f"refused: {exc}"
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{float(sys.argv[2]):>10g} mm  {seconds:6.1f} s  peak {peak:6.0f} MB (before the edit {before:.0f} MB)  {result}")
"""


def main() -> int:
    data = Path(os.environ.get("MEDSYNTH_DATA", REPO.parent / "shared" / "data"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", type=Path, default=data / "brats2021" / "cases" / "BraTS2021_00000")
    parser.add_argument("--margins", type=float, nargs="+", default=[10.0, 50.0, 150.0, 1e9])
    args = parser.parse_args()
    if not args.case.is_dir():
        print(f"no case at {args.case} (set MEDSYNTH_DATA or --case)", file=sys.stderr)
        return 2
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for margin in args.margins:
        subprocess.run([sys.executable, "-c", _CHILD, str(args.case), str(margin)], env=env, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
