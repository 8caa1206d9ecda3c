"""Held-out fidelity of the synthesis mirror average: one forward pass against the pass averaged with its mirror.

For each cross-validation fold, the fold's model synthesises every held-out case from the same label map as
``benchmarks/synthesis_cv.py`` (the training cache's), with seed 0, twice: with one forward pass
(``--no-mirror-average``) and with the network's output averaged with its pass on the left-right mirrored label
map (the default).  Both are scored as ``medsynth evaluate`` scores (z-scored in the brain, Gaussian SSIM, PSNR
peak 8; brain and tumour), with the contrast rules and the checkerboard ratio, and compared case by case over all
folds (mean difference, cases better / worse, exact sign-flip p).

Usage (from the repository root; one model per fold, in fold order)::

    python benchmarks/mirror_average_ab.py --config Resources/configs/spade_brats27_cpu64_cv.json \\
        --folds 0 1 2 --models F0/model F1/model F2/model \\
        --data ../shared/data/brats2021/cases ../shared/data/brats_more/cases --cache CACHE --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from synthesis_cv import _cached_labels  # noqa: E402
from synthesis_cv_pooled import fidelity_summary  # noqa: E402

from MedSynthLib.cases.readers import MODALITIES, read_case  # noqa: E402
from MedSynthLib.evaluation.evaluate import real_brain_mask  # noqa: E402
from MedSynthLib.evaluation.image_checks import check_contrast_rules, checkerboard_ratio_to, nyquist_power  # noqa: E402
from MedSynthLib.evaluation.metrics import fidelity  # noqa: E402
from MedSynthLib.schema.grid import LabelMap  # noqa: E402
from MedSynthLib.schema.labels import tumour_mask  # noqa: E402
from MedSynthLib.schema.volume_io import write_json  # noqa: E402
from MedSynthLib.study.statistics import paired_comparison  # noqa: E402
from MedSynthLib.synthesis.models import resolve_model  # noqa: E402
from MedSynthLib.synthesis.synthesize import SynthesisEngine  # noqa: E402
from MedSynthLib.training.data import find_case_folders  # noqa: E402

ARMS = ("one_pass", "mirror_average")


def score_case(case: Any, labels: np.ndarray, engines: dict[str, SynthesisEngine]) -> dict[str, Any]:
    """Both arms on one case: per-modality fidelity, the contrast rules passed / checked, checkerboard ratios."""
    brain = real_brain_mask(case.images)
    regions = {"tumour": tumour_mask(labels)}
    real_power = {m: nyquist_power(case.images[m], brain) for m in MODALITIES}
    out: dict[str, Any] = {}
    for arm, engine in engines.items():
        images = engine.synthesize(LabelMap(labels, case.grid), seed=0).images
        scores = {m: fidelity(case.images[m], images[m], brain, regions) for m in MODALITIES}
        rules = [r for r in check_contrast_rules(images, labels, brain) if r["passed"] is not None]
        out[arm] = {
            **fidelity_summary(scores),
            "rules_passed": sum(bool(r["passed"]) for r in rules), "rules_checked": len(rules),
            "checkerboard_ratio": {m: checkerboard_ratio_to(real_power[m], images[m], brain) for m in MODALITIES},
        }
    return out


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means of both arms and the paired comparison (mirror average minus one pass) of every score."""
    keys = [k for k, v in rows[0][ARMS[0]].items() if isinstance(v, float)]
    out: dict[str, Any] = {}
    for key in keys:
        a = [r["mirror_average"][key] for r in rows]
        b = [r["one_pass"][key] for r in rows]
        out[key] = {"mirror_average": float(np.mean(a)), "one_pass": float(np.mean(b)), **paired_comparison(a, b)}
    for arm in ARMS:
        out[f"rules_{arm}"], out[f"checkerboard_{arm}"] = arm_checks(rows, arm)
    return out


def arm_checks(rows: list[dict[str, Any]], arm: str) -> tuple[list[int], dict[str, float]]:
    """One arm over the rows: contrast rules [passed, checked] and each contrast's median checkerboard ratio."""
    rules = [sum(r[arm]["rules_passed"] for r in rows), sum(r[arm]["rules_checked"] for r in rows)]
    return rules, {m: float(np.median([r[arm]["checkerboard_ratio"][m] for r in rows])) for m in MODALITIES}


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="training config holding cv_folds")
    parser.add_argument("--folds", type=int, nargs="+", required=True)
    parser.add_argument("--models", nargs="+", required=True, help="each fold's model (folder or name), fold order")
    parser.add_argument("--data", type=Path, nargs="+", required=True)
    parser.add_argument("--cache", type=Path, required=True, help="training cache of prepared cases (the label maps)")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--appearance-spread", type=float, default=1.0,
                        help="the seed's appearance spread (default 1, as synthesis)")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    if len(args.models) != len(args.folds):
        parser.error("give one model per fold")
    torch.set_num_threads(args.threads)

    config = json.loads(args.config.read_text())
    normalization = config.get("normalization", "percentile")
    folders = {f.name: f for root in args.data for f in find_case_folders(root)}
    report: dict[str, Any] = {"command": shlex.join(["python", "benchmarks/mirror_average_ab.py", *sys.argv[1:]]),
                              "seed": 0, "appearance_spread": args.appearance_spread, "rows": []}
    for fold, name in zip(args.folds, args.models):
        model = resolve_model(name)
        engines = {arm: SynthesisEngine(model, "cpu", args.precision, mirror_average=arm == "mirror_average",
                                        appearance_spread=args.appearance_spread) for arm in ARMS}
        report.setdefault("precision", engines[ARMS[0]].synth.precision)
        for case_name in sorted(config["cv_folds"][fold]):
            if case_name not in folders:
                parser.error(f"fold {fold}: case {case_name} not found under --data")
            start = time.time()
            case = read_case(folders[case_name], require_segmentation=True)
            labels = _cached_labels(case, folders[case_name], args.cache, normalization)
            row = {"fold": fold, "case": case_name, "model": {"name": model.name, "sha256": model.sha256},
                   **score_case(case, labels, engines)}
            report["rows"].append(row)
            print(f"fold {fold} {case_name}: brain SSIM one pass {row['one_pass']['brain_ssim']:.4f}, "
                  f"mirror average {row['mirror_average']['brain_ssim']:.4f} ({time.time() - start:.0f} s)", flush=True)
    report["summary"] = summarise(report["rows"])
    write_json(report, args.json, overwrite=True)
    for key, row in report["summary"].items():
        if isinstance(row, dict) and "mean_difference" in row:
            print(f"{key:<12} one pass {row['one_pass']:.4f}  mirror average {row['mirror_average']:.4f}  "
                  f"{row['mean_difference']:+.4f}  better on {row['wins']}, worse on {row['losses']}  p {row['p']:.2g}")
    for arm in ARMS:
        passed, checked = report["summary"][f"rules_{arm}"]
        print(f"contrast rules, {arm}: {passed} of {checked}; checkerboard (median, real = 1) "
              + " / ".join(f"{v:.2f}" for v in report["summary"][f"checkerboard_{arm}"].values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
