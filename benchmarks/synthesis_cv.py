"""Held-out fidelity of synthesis models on one cross-validation fold, with montages.

For the fold's held-out cases (``cv_folds`` of a training config): each model's
synthesis from the case's own label map against the real images (``medsynth
evaluate``'s metrics: z-scored in the brain, Gaussian SSIM, PSNR peak 8), beside
painting each class with the training cases' mean (the class-mean baseline); the
contrast rules on synthetic and real images, and the checkerboard ratio.  One label
map per case (the default anatomy model) serves every model, so models are compared
on the same anatomy.  Writes ``report.json``, ``report.md`` and one montage per
chosen case (real row, then one row per model; an axial slice through the tumour).

Usage (from the repository root)::

    python benchmarks/synthesis_cv.py --config Resources/configs/spade_brats27_cpu64_cv.json --fold 0 \\
        --data ../shared/data/brats2021/cases ../shared/data/brats_more/cases \\
        --models /work/runs/spade64_f0/model medsynth-brats21-cpu -o docs/synthesis_cv
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from MedSynthLib.cases.anatomy import derive_label_map  # noqa: E402
from MedSynthLib.cases.readers import MODALITIES, read_case  # noqa: E402
from MedSynthLib.evaluation.evaluate import (evaluate, frame_without_reference, in_patient_frame,  # noqa: E402
                                              spread_text)
from MedSynthLib.schema.grid import LabelMap  # noqa: E402
from MedSynthLib.schema.labels import tumour_mask  # noqa: E402
from MedSynthLib.synthesis.models import resolve_model  # noqa: E402
from MedSynthLib.synthesis.normalize import zscore  # noqa: E402
from MedSynthLib.synthesis.synthesize import SynthesisEngine  # noqa: E402
from MedSynthLib.training.data import find_case_folders  # noqa: E402


def _cached_labels(case: Any, folder: Path, cache_dir: Path | None, normalization: str) -> np.ndarray:
    """The case's derived label map, from a training cache when one is given (same anatomy model)."""
    if cache_dir is None:
        return derive_label_map(case).array
    from MedSynthLib.schema.grid import mask_box
    from MedSynthLib.training.data import prepare_volume

    brain = case.brain_mask()
    box = mask_box(brain, margin=4)  # the crop prepare_volume stores
    volume = prepare_volume(folder, cache_dir, normalization)
    labels = np.zeros(brain.shape, np.uint8)
    labels[box] = volume.labels
    if not np.array_equal(labels > 0, brain):
        raise SystemExit(f"{folder}: the cached label map does not match the case's brain")
    return labels


def synthesis_in_patient_frame(case: Any, labels: np.ndarray, engine: Any,
                               brain: np.ndarray) -> tuple[dict[str, np.ndarray], bool]:
    """The engine's synthesis of ``labels`` placed in the patient's frame: its network output mapped to the case's
    scanner units by the case's own normaliser, then z-scored with the real image's brain mean and spread (as
    ``evaluate``'s class signal), so real and synthetic rows share one scale.

    Returns the images and whether they are in that frame: a label map without the tissue the model's normaliser
    is fitted on (e.g. no grey or white matter for the tissue z-score) gives the case no normaliser, and the
    synthetic images are then z-scored on their own, as ``evaluate`` reports such a case.
    """
    result = engine.synthesize(LabelMap(labels, case.grid))
    if frame_without_reference(labels, engine.model.modalities, engine.model.normalizers):
        return {m: zscore(np.asarray(result.images[m], np.float32), brain) for m in engine.model.modalities}, False
    placed = in_patient_frame(case.images, result.normalized, engine.model.modalities, engine.model.normalizers, labels)
    return {m: zscore(image, brain, reference=case.images[m]) for m, image in placed.items()}, True


def _montage(case: Any, case_dir: Path, labels: np.ndarray, engines: list[tuple[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    brain = np.any([case.images[m] > 0 for m in MODALITIES], axis=0)
    tumour = tumour_mask(labels)
    k = int(np.argmax(tumour.sum(axis=(1, 2)))) if tumour.any() else labels.shape[0] // 2
    rows = [("real", {m: zscore(np.asarray(case.images[m], np.float32), brain) for m in MODALITIES})]
    for name, engine in engines:
        images, in_frame = synthesis_in_patient_frame(case, labels, engine, brain)
        rows.append((name if in_frame else f"{name}\n(own z-score: no\npatient frame)", images))
    fig, axes = plt.subplots(len(rows), 4, figsize=(10, 2.6 * len(rows)))
    for r, (name, images) in enumerate(rows):
        for c, m in enumerate(MODALITIES):
            z = images[m]
            ax = axes[r, c]
            ax.imshow(np.flipud(np.where(brain[k], z[k], np.nan)), cmap="gray", vmin=-2.5, vmax=3.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(m.upper() if m != "t1ce" else "T1ce")
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle(f"{case_dir.name}, axial slice {k} (held out); synthetic rows in the patient's frame "
                 "(the real image's brain z-score)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="training config holding cv_folds")
    parser.add_argument("--fold", type=int, required=True)
    parser.add_argument("--data", type=Path, nargs="+", required=True)
    parser.add_argument("--models", nargs="+", required=True, help="model folders or registered names")
    parser.add_argument("--montage-cases", type=int, default=3)
    parser.add_argument("--cache", type=Path, help="a training cache of prepared cases: their label maps are "
                        "read from it instead of derived again (checked against the case's brain)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    args = parser.parse_args()

    config = json.loads(args.config.read_text())
    folds, normalization = config["cv_folds"], config.get("normalization", "percentile")
    held_out = set(folds[args.fold])
    folders = [f for root in args.data for f in find_case_folders(root)]
    test = sorted((f for f in folders if f.name in held_out), key=lambda f: f.name)
    train = sorted((f for f in folders if f.name not in held_out), key=lambda f: f.name)
    if len(test) != len(held_out):
        parser.error(f"fold {args.fold}: found {len(test)} of its {len(held_out)} cases under --data")
    held_out_folders = set(test)
    args.output.mkdir(parents=True, exist_ok=True)

    # Each held-out case is read once for all models (labels, every model's scoring, the montage);
    # the training cases, read only for the class means, are not kept.
    cases: dict[Path, Any] = {}
    labels: dict[Path, np.ndarray] = {}

    def read(folder: Path) -> Any:
        if folder in cases:
            return cases[folder]
        case = read_case(folder, require_segmentation=True)
        if folder in held_out_folders:
            cases[folder] = case
        return case

    def labels_for(folder: Path) -> np.ndarray:
        if folder not in labels:
            labels[folder] = _cached_labels(read(folder), folder, args.cache, normalization)
        return labels[folder]

    report: dict[str, Any] = {"command": " ".join(sys.argv), "fold": args.fold, "held_out": [f.name for f in test],
                              "training_cases": [f.name for f in train], "machine": platform.machine(),
                              "models": {}}
    engines = []
    shared: dict[str, Any] = {}  # the class-mean baselines, scored once for all models
    for name in args.models:
        model = resolve_model(name)
        engine = SynthesisEngine(model, "cpu", "auto")
        start = time.time()
        result = evaluate(engine, test, labels_for, train, reader=read, shared=shared)
        result["seconds"] = time.time() - start
        label = Path(name).parent.name if Path(name).name == "model" else model.name
        report["models"][label] = result
        engines.append((label, engine))
    (args.output / "report.json").write_text(json.dumps(report, indent=1))

    lines = [f"# Held-out synthesis fidelity, fold {args.fold}", "",
             f"Command: `{report['command']}`", "",
             f"Held out ({len(test)}): {', '.join(report['held_out'])}.", "",
             f"Trained on ({len(train)}) for the class-mean baseline: the other cases.", "",
             "| model | brain SSIM | brain PSNR (dB) | tumour SSIM | checkerboard ratio T1 / T1ce / T2 / FLAIR |",
             "|---|---|---|---|---|"]
    first = next(iter(report["models"].values()))
    for label, result in report["models"].items():
        s = result["summary"]["model"]
        cb = " / ".join(f"{result['checkerboard_ratio'][m]:.2f}" for m in MODALITIES)
        lines.append(f"| {label} | {s['brain_ssim']:.3f} | {s['brain_psnr']:.2f} | {s.get('tumour_ssim', float('nan')):.3f} | {cb} |")
    for baseline in ("class_mean_training", "class_mean_oracle"):
        s = first["summary"][baseline]
        lines.append(f"| {baseline.replace('_', ' ')} | {s['brain_ssim']:.3f} | {s['brain_psnr']:.2f} | "
                     f"{s.get('tumour_ssim', float('nan')):.3f} | — |")
    lines += ["", "Per modality, brain SSIM:", "", "| model | " + " | ".join(MODALITIES) + " |",
              "|---|" + "---|" * len(MODALITIES)]
    for label, result in report["models"].items():
        lines.append(f"| {label} | " + " | ".join(f"{result['per_modality']['model'][m]['ssim']:.3f}"
                                                  for m in MODALITIES) + " |")
    lines += ["", "Contrast rules (cases where the rule held, synthetic / real, of those checked):", "",
              "| rule | " + " | ".join(report["models"]) + " |", "|---|" + "---|" * len(report["models"])]
    for rule in first["contrast_rules"]:
        cells = []
        for result in report["models"].values():
            c = result["contrast_rules"][rule]
            cells.append(f"{c['synthetic_passed']} / {c['real_passed']} of {c['checked']}")
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    lines += ["", "Class signal: each class's median z, synthetic minus real, mean over the held-out cases; own: each "
              "image z-scored on its own (as the metrics and the rules read it), frame: the synthetic image in the "
              "patient's frame (`evaluate`); spread: the synthetic image's spread over the brain in that frame, "
              "as a fraction of the real one's.", "",
              "| contrast | class | real | " + " | ".join(f"{label} own / frame" for label in report["models"]) + " |",
              "|---|---|---|" + "---|" * len(report["models"])]
    for m in MODALITIES:
        first_signal = first["class_signal"][m]
        for name, row in first_signal["classes"].items():
            cells = []
            for result in report["models"].values():
                other = result["class_signal"][m]["classes"].get(name)
                cells.append("—" if other is None else
                             f"{other['synthetic_minus_real']:+.2f} / {other['patient_frame_minus_real']:+.2f}")
            lines.append(f"| {m} | {name} | {row['real']:+.2f} | " + " | ".join(cells) + " |")
        spreads = " | ".join(spread_text(result['class_signal'][m]['brain_spread_ratio'])
                             for result in report["models"].values())
        lines.append(f"| {m} | spread | | {spreads} |")
    for folder in test[: args.montage_cases]:
        path = args.output / f"montage_{folder.name}.png"
        _montage(read(folder), folder, labels_for(folder), engines, path)
        lines += ["", f"![{folder.name}]({path.name})"]
    (args.output / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:20]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
