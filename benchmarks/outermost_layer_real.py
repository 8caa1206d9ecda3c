"""How much of a real brain's outermost voxel layer lies at or below a model's floor, class by class.

A synthesis model keeps every brain voxel at or above its floor (per contrast, the darkest signal of a median
training brain; ``config.json`` -> ``intensity`` -> ``floor``); the test of the outermost layer
(``Testing/test_synthesis.py``) compares the share of the healthy template's outermost layer that the model
leaves at that floor with real layers.  The template's outermost layer is almost all CSF, a real case's mostly
grey matter, and CSF is the darkest class on T1, T1ce and FLAIR: so this script measures the real layers class
by class, and weights the classes as the template's layer holds them, the reference that compares like with
like.  Each real case is read through the training cache (its label map and its images z-scored against its own
grey and white matter), as the models train on them.

    PYTHONPATH=. python benchmarks/outermost_layer_real.py --data ../shared/data/brats2021/cases \\
        ../shared/data/brats_more/cases --cache CACHE --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from MedSynthLib.cases.template import template_label_map  # noqa: E402
from MedSynthLib.evaluation.image_checks import outermost_layer  # noqa: E402
from MedSynthLib.schema.labels import MODALITIES, Label  # noqa: E402
from MedSynthLib.schema.volume_io import write_json  # noqa: E402
from MedSynthLib.synthesis.models import resolve_model  # noqa: E402
from MedSynthLib.training.data import find_case_folders, prepare_volume  # noqa: E402

CLASSES = {"csf": Label.CSF, "gm": Label.GM, "wm": Label.WM}
MIN_VOXELS = 100  # a class with fewer voxels in a case's layer gives no share for that case


def floors_z(model) -> dict[str, float]:
    """The model's floor of each contrast in z (its training statistics' units)."""
    intensity = model.config["intensity"]
    return {m: (intensity[m]["floor"] - intensity[m]["mean"]) / intensity[m]["std"] for m in MODALITIES}


def layer_composition(labels: np.ndarray, layer: np.ndarray) -> dict[str, float]:
    """The share of each healthy class in the brain's outermost voxel layer (``outermost_layer(labels > 0)``)."""
    return {name: float(np.mean(labels[layer] == value)) for name, value in CLASSES.items()}


def layer_shares(labels: np.ndarray, z: dict[str, np.ndarray], floor: dict[str, float]) -> dict[str, dict]:
    """Per contrast: the share of the outermost layer at or below the floor, over all of it and per class."""
    layer = outermost_layer(labels > 0)
    out: dict[str, dict] = {"layer_composition": layer_composition(labels, layer)}
    for m in MODALITIES:
        below = z[m] <= floor[m]
        shares = {"all": float(below[layer].mean())}
        for name, value in CLASSES.items():
            voxels = layer & (labels == value)
            shares[name] = float(below[voxels].mean()) if voxels.sum() >= MIN_VOXELS else None
        out[m] = shares
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--model", default=None, help="the model whose floors count (default: the registry's)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    model = resolve_model(args.model)
    floor = floors_z(model)
    per_case = {}
    for folder in (f for root in args.data for f in find_case_folders(root)):
        volume = prepare_volume(folder, args.cache, "tissue_zscore")
        z = {m: volume.images[c].astype(np.float64) * volume.normalizers[m].scale for c, m in enumerate(MODALITIES)}
        per_case[folder.name] = layer_shares(volume.labels, z, floor)
        print(folder.name, " ".join(f"{m} {per_case[folder.name][m]['all'] * 100:.1f} %" for m in MODALITIES),
              flush=True)
    template = template_label_map().array
    composition = layer_composition(template, outermost_layer(template > 0))
    summary: dict[str, dict] = {}
    for m in MODALITIES:
        summary[m] = {}
        for part in ("all", *CLASSES):
            values = np.array([row[m][part] for row in per_case.values() if row[m][part] is not None])
            summary[m][part] = {"mean": float(values.mean()), "median": float(np.median(values)),
                                "max": float(values.max()), "cases": int(values.size)}
        # The reference for the template: each class's mean-case share, weighted as the template's layer holds it.
        summary[m]["template_weighted_mean"] = float(sum(composition[name] * summary[m][name]["mean"]
                                                         for name in CLASSES))
    report = {"command": " ".join(sys.argv), "model": {"name": model.name, "sha256": model.sha256},
              "floors_z": floor, "template_layer_composition": composition, "summary": summary,
              "per_case": per_case}
    print(json.dumps({m: {k: round(v["mean"] * 100, 2) if isinstance(v, dict) else round(v * 100, 2)
                          for k, v in summary[m].items()} for m in MODALITIES}, indent=1))
    if args.json:
        write_json(report, args.json, overwrite=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
