"""Does counting the training L1 in the brain only give the brain's outermost voxel layer signal?

Compares models (folders or names) on the same label maps: the healthy template shipped with the project and
the anatomy derived from real cases. Per model and case it prints, averaged over the four contrasts, the share
of the outermost brain layer at 0, that layer's median over white matter's (the real scan's beside it), and
brain SSIM against the real scan (``medsynth evaluate``'s metric); and per contrast the share of that layer at or
below the model's floor (``rim_at_floor_<contrast>``; models with a floor only). Synthesis runs with seed 0.

    python benchmarks/l1_region_probe.py --models medsynth-spade27-cpu RUN_A/model RUN_B/model \
        --cases ../shared/data/brats2021/cases/BraTS2021_00002 ../shared/data/brats_more/cases/Brats18_2013_2_1
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from MedSynthLib.cases.anatomy import derive_label_map
from MedSynthLib.cases.readers import read_case
from MedSynthLib.cases.template import template_label_map
from MedSynthLib.evaluation.evaluate import real_brain_mask
from MedSynthLib.evaluation.image_checks import layer_signal_shares, outermost_layer
from MedSynthLib.evaluation.metrics import fidelity
from MedSynthLib.schema.labels import MODALITIES, Label
from MedSynthLib.synthesis.models import resolve_model
from MedSynthLib.synthesis.synthesize import SynthesisEngine


def measure(images: dict[str, np.ndarray], labels: np.ndarray, real: dict[str, np.ndarray] | None,
            floors: dict[str, float] | None = None) -> dict:
    rim, wm = outermost_layer(labels > 0), labels == Label.WM
    images = {m: images[m] for m in MODALITIES}
    zero, at_floor = layer_signal_shares(images, rim, floors or {m: 0.0 for m in MODALITIES})
    row: dict[str, float] = {
        "rim_zero": float(np.mean(list(zero.values()))),
        "rim_over_wm": float(np.mean([np.median(images[m][rim]) / np.median(images[m][wm]) for m in MODALITIES]))}
    if floors:
        row.update({f"rim_at_floor_{m}": at_floor[m] for m in MODALITIES})
    if real is not None:
        brain = real_brain_mask(real)
        row["brain_ssim"] = float(np.mean([fidelity(real[m], images[m], brain, {})["brain"]["ssim"]
                                           for m in MODALITIES]))
        row["real_rim_over_wm"] = float(np.mean([np.median(real[m][rim]) / np.median(real[m][wm])
                                                 for m in MODALITIES]))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--cases", nargs="*", default=[], type=Path)
    args = parser.parse_args()
    maps = [("template", template_label_map(), None)]
    for folder in args.cases:
        case = read_case(folder, require_segmentation=True)
        maps.append((folder.name, derive_label_map(case), case.images))
    for name in args.models:
        engine = SynthesisEngine(resolve_model(name), device="cpu", precision="auto")
        intensity = engine.model.config["intensity"]
        floors = ({m: intensity[m]["floor"] for m in MODALITIES}
                  if all("floor" in intensity[m] for m in MODALITIES) else None)
        rows = {}
        for case_name, labelmap, real in maps:
            result = engine.synthesize(labelmap, seed=0)
            rows[case_name] = measure(result.images, labelmap.array, real, floors)
            print(name, case_name, json.dumps({k: round(v, 4) for k, v in rows[case_name].items()}), flush=True)
        scored = [r for r in rows.values() if "brain_ssim" in r]
        if scored:
            print(name, "mean over cases", json.dumps({k: round(float(np.mean([r[k] for r in scored])), 4)
                                                       for k in scored[0]}), flush=True)


if __name__ == "__main__":
    main()
