"""How much SSIM a label map can carry: oracles that know the real image only down to a given scale per class.

``medsynth evaluate`` scores a synthetic image against the real one (both z-scored in the brain, Gaussian SSIM
with sigma 1.5 voxels).  A generator sees the label map only.  This probe scores, on real cases with the label
maps ``medsynth train`` derives (a training cache), predictions that are *better informed than any generator*:

* ``case_class_means``: each class painted with the case's own mean of that class (the model card's "class
  means of the case itself");
* ``class_local_means_<s>``: each voxel given the mean of the real image over the voxels *of its own class*
  within a Gaussian neighbourhood of sigma ``s`` voxels (normalised convolution per class).  This oracle
  knows the patient's bias field, each region's own brightness of each tissue and every within-class
  variation coarser than ``s``, exactly; it knows nothing finer.  A generator conditioned on the labels
  could at best learn such variation, it cannot know it;
* ``bias_times_class_means``: the case's N4 bias field (estimated on the healthy brain at 6 mm, as the anatomy
  model does) times each class's mean of the bias-corrected image: what the scanner's smooth intensity
  non-uniformity alone adds to the case's class means.  No label map carries it;
* ``real_smoothed_1.5``: the real image Gaussian-smoothed inside the brain (normalised convolution, so the
  zero background does not bleed in): the ceiling of a prediction with all the real structure and none of
  the noise.

Scores: brain SSIM and PSNR (as ``medsynth evaluate``), and SSIM in the inpainting region (the real tumour grown by
8 mm, inside the brain) and the tumour, mean of the four contrasts.  No model is involved; the numbers say
how much of the target lies in structure finer than ``s`` that the labels do not carry.

    PYTHONPATH=. python benchmarks/label_information_probe.py --cache CACHE \\
        --data ../shared/data/brats2021/cases ../shared/data/brats_more/cases --fold 0 \\
        --json docs/synthesis_cv/label_information_f0.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from inpainting_eval import masked_gaussian_mean, real_tumour_region  # noqa: E402
from MedSynthLib.evaluation.metrics import fidelity  # noqa: E402
from MedSynthLib.schema.labels import MODALITIES  # noqa: E402
from MedSynthLib.schema.volume_io import write_json  # noqa: E402
from MedSynthLib.cases.atlas_anatomy import AtlasPriorEM, _n4  # noqa: E402
from MedSynthLib.schema.grid import Grid  # noqa: E402
from MedSynthLib.synthesis.inpainting import _ball_growth  # noqa: E402
from MedSynthLib.training.data import find_case_folders  # noqa: E402

LOCAL_SIGMAS = (8.0, 4.0, 2.0)
REGION_MARGIN_MM = 8.0


def case_class_means(labels: np.ndarray, real: np.ndarray) -> np.ndarray:
    """Each class painted with the mean of the real image over that class."""
    out = np.zeros_like(real)
    for c in np.unique(labels[labels > 0]):
        out[labels == c] = real[labels == c].mean()
    return out


def class_local_means(labels: np.ndarray, real: np.ndarray, sigma: float) -> np.ndarray:
    """Each voxel: the Gaussian-weighted mean of the real image over the voxels of its own class."""
    out = np.zeros_like(real)
    for c in np.unique(labels[labels > 0]):
        inside = labels == c
        out[inside] = masked_gaussian_mean(real, inside, sigma)[0][inside]
    return out


def bias_times_class_means(labels: np.ndarray, real: np.ndarray, healthy: np.ndarray) -> np.ndarray:
    """The case's N4 bias field times each class's mean of the bias-corrected image."""
    model = AtlasPriorEM()
    grid = Grid(tuple(int(v) for v in real.shape[::-1]), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0),  # type: ignore[arg-type]
                (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    corrected = _n4(np.maximum(real, 0.0), healthy, grid, model.n4_spacing_mm, model.n4_levels, model.n4_iterations)
    field = np.where(corrected > 0, real / np.maximum(corrected, 1e-6), 1.0)
    return case_class_means(labels, corrected) * field


def smoothed_in_brain(real: np.ndarray, brain: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing restricted to the brain (normalised convolution)."""
    return np.where(brain, masked_gaussian_mean(real, brain, sigma)[0], 0.0).astype(np.float32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=Path("Resources/configs/inpaint_brats27_cpu_cv.json"),
                        help="a config whose cv_folds name the cases (default: the inpainting CV folds)")
    parser.add_argument("--fold", type=int, nargs="+", default=[0])
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    folds = json.loads(args.config.read_text())["cv_folds"]
    names = [name for k in args.fold for name in folds[k]]
    folders = {f.name: f for root in args.data for f in find_case_folders(root)}
    methods = ["case_class_means", "bias_times_class_means", *(f"class_local_means_{s:g}" for s in LOCAL_SIGMAS),
               "real_smoothed_1.5"]
    rows = []
    for name in names:
        start = time.perf_counter()
        labels, real, brain, tumour, region = real_tumour_region(folders[name], args.cache, REGION_MARGIN_MM)
        row: dict = {"case": name}
        for method in methods:
            scores = []
            for m in MODALITIES:
                if method == "case_class_means":
                    guess = case_class_means(labels, real[m])
                elif method == "bias_times_class_means":
                    guess = bias_times_class_means(labels, real[m], brain & ~_ball_growth(tumour, 3.0, (1.0, 1.0, 1.0)))
                elif method.startswith("class_local_means_"):
                    guess = class_local_means(labels, real[m], float(method.rsplit("_", 1)[1]))
                else:
                    guess = smoothed_in_brain(real[m], brain, 1.5)
                scores.append(fidelity(real[m], guess, brain, {"region": region, "tumour": tumour}))
            row[method] = {part: float(np.mean([s[part]["ssim"] for s in scores]))
                           for part in ("brain", "region", "tumour")}
            row[method]["brain_psnr"] = float(np.mean([s["brain"]["psnr"] for s in scores]))
            row[method]["per_modality_brain"] = {m: s["brain"]["ssim"] for m, s in zip(MODALITIES, scores)}
        rows.append(row)
        print(f"{name} ({time.perf_counter() - start:.0f} s): "
              + "  ".join(f"{k} {row[k]['brain']:.3f}/{row[k]['region']:.3f}" for k in methods), flush=True)
    summary = {method: {part: float(np.mean([r[method][part] for r in rows]))
                        for part in ("brain", "region", "tumour", "brain_psnr")}
               for method in methods}
    report = {"command": " ".join(sys.argv), "cases": names, "summary": summary, "per_case": rows}
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(report, args.json, overwrite=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
