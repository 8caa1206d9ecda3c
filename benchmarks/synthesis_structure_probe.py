"""How much of a model's held-out brain SSIM comes from its class intensities and how much from what it draws inside
each class.

``medsynth evaluate`` scores a synthetic image against the real one (both z-scored in the brain, Gaussian SSIM).
This probe splits the model's output ``S`` of each contrast into a flat part, every label class painted with the
model's own mean of that class (``M``), and the rest, what the model draws inside each class (``S - M``: partial
volume, texture, vessels, the outermost layer).  On a cross-validation fold's held-out cases, with the label maps of
``benchmarks/synthesis_cv.py`` (a training cache), it scores:

* ``model``: ``S`` as it is;
* ``flat_model_means``: ``M`` alone. If it scores higher than ``S``, what the model draws inside the classes costs
  SSIM on that case (it is not the real structure);
* ``flat_own_means``: each class painted with the real case's own mean (what hard labels reach without texture);
* ``model_structure_own_means``: the real case's own class means plus the model's ``S - M`` (the model's drawing with
  the class intensities made exact);
* ``own_means_smoothed``: the real case's own class means Gaussian-smoothed (sigma 1 voxel: the partial volume a
  smooth prediction gets for free).

The real image is read only for the oracle rows, never by the model.

    PYTHONPATH=. python benchmarks/synthesis_structure_probe.py --model /work/runs/s26/ft_f2_bi200/model \\
        --config Resources/configs/spade_brats27_cpu64_cv.json --fold 2 \\
        --data ../shared/data/brats2021/cases ../shared/data/brats_more/cases --cache /work/runs/cache_spade \\
        --json docs/synthesis_cv/structure_probe_f2.json
    python benchmarks/synthesis_structure_probe.py --pool docs/synthesis_cv/structure_probe_f*.json \\
        --json docs/synthesis_cv/structure_probe_pooled.json   # every fold's cases together
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from synthesis_cv import _cached_labels  # noqa: E402
from synthesis_smoothing_probe import brain_ssim  # noqa: E402

from MedSynthLib.cases.readers import MODALITIES, read_case  # noqa: E402
from MedSynthLib.evaluation.evaluate import real_brain_mask  # noqa: E402
from MedSynthLib.evaluation.metrics import class_mean_baseline  # noqa: E402
from MedSynthLib.schema.grid import LabelMap  # noqa: E402
from MedSynthLib.schema.volume_io import write_json  # noqa: E402
from MedSynthLib.synthesis.models import resolve_model  # noqa: E402
from MedSynthLib.synthesis.normalize import zscore  # noqa: E402
from MedSynthLib.synthesis.synthesize import SynthesisEngine  # noqa: E402
from MedSynthLib.training.data import find_case_folders  # noqa: E402

SMOOTHING_SIGMA = 1.0
ROWS = ("model", "flat_model_means", "flat_own_means", "model_structure_own_means", "own_means_smoothed")


def class_means(z: np.ndarray, labels: np.ndarray, brain: np.ndarray) -> dict[int, float]:
    return {int(v): float(z[(labels == v) & brain].mean()) for v in np.unique(labels[brain])}


def probe_contrast(real: np.ndarray, synthetic: np.ndarray, labels: np.ndarray, brain: np.ndarray) -> dict[str, object]:
    """The rows of the module docstring for one contrast of one case, and the model's class means minus the real."""
    from scipy import ndimage

    real_z, synthetic_z = zscore(real.astype(np.float32), brain), zscore(synthetic.astype(np.float32), brain)
    own, model = class_means(real_z, labels, brain), class_means(synthetic_z, labels, brain)
    flat_own = class_mean_baseline(labels, real_z, brain, own)
    flat_model = class_mean_baseline(labels, synthetic_z, brain, model)
    drawn = np.where(brain, synthetic_z - flat_model, 0.0).astype(np.float32)
    return {"model": brain_ssim(real_z, synthetic_z, brain),
            "flat_model_means": brain_ssim(real_z, flat_model, brain),
            "flat_own_means": brain_ssim(real_z, flat_own, brain),
            "model_structure_own_means": brain_ssim(real_z, flat_own + drawn, brain),
            "own_means_smoothed": brain_ssim(real_z, ndimage.gaussian_filter(flat_own, SMOOTHING_SIGMA), brain),
            "model_mean_minus_own": {str(v): model[v] - own[v] for v in own}}


def summarise(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Each row's mean over cases, per contrast and over the four contrasts."""
    return {k: {"mean": float(np.mean([np.mean([r[m][k] for m in MODALITIES]) for r in rows])),
                **{m: float(np.mean([r[m][k] for r in rows])) for m in MODALITIES}} for k in ROWS}


def pool(reports: list[dict]) -> dict:
    """The rows of several folds' reports over all their cases: means per contrast and over the four, and on how
    many cases (contrast by contrast) the flat painting with the model's own class means beat the model."""
    rows = [row for report in reports for row in report["per_case"]]
    summary = summarise(rows)
    flat_wins = {m: int(sum(r[m]["flat_model_means"] > r[m]["model"] for r in rows)) for m in MODALITIES}
    return {"folds": [report["fold"] for report in reports], "models": [report["model"] for report in reports],
            "cases": len(rows), "summary": summary, "flat_model_means_beats_model": flat_wins}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", nargs="+", type=Path, help="pool the JSON reports of earlier runs and stop")
    parser.add_argument("--model")
    parser.add_argument("--config", type=Path, help="training config holding cv_folds")
    parser.add_argument("--fold", type=int)
    parser.add_argument("--max-cases", type=int, default=None)
    parser.add_argument("--data", nargs="+", type=Path)
    parser.add_argument("--cache", type=Path, help="training cache (the label maps)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.pool:
        pooled = pool([json.loads(path.read_text()) for path in args.pool])
        print(json.dumps(pooled, indent=1))
        if args.json:
            write_json(pooled, args.json, overwrite=True)
        return 0
    if None in (args.model, args.config, args.fold, args.data, args.cache):
        parser.error("--model, --config, --fold, --data and --cache are required without --pool")
    import torch

    torch.set_num_threads(args.threads)

    held = json.loads(args.config.read_text())["cv_folds"][args.fold][: args.max_cases]
    folders = {f.name: f for root in args.data for f in find_case_folders(root)}
    engine = SynthesisEngine(resolve_model(args.model), "cpu", "fp32")
    rows = []
    for name in held:
        case = read_case(folders[name], require_segmentation=True)
        labels = _cached_labels(case, folders[name], args.cache, "tissue_zscore")
        images = engine.synthesize(LabelMap(labels, case.grid)).images
        brain = real_brain_mask(case.images)
        row = {"case": name, **{m: probe_contrast(case.images[m], images[m], labels, brain) for m in MODALITIES}}
        rows.append(row)
        print(name, {k: round(float(np.mean([row[m][k] for m in MODALITIES])), 3) for k in ROWS}, flush=True)
    summary = summarise(rows)
    report = {"command": " ".join(sys.argv), "model": {"name": engine.model.name, "sha256": engine.model.sha256},
              "fold": args.fold, "cases": held, "summary": summary, "per_case": rows}
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(report, args.json, overwrite=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
