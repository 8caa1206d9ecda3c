"""Is the within-class intensity field a patient's own, or anatomy that patients share at the same position?

``benchmarks/label_information_probe.py`` shows that knowing each tissue's brightness at 8 voxels
(``class_local_means_8``) lifts the brain SSIM from the case's class means (0.313 on fold 0) to 0.496.  A
generator could learn only the part of that field that is the same in every patient at the same place.  The
BraTS cases are all resampled to one atlas space (240 x 240 x 155, 1 mm), so a voxel index is an anatomical
position.  Leave-one-out over the 9 held-out cases of fold 0 of the inpainting CV folds: for each healthy
class (CSF, GM, WM) and contrast, the other 8 patients' ``class_local_means_8 - case_class_means`` residual,
averaged where they have that class at that voxel, is added to the held-out case's own class means, and the
brain SSIM (as ``medsynth evaluate``) is compared with the class means alone.

    PYTHONPATH=. python benchmarks/label_position_prior_probe.py --data ../shared/data --cache CACHE \\
        docs/synthesis_cv/label_position_prior_f0.json

(``MEDSYNTH_DATA`` and ``MEDSYNTH_PROBE_CACHE`` give the defaults of ``--data`` and ``--cache``.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import label_information_probe as p  # noqa: E402
from MedSynthLib.cases.readers import read_case  # noqa: E402
from MedSynthLib.schema.grid import mask_box  # noqa: E402
from MedSynthLib.schema.labels import MODALITIES, brain_mask, tumour_mask  # noqa: E402
from MedSynthLib.training.data import find_case_folders, prepare_volume  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("MEDSYNTH_DATA", REPO.parent / "shared" / "data"))
DEFAULT_CACHE = Path(os.environ.get("MEDSYNTH_PROBE_CACHE", "cache_label_probe"))
HEALTHY = (1, 2, 3)  # CSF, GM, WM


def load_case(folder: Path, cache: Path) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
    """The cached label map and images put back on the case's own (atlas-space) grid; None if it cannot be."""
    volume = prepare_volume(folder, cache, "tissue_zscore")
    case = read_case(folder, require_segmentation=True)
    shape = case.images["t1"].shape
    # the cache keeps the brain box of the derived labels, not its place: found again from the images
    box = mask_box(np.any([case.images[m] > 0 for m in MODALITIES], axis=0), margin=4)
    if tuple(s.stop - s.start for s in box) != volume.labels.shape:
        print(folder.name, "box mismatch", [s.stop - s.start for s in box], volume.labels.shape, flush=True)
        return None
    labels = np.zeros(shape, np.uint8)
    labels[box] = volume.labels
    real = {m: np.zeros(shape, np.float32) for m in MODALITIES}
    for m, image in p.scanner_like(volume).items():
        real[m][box] = image
    return labels, real


def shared_field(labels: np.ndarray, others: list[tuple[np.ndarray, dict[str, np.ndarray]]], m: str) -> np.ndarray:
    """The other patients' mean residual of each healthy class at each voxel where this case has that class."""
    prior = np.zeros(labels.shape, np.float32)
    for c in HEALTHY:
        num = np.zeros(labels.shape, np.float32)
        den = np.zeros(labels.shape, np.float32)
        for other_labels, residual in others:
            where = other_labels == c
            num += np.where(where, residual[m], 0)
            den += where
        mine = labels == c
        prior[mine] = np.where(den[mine] > 0, num[mine] / np.maximum(den[mine], 1), 0)
    return prior


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json", type=Path, nargs="?", help="write the per-case scores here")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder (brats2021/cases, "
                        "brats_more/cases)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="training cache of derived label maps")
    args = parser.parse_args()
    held = json.loads((REPO / "Resources/configs/inpaint_brats27_cpu_cv.json").read_text())["cv_folds"][0]
    folders = {f.name: f for r in [args.data / "brats2021/cases", args.data / "brats_more/cases"]
               for f in find_case_folders(r)}
    cases = {}
    for name in held:
        loaded = load_case(folders[name], args.cache)
        if loaded is None:
            continue
        labels, real = loaded
        means = {m: p.case_class_means(labels, real[m]) for m in MODALITIES}
        residual = {m: np.where(labels > 0, p.class_local_means(labels, real[m], 8.0) - means[m], 0).astype(np.float32)
                    for m in MODALITIES}
        cases[name] = (labels, real, means, residual)
        print(name, labels.shape, "ok", flush=True)
    rows = []
    for name, (labels, real, means, _) in cases.items():
        others = [(o[0], o[3]) for n, o in cases.items() if n != name]
        brain, tumour = brain_mask(labels), tumour_mask(labels)
        row: dict = {"case": name, "ccm": [], "ccm+prior": []}
        for m in MODALITIES:
            for method, guess in (("ccm", means[m]), ("ccm+prior", means[m] + shared_field(labels, others, m))):
                row[method].append(p.fidelity(real[m], guess, brain, {"tumour": tumour})["brain"]["ssim"])
        rows.append(row)
        print(name, "ccm", round(np.mean(row["ccm"]), 3), "ccm+prior", round(np.mean(row["ccm+prior"]), 3), flush=True)
    print("mean ccm", np.mean([np.mean(r["ccm"]) for r in rows]),
          "ccm+prior", np.mean([np.mean(r["ccm+prior"]) for r in rows]))
    if args.json is not None:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "per_case": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
