"""How much the synthesis seed changes a case, whether every sample still reads right, and its checkerboard.

For each case folder: its MedSynth label map (the default anatomy model) is synthesised with N seeds.
Reported per modality: the mean over voxels of the standard deviation across seeds (each sample
z-scored inside the brain), separately in the tumour and in healthy tissue; and, per sample, the
contrast rules of :mod:`MedSynthLib.evaluation.image_checks` beside the real images' own values, and the
checkerboard ratio (period-2 power of the sample relative to the real image, inside the brain; target
at most 1.2), mean over the samples.  With several ``--appearance-spread`` values, each case is measured at
each (the same seeds' draws, scaled).

    python benchmarks/seed_diversity.py CASE_DIR... --model MODEL [--seeds 5] [--appearance-spread 1 1.5 2] \
        -o diversity.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from MedSynthLib.cases.anatomy import derive_label_map  # noqa: E402
from MedSynthLib.cases.readers import MODALITIES, read_case  # noqa: E402
from MedSynthLib.evaluation.image_checks import check_contrast_rules, checkerboard_ratio_to, nyquist_power  # noqa: E402
from MedSynthLib.schema.labels import Label  # noqa: E402
from MedSynthLib.synthesis.models import resolve_model  # noqa: E402
from MedSynthLib.synthesis.normalize import zscore  # noqa: E402
from MedSynthLib.synthesis.synthesize import SynthesisEngine  # noqa: E402


def measure(folder: Path, engine: SynthesisEngine, seeds: list[int], case, labelmap) -> dict:
    """One case (read from ``folder``, its label map derived) at the engine's appearance spread."""
    labels = labelmap.array
    brain = labels > Label.BACKGROUND
    tumour = labels >= Label.NCR
    healthy = brain & ~tumour
    samples = [engine.synthesize(labelmap, seed=seed) for seed in seeds]
    entry: dict = {"case": folder.name, "seeds": seeds, "appearance_spread": engine.appearance_spread,
                   "seed_effective": samples[0].provenance["seed_effective"],
                   "diversity": {}, "rules_real": check_contrast_rules(case.images, labels),
                   "rules_synthetic": [check_contrast_rules(s.images, labels) for s in samples]}
    for m in MODALITIES:
        stack = np.stack([zscore(s.images[m], brain) for s in samples])
        spread = stack.std(0)
        entry["diversity"][m] = {"tumour": float(spread[tumour].mean()) if tumour.any() else None,
                                 "healthy": float(spread[healthy].mean())}
    real_power = {m: nyquist_power(case.images[m], brain) for m in MODALITIES}  # one real image, many samples
    entry["checkerboard_ratio"] = {m: float(np.mean([checkerboard_ratio_to(real_power[m], s.images[m], brain)
                                                      for s in samples])) for m in MODALITIES}
    entry["rules_failed_per_sample"] = [[r["rule"] for r in rules if r["passed"] is False]
                                        for rules in entry["rules_synthetic"]]
    entry["rules_failed_real"] = [r["rule"] for r in entry["rules_real"] if r["passed"] is False]
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", type=Path)
    parser.add_argument("--model", required=True)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--appearance-spread", type=float, nargs="+", default=[1.0])
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    model = resolve_model(args.model)
    engines = []
    for spread in args.appearance_spread:
        engine = SynthesisEngine(model, "cpu", args.precision)
        # Set past the setter's check on purpose: measuring beyond the accepted range is what sets the range.
        engine._appearance_spread = float(spread)
        engines.append(engine)
    results = []
    for folder in args.cases:
        case = read_case(folder, require_segmentation=True)
        labelmap = derive_label_map(case)
        for engine in engines:
            results.append(measure(folder, engine, list(range(1, args.seeds + 1)), case, labelmap))
            entry = results[-1]
            print(entry["case"], f"spread {entry['appearance_spread']:g}", json.dumps(entry["diversity"]),
                  "checkerboard:", json.dumps(entry["checkerboard_ratio"]),
                  "failed (synthetic):", entry["rules_failed_per_sample"],
                  "failed (real):", entry["rules_failed_real"], flush=True)
    tmp = args.output.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model": args.model, "model_sha256": model.sha256,
                               "command": "python benchmarks/seed_diversity.py " + " ".join(sys.argv[1:]),
                               "cases": results}, indent=1) + "\n")
    os.replace(tmp, args.output)


if __name__ == "__main__":
    main()
