"""Time of each tumour edit on a real BraTS grid, against MedSynth's target of 1 s per edit.

The canvas is a real BraTS 2021 case (240 x 240 x 155, 1 mm): its brain (T1 non-zero) as white
matter and its expert tumour labels on top, the same canvas the edit tests check for correctness
(Testing/test_edits.py, ``test_real_case_edits_keep_the_brain``).  Each edit runs ``--repeats``
times and the minimum is kept, since the machine may be shared; the wall-clock target lives here
and not in the tests, where load on a shared CI machine made it fail.

Usage::

    python benchmarks/bench_edits.py [--case DIR] [--repeats 3] [--target 1.0]

Exit status 1 when an edit's best time is over the target.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def canvas(case: Path):
    """The label map the edits work on: brain as WM, the case's tumour labels on top."""
    import numpy as np
    import SimpleITK as sitk

    from MedSynthLib.schema.grid import Grid, LabelMap
    from MedSynthLib.schema.labels import Label, tumour_to_schema

    t1 = sitk.ReadImage(str(next(case.glob("*_t1.nii.gz"))))
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(next(case.glob("*_seg.nii.gz")))))
    tumour = tumour_to_schema(seg, "brats2021")
    labels = np.where(sitk.GetArrayFromImage(t1) > 0, Label.WM, 0).astype(np.uint8)
    labels[tumour > 0] = tumour[tumour > 0]
    return LabelMap(labels, Grid.from_image(t1))


def main() -> int:
    data = Path(os.environ.get("MEDSYNTH_DATA", REPO.parent / "shared" / "data"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", type=Path, default=data / "brats2021" / "cases" / "BraTS2021_00000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--target", type=float, default=1.0, help="seconds per edit")
    args = parser.parse_args()
    if not args.case.is_dir():
        print(f"no case at {args.case} (set MEDSYNTH_DATA or --case)", file=sys.stderr)
        return 2

    from MedSynthLib.edits import Flip, InsertTumour, ParametricTumour, Rotate, Scale, Translate, tumour_centre
    from MedSynthLib.schema.errors import EditError
    from MedSynthLib.schema.grid import lps_to_ras

    lm = canvas(args.case)
    source = Flip("LR", "brain")(lm)
    centre = lps_to_ras(tumour_centre(lm))
    edits = [Translate((10.0, 0.0, 0.0)), Rotate((0.0, 0.0, 20.0)), Scale((0.9, 0.9, 0.9)),
             Flip("LR", "brain"), InsertTumour(source="flipped"),
             ParametricTumour(tuple(centre), (15.0, 12.0, 12.0)), Scale((1.2, 1.2, 1.2))]
    slow = 0
    print(f"{args.case.name} {lm.array.shape[::-1]}, best of {args.repeats}, target {args.target:g} s")
    for edit in edits:
        best = float("inf")
        outcome = "done"
        for _ in range(args.repeats):
            start = time.perf_counter()
            try:
                edit(lm, source) if isinstance(edit, InsertTumour) else edit(lm)
            except EditError:
                outcome = "refused"
            best = min(best, time.perf_counter() - start)
        over = best > args.target
        slow += over
        print(f"{edit.name:>12} ({outcome}): {best:.3f} s{'  OVER TARGET' if over else ''}")
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
