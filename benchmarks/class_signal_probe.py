"""Each class's median brightness in the patient's frame, held out, for several recipes' fold models side by side.

``medsynth evaluate`` reports the class signal with every score; this probe computes only it, so several recipes
(each a fold model per cross-validation fold) are compared on the same held-out cases in minutes: each case's
label map from the training cache (the anatomy every model is scored on), its synthesis by the fold model that did
not train on it, and ``evaluate.class_signal`` on the real images. Writes one JSON (per recipe: per case, and the
mean over cases) and prints, per recipe and contrast, every class's mean synthetic-minus-real median in the
patient's frame and the synthetic image's spread.

Usage (from the repository root)::

    python benchmarks/class_signal_probe.py --config Resources/configs/spade_brats27_cpu64_cv.json \\
        --data ../shared/data/brats2021/cases ../shared/data/brats_more/cases --cache CACHE --folds 0 1 2 \\
        --recipe start=RUNS/start_f0/model,RUNS/start_f1/model,RUNS/start_f2/model \\
        --recipe default=RUNS/prior_f0/model,RUNS/prior_f1/model,RUNS/prior_f2/model --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from MedSynthLib.cases.readers import MODALITIES, read_case  # noqa: E402
from MedSynthLib.evaluation.evaluate import (class_signal, class_signal_summary, named_class_medians,  # noqa: E402
                                             real_brain_mask, spread_text)
from MedSynthLib.schema.grid import LabelMap  # noqa: E402
from MedSynthLib.schema.volume_io import write_json  # noqa: E402
from MedSynthLib.synthesis.models import resolve_model  # noqa: E402
from MedSynthLib.synthesis.synthesize import SynthesisEngine  # noqa: E402
from MedSynthLib.training.data import find_case_folders  # noqa: E402
from synthesis_cv import _cached_labels  # noqa: E402


def parse_recipe(text: str, folds: list[int]) -> tuple[str, list[str]]:
    """``NAME=MODEL_F0,MODEL_F1,...``: one model per fold given, in the order of ``--folds``."""
    name, sep, models = text.partition("=")
    paths = [p for p in models.split(",") if p]
    if not sep or not name or len(paths) != len(folds):
        raise SystemExit(f"--recipe {text}: give NAME=MODEL,... with one model for each of the folds {folds}")
    return name, paths


def table(name: str, summary: dict[str, Any]) -> list[str]:
    lines = [f"{name}: synthetic minus real median, patient's frame (z), mean over cases"]
    for m in MODALITIES:
        if m in summary:
            cells = " ".join(f"{c} {row['patient_frame_minus_real']:+.2f}" for c, row in summary[m]["classes"].items())
            lines.append(f"  {m:<5} {cells}  spread {spread_text(summary[m]['brain_spread_ratio'])}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="training config holding cv_folds")
    parser.add_argument("--data", type=Path, nargs="+", required=True)
    parser.add_argument("--cache", type=Path, required=True, help="training cache of prepared cases (label maps)")
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipe", action="append", required=True, help="NAME=MODEL_F0,MODEL_F1,... (repeatable)")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()

    config = json.loads(args.config.read_text())
    normalization = config.get("normalization", "percentile")
    recipes = [parse_recipe(text, args.folds) for text in args.recipe]
    folders = {f.name: f for root in args.data for f in find_case_folders(root)}
    report: dict[str, Any] = {"command": shlex.join(["python", "benchmarks/class_signal_probe.py", *sys.argv[1:]]),
                              "folds": args.folds, "recipes": {}}
    per_recipe: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in recipes}
    for index, fold in enumerate(args.folds):
        engines = [(name, SynthesisEngine(resolve_model(models[index]), "cpu", "auto")) for name, models in recipes]
        for case_name in config["cv_folds"][fold]:
            if case_name not in folders:
                raise SystemExit(f"fold {fold}: case {case_name} is not under --data")
            folder = folders[case_name]
            case = read_case(folder, require_segmentation=True)
            labels = _cached_labels(case, folder, args.cache, normalization)
            brain = real_brain_mask(case.images)
            real = {m: named_class_medians(case.images[m], labels, brain) for m in MODALITIES}
            for name, engine in engines:
                result = engine.synthesize(LabelMap(labels, case.grid))
                signal = class_signal(case.images, result.images, result.normalized, engine.model.modalities,
                                      engine.model.normalizers, labels, brain, real)
                per_recipe[name].append({"case": case_name, "fold": fold, "class_signal": signal})
            print(f"fold {fold} {case_name}", flush=True)
    lines = []
    for name, models in recipes:
        summary = class_signal_summary(per_recipe[name])
        report["recipes"][name] = {"models": models, "summary": summary, "cases": per_recipe[name]}
        lines += table(name, summary)
    write_json(report, args.json, overwrite=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
