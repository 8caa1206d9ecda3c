"""Measure the healthy-tissue z-score on real cases: how much each clip range clips, and why T2 suffers.

For every case folder (default: the 27 complete real cases of ``../shared/data``):
derive its MedSynth label map (the current default anatomy model), z-score each
modality against its healthy tissue (CSF/GM/WM, as ``normalization:
healthy_zscore`` does), and record

* the fraction of brain and of tumour voxels with ``|z| > s`` for candidate clip ranges ``s``;
* per class: median and spread (standard deviation, 5th-95th percentile) of z, and the
  separation of the healthy classes in units of the healthy-tissue standard deviation,
  for the z-score against all healthy tissue and against grey + white matter only;
* the contrast rules of :mod:`MedSynthLib.evaluation.image_checks` on the case's own images.

Re-run it after the anatomy model changes (label maps are cached by content hash under
``--cache``, which is keyed on the anatomy model's settings)::

    nice -n 10 python benchmarks/measure_normalization.py -o docs/benchmarks/normalization_27cases.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from MedSynthLib.cases.anatomy import DEFAULT_ANATOMY_MODEL, derive_label_map  # noqa: E402
from MedSynthLib.cases.readers import MODALITIES, read_case  # noqa: E402
from MedSynthLib.evaluation.image_checks import check_contrast_rules  # noqa: E402
from MedSynthLib.schema.labels import Label  # noqa: E402

CANDIDATE_SCALES = (4.0, 5.0, 6.0, 8.0, 10.0, 11.0, 12.0, 15.0, 20.0)
CLASSES = (Label.CSF, Label.GM, Label.WM, Label.NCR, Label.ED, Label.ET)


def default_cases() -> list[Path]:
    root = Path(os.environ.get("MEDSYNTH_DATA", REPO.parent / "shared" / "data"))
    folders = sorted((root / "brats2021" / "cases").glob("BraTS2021_*"))
    folders += sorted(p for p in (root / "brats_more" / "cases").iterdir() if p.is_dir())
    return folders


def cached_labels(case, cache: Path | None) -> np.ndarray:
    digest = hashlib.sha256(json.dumps(DEFAULT_ANATOMY_MODEL.to_json(), sort_keys=True).encode())
    for name in sorted(case.files):
        digest.update(Path(case.files[name]).read_bytes())
    path = cache / f"{digest.hexdigest()}.npy" if cache else None
    if path is not None and path.exists():
        return np.load(path)
    labels = derive_label_map(case).array
    if path is not None:
        cache.mkdir(parents=True, exist_ok=True)
        np.save(path, labels)
    return labels


def measure_case(folder: Path, cache: Path | None) -> dict:
    case = read_case(folder, require_segmentation=True)
    labels = cached_labels(case, cache)
    brain = labels > Label.BACKGROUND
    tumour = labels >= Label.NCR
    healthy = (labels >= Label.CSF) & (labels <= Label.WM)
    tissue = (labels == Label.GM) | (labels == Label.WM)
    entry: dict = {"case": folder.name, "voxels": {c.name: int((labels == c).sum()) for c in CLASSES},
                   "modalities": {}}
    for m in MODALITIES:
        image = case.images[m].astype(np.float64)
        values = image[healthy]
        z = (image - values.mean()) / values.std()
        tissue_values = image[tissue]
        z_tissue = (image - tissue_values.mean()) / tissue_values.std()
        per_class = {}
        for c in CLASSES:
            mask = labels == c
            if mask.sum() < 20:
                continue
            zc = z[mask]
            per_class[c.name] = {"median": float(np.median(zc)), "std": float(zc.std()),
                                 "p05": float(np.percentile(zc, 5)), "p95": float(np.percentile(zc, 95)),
                                 "median_gm_wm_z": float(np.median(z_tissue[mask]))}
        medians = [per_class[c.name]["median"] for c in (Label.CSF, Label.GM, Label.WM) if c.name in per_class]
        # The GM-WM difference of medians in the generator's [-1, 1] units under each map: how much of the
        # output range the healthy tissue contrast gets (the percentile map, then z / scale).
        low, high = np.percentile(image[brain], [0.5, 99.5])
        gm, wm = np.median(image[labels == Label.GM]), np.median(image[labels == Label.WM])
        separation = {"percentile": float(abs(wm - gm) / (high - low) * 2.0)}
        for s in (6.0, 12.0):
            separation[f"healthy_zscore/{s:g}"] = float(abs(wm - gm) / values.std() / s)
            separation[f"gm_wm_zscore/{s:g}"] = float(abs(wm - gm) / tissue_values.std() / s)
        csf = image[labels == Label.CSF]
        entry["modalities"][m] = {
            "healthy_mean": float(values.mean()), "healthy_std": float(values.std()),
            "clipped_brain": {str(s): float(np.mean(np.abs(z[brain]) > s)) for s in CANDIDATE_SCALES},
            "clipped_tumour": {str(s): float(np.mean(np.abs(z[tumour]) > s)) for s in CANDIDATE_SCALES}
            if tumour.any() else {},
            "clipped_tumour_gm_wm_z": {str(s): float(np.mean(np.abs(z_tissue[tumour]) > s))
                                       for s in CANDIDATE_SCALES} if tumour.any() else {},
            "classes": per_class,
            # How far apart the healthy classes are, in units of the healthy-tissue std: the contrast the
            # generator sees between CSF, GM and WM once z is divided by the clip range.
            "healthy_class_range": float(max(medians) - min(medians)) if medians else None,
            "gm_wm_separation": float(abs(per_class["WM"]["median"] - per_class["GM"]["median"]))
            if "WM" in per_class and "GM" in per_class else None,
            "gm_wm_separation_normalised": separation,
            # Share of the healthy-tissue variance that CSF contributes (its squared deviations).
            "csf_share_of_healthy_variance": float(((csf - values.mean()) ** 2).sum()
                                                   / ((values - values.mean()) ** 2).sum()),
            "std_ratio_healthy_to_gm_wm": float(values.std() / tissue_values.std()),
        }
    # The class medians are in "modalities" already; each rule keeps its verdict and differences.
    entry["contrast_rules"] = [{k: v for k, v in rule.items() if k != "medians"}
                               for rule in check_contrast_rules(case.images, labels, brain)]
    return entry


def summarise(cases: list[dict]) -> dict:
    out: dict = {"scales": list(CANDIDATE_SCALES), "per_modality": {}}
    chosen_candidates = []
    for s in CANDIDATE_SCALES:
        worst = max(c["modalities"][m]["clipped_tumour"].get(str(s), 0.0) for c in cases for m in MODALITIES)
        worst_brain = max(c["modalities"][m]["clipped_brain"][str(s)] for c in cases for m in MODALITIES)
        chosen_candidates.append({"scale": s, "max_tumour_clipped": worst, "max_brain_clipped": worst_brain})
    out["by_scale"] = chosen_candidates
    passing = [c["scale"] for c in chosen_candidates if c["max_tumour_clipped"] < 0.005]
    out["smallest_scale_clipping_under_0.5pct_tumour_everywhere"] = min(passing) if passing else None
    for m in MODALITIES:
        rows = [c["modalities"][m] for c in cases]
        out["per_modality"][m] = {
            "max_tumour_clipped": {str(s): max(r["clipped_tumour"].get(str(s), 0.0) for r in rows)
                                   for s in CANDIDATE_SCALES},
            "max_brain_clipped": {str(s): max(r["clipped_brain"][str(s)] for r in rows) for s in CANDIDATE_SCALES},
            "median_class_medians": {c.name: float(np.median([r["classes"][c.name]["median"] for r in rows
                                                               if c.name in r["classes"]]))
                                     for c in CLASSES if any(c.name in r["classes"] for r in rows)},
            "median_class_std": {c.name: float(np.median([r["classes"][c.name]["std"] for r in rows
                                                           if c.name in r["classes"]]))
                                 for c in CLASSES if any(c.name in r["classes"] for r in rows)},
            "median_gm_wm_separation": float(np.median([r["gm_wm_separation"] for r in rows])),
            "median_healthy_class_range": float(np.median([r["healthy_class_range"] for r in rows])),
            "median_gm_wm_separation_normalised": {
                key: float(np.median([r["gm_wm_separation_normalised"][key] for r in rows]))
                for key in rows[0]["gm_wm_separation_normalised"]},
            "median_csf_share_of_healthy_variance": float(np.median([r["csf_share_of_healthy_variance"]
                                                                     for r in rows])),
            "median_std_ratio_healthy_to_gm_wm": float(np.median([r["std_ratio_healthy_to_gm_wm"] for r in rows])),
        }
    violations = {}
    for c in cases:
        failed = [r["rule"] for r in c["contrast_rules"] if r["passed"] is False]
        if failed:
            violations[c["case"]] = failed
    out["contrast_rule_violations"] = violations
    out["contrast_rules_passed"] = sum(r["passed"] is True for c in cases for r in c["contrast_rules"])
    out["contrast_rules_checked"] = sum(r["passed"] is not None for c in cases for r in c["contrast_rules"])
    return out


def _rounded(value):
    """Floats to 5 significant digits, recursively (the file stays readable and small)."""
    if isinstance(value, float):
        return float(f"{value:.5g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", type=Path, help="case folders (default: the 27 real cases)")
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/medsynth_norm_cache"),
                        help="label-map cache (keyed by files and anatomy settings)")
    args = parser.parse_args()
    folders = args.cases or default_cases()
    results = []
    for folder in folders:
        start = time.perf_counter()
        results.append(measure_case(folder, args.cache))
        print(f"{folder.name}: {time.perf_counter() - start:.1f} s", flush=True)
    report = _rounded({"anatomy_model": DEFAULT_ANATOMY_MODEL.to_json(), "summary": summarise(results),
                       "cases": results})
    write_report(report, args.output)
    print(json.dumps(report["summary"], indent=1))


def write_report(report: dict, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".tmp")
    # The summary readable, the per-case detail compact (one line per case).
    lines = ["{", f' "anatomy_model": {json.dumps(report["anatomy_model"])},',
             f' "summary": {json.dumps(report["summary"], indent=1)},', ' "cases": [']
    lines += [f"  {json.dumps(case)}," for case in report["cases"]]
    lines[-1] = lines[-1].rstrip(",")
    lines += [" ]", "}"]
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, output)


if __name__ == "__main__":
    main()
