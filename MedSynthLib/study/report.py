"""Numbers, tables, figures and the discussion of a ``medsynth study`` report.

``report.json`` holds every number (per case and summarised), the config, data
hashes, software versions and timings; ``report.md`` is the same for a reader
(clinician-readable tables and a discussion generated from the measured
numbers); ``figures/`` holds the PNGs.  The report folder is written
atomically: built in a temporary sibling, then renamed.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..schema.labels import MODALITY_TITLES
from .segmenter import ARM_TITLES, ARMS, REGIONS, SegCase
from .statistics import HD95_PENALTY_MM, MIN_N_INTERVAL, hd95_or_penalty, holm_family, paired_comparison

#: Every scored arm of the report: the two FLAIR-threshold baselines (the gate), then the learned arms.
BASELINES: tuple[str, ...] = ("baseline:threshold", "baseline:largest_component")
ALL_ARMS: tuple[str, ...] = BASELINES + ARMS
TITLES: dict[str, str] = dict({"baseline:threshold": "B. FLAIR threshold",
                               "baseline:largest_component": "B'. FLAIR threshold, largest component"},
                              **ARM_TITLES)
HD95_NOTE = ("Dice follows the BraTS convention for empty masks: a region absent from both the reference and "
             "the prediction scores Dice 1 and HD95 0 mm; a region present in only one of them scores Dice 0 "
             f"and HD95 {HD95_PENALTY_MM} mm (the BraTS penalty; no case is dropped).")


# --- statistics --------------------------------------------------------------------------------


def ncc(a: SegCase, b: SegCase) -> float:
    """Similarity of two cases on the study grid: mean over modalities of the normalised
    cross-correlation of their brain-z-scored images over the union of their brains
    (each image is 0 outside its own brain)."""
    values = []
    for m in range(a.images.shape[0]):
        x = np.asarray(a.images[m], np.float32).ravel()
        y = np.asarray(b.images[m], np.float32).ravel()
        denom = math.sqrt(float(np.dot(x, x)) * float(np.dot(y, y)))
        values.append(float(np.dot(x, y)) / denom if denom > 0 else 0.0)
    return float(np.mean(values))


def describe(values: list[float]) -> dict[str, Any]:
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"n": 0, "mean": None, "std": None, "median": None, "min": None, "max": None}
    arr = np.asarray(finite)
    return {"n": len(finite), "mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
            "median": float(np.median(arr)), "min": float(arr.min()), "max": float(arr.max())}


# --- the report dictionary ---------------------------------------------------------------------


def git_state() -> dict[str, Any]:
    """The commit of the MedSynth checkout that ran the study, and whether it had local changes."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10, check=True).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None, "note": "not a git checkout"}
    return {"commit": commit, "dirty": dirty}


def image_reidentification(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Re-identification of synthetic cases by image: is the nearest real case the patient the case was built on?

    Each entry is one synthetic case of the memorisation check (``kind``, ``base``: the case whose brain it was
    built on, ``ncc_all``: its image similarity to every candidate real case).  Per kind whose base is among the
    candidates (a patient's brain): top-1 hits, the median rank of the base, chance (1 / candidates) and the
    one-sided binomial p of the hits above chance.  A kind whose base is no candidate (the template brain) has
    no source patient to find and is listed with its count only.
    """
    from scipy.stats import binomtest

    by_kind: dict[str, Any] = {}
    for kind in sorted({e["kind"] for e in entries}):
        group = [e for e in entries if e["kind"] == kind]
        sourced = [e for e in group if e.get("base") in (e.get("ncc_all") or {})]
        if not sourced:
            by_kind[kind] = {"n": len(group), "source_patient": False}
            continue
        ranks = [1 + sum(v > e["ncc_all"][e["base"]] for v in e["ncc_all"].values()) for e in sourced]
        hits = sum(r == 1 for r in ranks)
        chance = float(np.mean([1.0 / len(e["ncc_all"]) for e in sourced]))
        by_kind[kind] = {"n": len(sourced), "source_patient": True, "top1": hits, "top1_accuracy": hits / len(sourced),
                         "chance": chance, "median_rank": float(np.median(ranks)),
                         "p_above_chance": float(binomtest(hits, len(sourced), chance, alternative="greater").pvalue)}
    return {"candidates": "the fold's real training cases", "by_kind": by_kind}


def reidentification_table(report: dict[str, Any]) -> str:
    rows = report["memorisation"].get("reidentification_by_image", {}).get("by_kind", {})
    lines = ["| Synthetic cases built by | n | source patient | top-1 hits | top-1 accuracy | chance | median rank "
             "of source | p (binomial, above chance) |", "|---|---|---|---|---|---|---|---|"]
    for kind, e in rows.items():
        if not e["source_patient"]:
            lines.append(f"| '{kind}' | {e['n']} | none (not a patient's brain) | – | – | – | – | – |")
            continue
        lines.append(f"| '{kind}' | {e['n']} | the patient whose brain it was built on | {e['top1']} | "
                     f"{_f(e['top1_accuracy'], 2)} | {_f(e['chance'], 3)} | {_f(e['median_rank'], 1)} | "
                     f"{e['p_above_chance']:.2g} |")
    return "\n".join(lines)


def build_report(inputs: Any, results: dict[str, Any], study: Any, *, command: str, started_utc: str,
                 wall_seconds: float) -> dict[str, Any]:
    from ..cases.anatomy import DEFAULT_ANATOMY_MODEL
    from ..schema.provenance import software_versions
    from .data import STUDY_VERSION

    config = inputs.config
    folds = results["folds"]
    # The learned arms with results in every fold (all of them in a finished study; a partial report of
    # a running one leaves out the others and lists them in report["partial"]).
    arms = [arm for arm in ARMS if all(arm in fold["arms"] for fold in folds)]
    scored = list(BASELINES) + arms
    per_case: dict[str, dict[str, Any]] = {arm: {} for arm in scored}
    case_fold: dict[str, int] = {}
    for fold in folds:
        for variant in ("threshold", "largest_component"):
            for c, scores in fold["baseline"]["variants"][variant]["scores"].items():
                per_case[f"baseline:{variant}"][c] = {r: {"dice": scores[r]["dice"],
                                                          "hd95": hd95_or_penalty(scores[r]["hd95"])}
                                                      for r in REGIONS}
        for arm in arms:
            runs = fold["arms"][arm]["runs"]
            for c in fold["test"]:
                per_case[arm][c] = {r: {"dice": float(np.mean([run["scores"][c][r]["dice"] for run in runs])),
                                        "hd95": float(np.mean([hd95_or_penalty(run["scores"][c][r]["hd95"])
                                                               for run in runs])),
                                        "dice_per_seed": [run["scores"][c][r]["dice"] for run in runs]}
                                    for r in REGIONS}
        for c in fold["test"]:
            case_fold[c] = fold["fold"]
    cases = sorted(case_fold)
    n_seeds = config.seg_config.seeds
    seed_spread: dict[str, Any] = {}
    for arm in arms:
        # Mean WT Dice over all held-out cases for each seed index: the training-seed spread.
        per_seed = [float(np.mean([per_case[arm][c]["WT"]["dice_per_seed"][k] for c in cases])) for k in range(n_seeds)]
        seed_spread[arm] = {"wt_dice_per_seed": per_seed, "sd": float(np.std(per_seed, ddof=1)) if n_seeds > 1 else None,
                            "range": float(max(per_seed) - min(per_seed))}
    summary: dict[str, Any] = {}
    for arm in scored:
        summary[arm] = {region: {"dice": describe([per_case[arm][c][region]["dice"] for c in cases]),
                                 "hd95_mm": describe([per_case[arm][c][region]["hd95"] for c in cases])}
                        for region in REGIONS}
    level, resamples = float(config.ci), int(config.bootstrap)

    def compare(arm: str, reference: str, region: str, metric: str, seed: int) -> dict[str, Any]:
        a = [per_case[arm][c][region][metric] for c in cases]
        b = [per_case[reference][c][region][metric] for c in cases]
        entry = paired_comparison(a, b, level=level, resamples=resamples, seed=seed)
        entry["per_case"] = {c: float(x - y) for c, x, y in zip(cases, a, b)}
        return entry

    # The gate: the real-only segmenter against the better FLAIR-threshold baseline, WT Dice.
    best_baseline = max(BASELINES, key=lambda b: summary[b]["WT"]["dice"]["mean"] or -1.0)
    gate = None
    if "real" in arms:
        gate = compare("real", best_baseline, "WT", "dice", config.seed)
        gate.update({"baseline": best_baseline, "passed": bool((gate["mean_difference"] or 0.0) > 0
                                                               and gate["wins"] > gate["losses"])})
    # Two families of comparisons against arm 1 (WT, TC, ET of every other learned arm), each Holm-corrected:
    # the Dice family (the study's claims) and the HD95 family.
    paired: dict[str, Any] = {}
    family: dict[str, dict[str, Any]] = {}
    family_hd95: dict[str, dict[str, Any]] = {}
    for k, arm in enumerate(ARMS[1:], start=1):
        if arm not in arms or "real" not in arms:
            continue
        paired[arm] = {}
        for r, region in enumerate(REGIONS):
            paired[arm][region] = {"dice": compare(arm, "real", region, "dice", config.seed + 17 * k + r),
                                   "hd95": compare(arm, "real", region, "hd95", config.seed + 17 * k + r)}
            family[f"{arm}/{region}"] = paired[arm][region]["dice"]
            family_hd95[f"{arm}/{region}"] = paired[arm][region]["hd95"]
    holm_family(family)
    holm_family(family_hd95)

    # Fidelity
    fid_cases: dict[str, Any] = {}
    for fold in folds:
        fid_cases.update(fold["fidelity"]["cases"])
    fid_summary: dict[str, Any] = {}
    for method in ("model", "class_mean_training"):
        fid_summary[method] = {}
        for modality in MODALITY_TITLES:
            fid_summary[method][modality] = {}
            for region in ("brain", "tumour"):
                fid_summary[method][modality][region] = {
                    metric: describe([fid_cases[c][method][modality][region][metric] for c in fid_cases
                                      if region in fid_cases[c][method][modality]])
                    for metric in ("ssim", "psnr", "mae")}

    # Privacy (a): fidelity gap of each fold's GAN, training cases minus held-out cases (brain SSIM).
    fidelity_gap = []
    for fold in folds:
        row: dict[str, Any] = {"fold": fold["fold"], "train_cases": sorted(fold["fidelity"].get("train_cases", {}))}
        for modality in MODALITY_TITLES:
            seen = [e[modality]["brain"]["ssim"] for e in fold["fidelity"].get("train_cases", {}).values()]
            held = [e["model"][modality]["brain"]["ssim"] for e in fold["fidelity"]["cases"].values()]
            row[modality] = {"train": float(np.mean(seen)) if seen else None,
                             "held_out": float(np.mean(held)) if held else None,
                             "gap": float(np.mean(seen) - np.mean(held)) if seen and held else None}
        fidelity_gap.append(row)

    # Memorisation
    real_pairs = study.real_similarity["pairs"]
    real_values = [p["ncc"] for p in real_pairs]
    threshold = max(real_values) if real_values else None
    memo_cases = []
    for fold in folds:
        for entry in fold["memorisation"]["cases"]:
            flagged = threshold is not None and entry["ncc_nearest"] > threshold
            memo_cases.append(dict({k: v for k, v in entry.items() if k != "ncc_all"}, fold=fold["fold"],
                                   flagged=bool(flagged),
                                   nearest_is_base=entry["nearest_training_case"] == entry["base"]))
    kinds = sorted({e["kind"] for e in memo_cases})
    memorisation = {
        "metric": "normalised cross-correlation of brain-z-scored T1/T1ce/T2/FLAIR on the study grid, mean over "
                  "modalities, over the union of the two brains",
        "real_pairs": dict(describe(real_values), sampled=study.real_similarity["sampled"], pairs=real_pairs),
        "threshold_max_real_pair": threshold,
        "synthetic": {
            "n": len(memo_cases), "nearest_ncc": describe([e["ncc_nearest"] for e in memo_cases]),
            "flagged": sum(e["flagged"] for e in memo_cases),
            "nearest_is_base": sum(e["nearest_is_base"] for e in memo_cases),
            "by_kind": {k: {"n": sum(e["kind"] == k for e in memo_cases),
                            "flagged": sum(e["flagged"] for e in memo_cases if e["kind"] == k),
                            "nearest_ncc": describe([e["ncc_nearest"] for e in memo_cases if e["kind"] == k])}
                        for k in kinds},
        },
        "per_case": memo_cases,
        "reidentification_by_image": image_reidentification(
            [entry for fold in folds for entry in fold["memorisation"]["cases"]]),
    }
    seg_cfg = config.seg_config
    timings = {"wall_seconds_this_run": round(wall_seconds, 1),
               "stage_seconds": study.timings, "stage_computed_this_run": study.computed,
               "compute_seconds_all_stages": round(sum(study.timings.values()), 1)}
    return {
        "kind": "medsynth-study-report",
        "study_version": STUDY_VERSION,
        "command": command,
        "started_utc": started_utc,
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": config.to_json(),
        "data": {
            "cases": [{"id": c.case_id, "convention": c.convention, "sha256": c.sha256,
                       "tumour_voxels_native": c.tumour_voxels,
                       "brain_extent_mm": [round(float(v), 1) for v in c.extent_mm]} for c in inputs.cases],
            "extra_label_maps": [e.to_json() for e in inputs.extras],
        },
        "study_grid": study.grid.to_json(),
        "template": study.template_info,
        "anatomy_model": DEFAULT_ANATOMY_MODEL.to_json(),  # how every case's CSF/GM/WM was derived
        "split": [{"fold": f["fold"], "test": f["test"], "train": f["train"]} for f in folds],
        "design": {
            "arms": {arm: TITLES[arm] for arm in scored},
            "step_budget": seg_cfg.steps,
            "seeds_per_arm": n_seeds,
            "real_exposure": "arm 2 and controls C1 and C2 draw the real-only arm's batch of real patches every step "
                             "and add a batch of the same size from the synthetic (painted, copy-pasted) cases on top",
            "copy_paste_cases_per_fold": {f["fold"]: f["arms"]["real+copypaste"].get("copy_paste_cases")
                                          for f in folds if "real+copypaste" in f["arms"]},
            "learning_curve_cases_per_fold": {f["fold"]: {a: f["arms"][a]["real_cases"] for a in ARMS
                                                          if a.startswith("real@") and a in arms} for f in folds},
            "finetune": {"steps": max(1, int(round(seg_cfg.steps * seg_cfg.finetune_step_fraction))),
                         "pretrain_steps": seg_cfg.steps - max(1, int(round(seg_cfg.steps * seg_cfg.finetune_step_fraction))),
                         "case_fraction": seg_cfg.finetune_case_fraction,
                         "cases_per_fold": {f["fold"]: f["arms"]["synthetic+finetune"]["finetune_cases"] for f in folds
                                            if "synthetic+finetune" in f["arms"]}},
            "synthetic_per_case": int(config.synthetic.get("per_case", 1)),
            "synthetic_kinds": list(config.synthetic.get("kinds", [])),
            "empty_mask_convention": HD95_NOTE,
        },
        "gan": [dict(f["gan"], fold=f["fold"]) for f in folds],
        "segmentation": {"cases": cases, "case_fold": case_fold, "per_case": per_case, "summary": summary,
                         "gate": gate, "paired_vs_real": paired, "seed_spread": seed_spread,
                         "baseline_fits": {f["fold"]: {v: f["baseline"]["variants"][v]["fit"]
                                                       for v in ("threshold", "largest_component")} for f in folds},
                         "training": {arm: [dict(run["training"], fold=f["fold"], seed=run["seed"])
                                            for f in folds for run in f["arms"][arm]["runs"]] for arm in arms}},
        "git": git_state(),
        "fidelity": {"per_case": fid_cases, "summary": fid_summary, "train_vs_held_out_gap": fidelity_gap,
                     "note": "images z-scored inside the real brain mask; SSIM Gaussian sigma 1.5 voxels, data "
                             "range 8; PSNR peak 8; MAE in z units; 'class_mean_training' paints every label "
                             "with its mean z-scored intensity over the fold's training cases (a baseline)"},
        "memorisation": memorisation,
        "synthetic_cases": [{"fold": f["fold"], "count": f["synthetic"]["count"], "cache_key": f["synthetic"]["key"],
                             "provenance": f["synthetic"]["provenance"]} for f in folds],
        "timings": timings,
        "software": software_versions(),
        "device": str(study.device),
        "world_size": study.d.world,
    }


# --- formatting --------------------------------------------------------------------------------


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _pm(stats: dict[str, Any], digits: int = 3) -> str:
    if not stats or stats.get("mean") is None:
        return "n/a"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _signed(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}"


def dice_table(report: dict[str, Any]) -> str:
    summary = report["segmentation"]["summary"]
    lines = ["| Arm | WT Dice | TC Dice | ET Dice |", "|---|---|---|---|"]
    for arm in report["design"]["arms"]:
        lines.append(f"| {TITLES[arm]} | " + " | ".join(_pm(summary[arm][r]["dice"]) for r in REGIONS) + " |")
    return "\n".join(lines)


def hd_table(report: dict[str, Any]) -> str:
    summary = report["segmentation"]["summary"]
    lines = ["| Arm | WT HD95 (mm) | TC HD95 (mm) | ET HD95 (mm) |", "|---|---|---|---|"]
    for arm in report["design"]["arms"]:
        lines.append(f"| {TITLES[arm]} | " + " | ".join(_pm(summary[arm][r]["hd95_mm"], 1) for r in REGIONS) + " |")
    return "\n".join(lines)


def _p(value: Any) -> str:
    return "–" if value is None else (f"{value:.2g}" if value < 0.01 else f"{value:.3f}")


def comparison_cells(e: dict[str, Any], digits: int, lower_is_better: bool = False) -> str:
    """Mean difference (cases where the arm is better ↑ / worse ↓; p, Holm p; interval).

    ``wins`` / ``losses`` count positive / negative differences; for a metric where lower is better
    (HD95) a negative difference is a case the arm does better on.
    """
    if e["interval"] is not None:
        interval = f"[{_signed(e['interval'][0], digits)}, {_signed(e['interval'][1], digits)}]"
    else:
        interval = f"no interval (n < {MIN_N_INTERVAL})" if e["n"] < MIN_N_INTERVAL else "no interval (constant)"
    holm = f", Holm p {_p(e['p_holm'])}" if "p_holm" in e else ""
    better, worse = (e["losses"], e["wins"]) if lower_is_better else (e["wins"], e["losses"])
    return (f"{_signed(e['mean_difference'], digits)} ({better}↑ {worse}↓; p {_p(e['p'])}{holm}; "
            f"{interval})")


def paired_table(report: dict[str, Any], metric: str = "dice") -> str:
    paired = report["segmentation"]["paired_vs_real"]
    name = "Dice" if metric == "dice" else "HD95 (mm)"
    lines = [f"| Arm − arm 1 | WT {name} | TC {name} | ET {name} |", "|---|---|---|---|"]
    digits = 3 if metric == "dice" else 1
    for arm in paired:
        lines.append(f"| {TITLES[arm]} | " + " | ".join(comparison_cells(paired[arm][r][metric], digits,
                                                                        lower_is_better=metric == "hd95")
                                                       for r in REGIONS) + " |")
    return "\n".join(lines)


def paired_legend(report: dict[str, Any]) -> str:
    """How the paired tables were computed, stated from the numbers (exact or Monte Carlo p, intervals)."""
    entries = [e[m] for arm in report["segmentation"]["paired_vs_real"].values() for e in arm.values()
               for m in ("dice", "hd95")]
    exact = all(e.get("p_exact", False) for e in entries)
    n = len(report["segmentation"]["cases"])
    test = ("exact sign-flip p (all 2^n sign patterns)" if exact else
            "sign-flip p (Monte Carlo estimate from 2^20 sign patterns where n is too large to count them all)")
    intervals = (f"{int(round(100 * report['config']['ci']))} % BCa bootstrap interval of the mean difference"
                 if n >= MIN_N_INTERVAL else f"no interval: n = {n} is below {MIN_N_INTERVAL} cases, where a "
                                             "bootstrap interval covers far less than its level")
    return (f"Paired difference to arm 1 on the same {n} held-out cases (learned arms: per-case mean over the "
            f"seeds, so n counts cases, not seeds): mean (cases where the arm is better ↑ / worse ↓; {test}; "
            f"Holm-corrected within each table's family of {len(entries) // 2} comparisons; {intervals}). "
            "Positive Dice differences favour the arm:")


def seed_table(report: dict[str, Any]) -> str:
    spread = report["segmentation"]["seed_spread"]
    lines = ["| Arm | WT Dice per seed (mean over held-out cases) | SD over seeds | range |", "|---|---|---|---|"]
    for arm in spread:
        e = spread[arm]
        lines.append(f"| {TITLES[arm]} | {', '.join(_f(v) for v in e['wt_dice_per_seed'])} | {_f(e['sd'])} | "
                     f"{_f(e['range'])} |")
    return "\n".join(lines)


def fidelity_gap_table(report: dict[str, Any]) -> str:
    lines = ["| Fold | " + " | ".join(f"{t} SSIM train / held-out (gap)" for t in MODALITY_TITLES.values()) + " |",
             "|---|" + "---|" * len(MODALITY_TITLES)]
    for row in report["fidelity"]["train_vs_held_out_gap"]:
        cells = [f"{_f(row[m]['train'])} / {_f(row[m]['held_out'])} ({_signed(row[m]['gap'])})" for m in MODALITY_TITLES]
        lines.append(f"| {row['fold']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_case_table(report: dict[str, Any]) -> str:
    seg = report["segmentation"]
    arms = list(report["design"]["arms"])
    header = "| Case (fold) | " + " | ".join(f"{TITLES[a].split('.')[0]}" for a in arms) + " |"
    lines = ["Dice WT / TC / ET per held-out case (learned arms: mean over seeds):", "", header,
             "|---|" + "---|" * len(arms)]
    for c in seg["cases"]:
        cells = [" / ".join(_f(seg["per_case"][a][c][r]["dice"], 2) for r in REGIONS) for a in arms]
        lines.append(f"| {c} ({seg['case_fold'][c]}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fidelity_table(report: dict[str, Any]) -> str:
    s = report["fidelity"]["summary"]
    lines = ["| Modality | SSIM brain | PSNR brain (dB) | MAE brain (z) | SSIM tumour | PSNR tumour (dB) | "
             "MAE tumour (z) | SSIM brain, class-mean baseline |", "|---|---|---|---|---|---|---|---|"]
    for m, title in MODALITY_TITLES.items():
        model, base = s["model"][m], s["class_mean_training"][m]
        lines.append(f"| {title} | {_pm(model['brain']['ssim'])} | {_pm(model['brain']['psnr'], 2)} | "
                     f"{_pm(model['brain']['mae'])} | {_pm(model['tumour']['ssim'])} | "
                     f"{_pm(model['tumour']['psnr'], 2)} | {_pm(model['tumour']['mae'])} | "
                     f"{_pm(base['brain']['ssim'])} |")
    return "\n".join(lines)


def memorisation_table(report: dict[str, Any]) -> str:
    memo = report["memorisation"]
    rp, syn = memo["real_pairs"], memo["synthetic"]
    lines = ["| Comparison | n | min | median | max | flagged |", "|---|---|---|---|---|---|",
             f"| distinct real cases (pairs) | {rp['n']} | {_f(rp['min'])} | {_f(rp['median'])} | {_f(rp['max'])} | – |",
             f"| synthetic → nearest training case (all) | {syn['n']} | {_f(syn['nearest_ncc']['min'])} | "
             f"{_f(syn['nearest_ncc']['median'])} | {_f(syn['nearest_ncc']['max'])} | {syn['flagged']} |"]
    for kind, entry in syn["by_kind"].items():
        d = entry["nearest_ncc"]
        lines.append(f"| … built by '{kind}' | {entry['n']} | {_f(d['min'])} | {_f(d['median'])} | {_f(d['max'])} | "
                     f"{entry['flagged']} |")
    return "\n".join(lines)


# --- the verdict: the report's opening lines and the console's last ---------------------------------------------


def _gate_state(gate: dict[str, Any] | None) -> str:
    """'not evaluated', 'FAILED', 'passed' or 'not shown' (passed on the point estimate, p >= 0.05)."""
    if gate is None:
        return "not evaluated"
    if not gate["passed"]:
        return "FAILED"
    return "passed" if gate["p"] is not None and gate["p"] < 0.05 else "not shown"


def _dice_family(seg: dict[str, Any]) -> tuple[list[tuple[str, str, dict[str, Any]]],
                                                list[tuple[str, str, dict[str, Any]]]]:
    """The Dice comparisons with arm 1, and those of them with a Holm-corrected p below 0.05."""
    family = [(arm, r, seg["paired_vs_real"][arm][r]["dice"]) for arm in seg["paired_vs_real"] for r in REGIONS]
    return family, [(arm, r, e) for arm, r, e in family if e["p_holm"] is not None and e["p_holm"] < 0.05]


def _detectable(seg: dict[str, Any]) -> dict[str, Any] | None:
    """The smallest true WT Dice difference the run detects with 80 % power, from the median observed SD of the
    paired WT differences: at alpha 0.05 and at Holm's first step (alpha 0.05 / the family's size)."""
    from .statistics import minimum_detectable_difference

    family, _ = _dice_family(seg)
    n = len(seg["cases"])
    sds = [e["sd_difference"] for _, r, e in family if r == "WT" and e["sd_difference"]]
    if not sds or n < 2:
        return None
    sd = float(np.median(sds))
    return {"n": n, "sd": sd, "m": len(family), "mdd": minimum_detectable_difference(sd, n),
            "mdd_holm": minimum_detectable_difference(sd, n, alpha=0.05 / len(family))}


def _differences(significant: list[tuple[str, str, dict[str, Any]]], limit: int | None = None) -> str:
    shown = significant if limit is None else significant[:limit]
    text = "; ".join(f"{TITLES[arm]} {r} {_signed(e['mean_difference'])} "
                     f"({'better' if (e['mean_difference'] or 0) > 0 else 'worse'}, Holm p {_p(e['p_holm'])})"
                     for arm, r, e in shown)
    return text + (f"; and {len(significant) - len(shown)} more" if len(shown) < len(significant) else "")


def verdict_lines(report: dict[str, Any], *, console: bool = False) -> list[str]:
    """What the study showed, in a few sentences: the gate, the arms that differ from arm 1 after Holm correction
    (or that none does), and the smallest difference the run can detect.  ``console``: shorter, plain text."""
    seg = report["segmentation"]
    summary, gate = seg["summary"], seg["gate"]
    state = _gate_state(gate)
    family, significant = _dice_family(seg)
    lines: list[str] = []
    if gate is None:
        lines.append("Segmenter gate: not evaluated (the real-only arm has no result yet).")
    else:
        real = _f(summary["real"]["WT"]["dice"]["mean"])
        base = f"{TITLES[gate['baseline']]} {_f(summary[gate['baseline']]['WT']['dice']['mean'])}"
        numbers = (f"real-only WT Dice {real} vs {base}, p {_p(gate['p'])}" if console else
                   f"real-only WT Dice {real} vs {base}, difference {_signed(gate['mean_difference'])}, "
                   f"better on {gate['wins']} and worse on {gate['losses']} cases, p {_p(gate['p'])}")
        meaning = {"FAILED": "the segmenter does not beat a FLAIR threshold, so no arm comparison can show what "
                             "synthetic data adds",
                   "not shown": "better on the point estimate only (p >= 0.05): the segmenter is not shown to beat "
                                "the FLAIR threshold, so the arm comparisons support no claim",
                   "passed": "the segmenter beats the FLAIR threshold, so the arm comparisons can show what "
                             "synthetic data adds"}[state]
        label = "passed on the point estimate only, not shown" if state == "not shown" else state
        lines.append(f"Segmenter gate: {label} ({numbers}): {meaning}.")
    if not family:
        lines.append("No arm is compared with real-only yet (the arms have no results in every fold).")
    elif not significant:
        lines.append(f"No arm differs from real-only after Holm correction (0 of {len(family)} Dice comparisons "
                     "reach p < 0.05).")
    else:
        caveat = "" if state == "passed" else " (the gate did not pass: no claim rests on them)"
        lines.append(f"{len(significant)} of {len(family)} Dice comparisons with real-only reach p < 0.05 after "
                     f"Holm correction{caveat}: {_differences(significant, 4 if console else None)}.")
    mdd = _detectable(seg)
    if mdd is not None:
        lines.append(f"Smallest detectable difference: {mdd['mdd']:.3f} WT Dice at alpha 0.05 and "
                     f"{mdd['mdd_holm']:.3f} at Holm's first step (alpha 0.05 / {mdd['m']}), with 80 % power and "
                     f"n = {mdd['n']} held-out cases"
                     + ("." if console else "; smaller true differences are below what this run can resolve."))
    return lines


def discussion(report: dict[str, Any]) -> str:
    """Statements computed from the measured numbers only (no prediction of unmeasured results)."""
    seg = report["segmentation"]
    summary = seg["summary"]
    n = len(seg["cases"])
    gate = seg["gate"]
    lines: list[str] = []
    if gate is None:
        lines.append("**Segmenter gate: not evaluated** (the real-only arm has no result yet).")
    else:
        verdict = _gate_state(gate)
        if verdict == "not shown":
            verdict = ("passed on the point estimate only; not shown (the difference is not significant, so the "
                       "segmenter is not shown to beat the threshold)")
        diff = gate["mean_difference"]
        lines.append(
            f"**Segmenter gate: {verdict}.** Real-only WT Dice {_f(summary['real']['WT']['dice']['mean'])} against "
            f"{TITLES[gate['baseline']]} {_f(summary[gate['baseline']]['WT']['dice']['mean'])} on the same {n} "
            f"held-out cases: difference {_signed(diff, 4 if diff is not None and abs(diff) < 0.001 else 3)}, "
            f"better on {gate['wins']} and worse on {gate['losses']} cases (sign-flip p {_p(gate['p'])}; the gate "
            "asks for a positive mean difference and more cases better than worse; 'passed' without 'not shown' "
            "also needs p < 0.05).")
        if not gate["passed"]:
            lines.append("A segmenter that does not beat a FLAIR threshold cannot show what synthetic data adds; the "
                         "arm comparisons below are reported but do not support a claim.")
    family, significant = _dice_family(seg)
    lines.append(f"Of {len(family)} Dice comparisons with arm 1 (Holm-corrected), {len(significant)} reach p < 0.05"
                 + (": " + "; ".join(f"{TITLES[arm]} {r} {_signed(e['mean_difference'])}" for arm, r, e in significant)
                    if significant else "") + ".")
    detectable = _detectable(seg)
    if detectable is not None:
        sd, mdd, m, mdd_holm = detectable["sd"], detectable["mdd"], detectable["m"], detectable["mdd_holm"]
        lines.append(f"With n = {n} held-out cases and the median observed SD of the paired WT Dice differences "
                     f"({sd:.3f}), a paired test at alpha 0.05 detects a true difference of {mdd:.3f} Dice with "
                     f"80 % power, and {mdd_holm:.3f} at alpha 0.05 / {m} (the first step of Holm's correction "
                     f"over the {m} Dice comparisons); smaller differences are below what this run can resolve.")
    spread = seg["seed_spread"].get("real")
    if spread is not None and spread["sd"] is not None:
        lines.append(f"Training-seed spread of the real-only arm: mean WT Dice per seed "
                     f"{', '.join(_f(v) for v in spread['wt_dice_per_seed'])} (range {_f(spread['range'])}).")
    return " ".join(lines)


def partial_note(partial: dict[str, Any]) -> str:
    """The banner of a partial report: what it leaves out (folds, arms, seeds not finished yet)."""
    lines = [f"> **PARTIAL REPORT — the study has not finished.** {partial['note']}"]
    for fold in partial["folds"]:
        missing = [f"{TITLES.get(arm, arm)} ({done} of {partial['seeds']} seeds)"
                   for arm, done in fold["arms_seeds_done"].items() if done < partial["seeds"]]
        stages = [name for name, done in fold["stages"].items() if not done]
        state = "included" if fold["included"] else "left out"
        lines.append(f"> - fold {fold['fold']} ({state}): " + ("; ".join(
            ([f"missing stages: {', '.join(stages)}"] if stages else [])
            + ([f"arms not finished: {', '.join(missing)}"] if missing else [])) or "complete"))
    return "\n".join(lines)


def cached_note(timings: dict[str, Any]) -> str:
    cached = [name for name, computed in timings.get("stage_computed_this_run", {}).items() if not computed]
    if not cached:
        return "none"
    return f"{len(cached)} of {len(timings['stage_computed_this_run'])}"


def render_markdown(report: dict[str, Any], figures: dict[str, str]) -> str:
    cfg = report["config"]
    seg = report["segmentation"]
    design = report["design"]
    grid = report["study_grid"]
    gan = cfg["gan"]
    segc = cfg["segmenter"]
    n_cases = len(report["data"]["cases"])
    timings = report["timings"]
    out = [f"# MedSynth study report — config `{cfg['name']}`", ""]
    if report.get("partial"):
        out += [partial_note(report["partial"]), ""]
    # The verdict first: the tables below list every arm's Dice, which alone would make one look like a winner.
    out += ["## Verdict", ""] + [f"- {line}" for line in verdict_lines(report)] + [""]
    if cfg.get("description"):
        out += [cfg["description"], ""]
    out += [
        "Replication of the experiments of Shin et al. (SASHIMI 2018): tumour segmentation trained on real, "
        "real + synthetic, synthetic-only and synthetic + fine-tuned data, against a FLAIR-threshold baseline "
        "(the gate), a class-mean control, a copy-paste control (real tumours pasted into other real training "
        "brains, no GAN) and a learning curve; fidelity of the synthetic images. Produced by "
        "`medsynth study`; every number below is in `report.json`.", "",
        "## Setup", "",
        "| Item | Value |", "|---|---|",
        f"| Real cases | {n_cases} ({', '.join(c['id'] for c in report['data']['cases'])}) |",
        f"| Extra tumour label maps (synthetic arms only) | {len(report['data']['extra_label_maps'])} |",
        f"| Split | {len(report['split'])} fold(s) by case, seed {cfg['seed']}; each case held out once |",
        f"| Study grid | {grid['spacing_mm']:g} mm isotropic, {' × '.join(str(s) for s in grid['size'])} voxels "
        "around each brain |",
        f"| GAN (per fold, training cases only) | pix2pix 3D, channels {gan.get('network', {}).get('channels')}, "
        f"{gan.get('steps')} steps, patch {gan.get('patch_size')}³, adversarial {gan.get('adversarial', 'lsgan')} |",
        f"| Synthetic cases | {design['synthetic_per_case']} per real training case, edits cycling "
        f"{', '.join(design['synthetic_kinds'])} |",
        (f"| Segmenter | nnU-Net v2 ({segc.get('nnunet_configuration', '3d_fullres')}, planned by nnU-Net on each "
         f"arm's training cases), regions WT/TC/ET, {segc.get('iterations_per_epoch', 250)} iterations per epoch |"
         if segc.get("engine") == "nnunetv2" else
         f"| Segmenter | MONAI SegResNet, {segc.get('init_filters', 8)} initial filters, sigmoid WT/TC/ET, Dice + CE, "
         f"patch {segc.get('patch_size', 48)}³, batch {segc.get('batch_size', 2)}, sliding-window inference |"),
        f"| Step budget per arm | {design['step_budget']} (arm 4: {design['finetune']['pretrain_steps']} synthetic + "
        f"{design['finetune']['steps']} fine-tuning on {int(100 * design['finetune']['case_fraction'])} % of the "
        f"real training cases; {design['real_exposure']}) |",
        f"| Seeds per learned arm | {design['seeds_per_arm']} |",
        f"| Git commit | {report['git'].get('commit')} ({'with local changes' if report['git'].get('dirty') else 'clean'}) |",
        f"| Device | {report['device']} (world size {report['world_size']}) |",
        f"| Total time | {timings['wall_seconds_this_run'] / 60:.1f} min wall time of this run; "
        f"{timings['compute_seconds_all_stages'] / 60:.1f} min summed over all stages (stages this run found "
        f"cached count with the time they took when computed: {cached_note(timings)}) |",
        "",
        "## Segmentation of the held-out real cases", "",
        f"Dice (mean ± standard deviation over the {len(seg['cases'])} held-out cases; 1 is perfect):", "",
        dice_table(report), "",
        "95th-percentile Hausdorff distance (lower is better):", "", hd_table(report), "",
        paired_legend(report), "",
        paired_table(report, "dice"), "",
        "The same for HD95 (negative differences favour the arm):", "", paired_table(report, "hd95"), "",
        "Training-seed spread:", "", seed_table(report), "",
        per_case_table(report), "",
        design["empty_mask_convention"], "",
        "## Synthesis fidelity on the held-out cases", "",
        "Each held-out case's own label map was synthesised by its fold's GAN (which never saw the case) and "
        f"compared with its real images on the {grid['spacing_mm']:g} mm study grid (z-scored inside the brain; "
        "mean ± std over cases). The last column is a baseline that paints every label with its mean training "
        "intensity: a GAN that does not beat it renders little beyond the label classes.", "",
        fidelity_table(report), "",
        "Train vs held-out fidelity of each fold's GAN (brain SSIM on as many of its training cases as it has "
        "held-out cases; a GAN that memorised its training cases scores clearly higher on them):", "",
        fidelity_gap_table(report), "",
        "## Nearest training case of each synthetic case (image similarity)", "",
        f"Similarity: {report['memorisation']['metric']}. 'flagged': closer to a training case than the closest "
        f"pair of distinct real cases ({_f(report['memorisation']['threshold_max_real_pair'])}). This is a "
        "nearest-neighbour description, not a privacy test: the re-identification attack "
        "(`python -m MedSynthLib.study.reidentification`) is.", "",
        memorisation_table(report), "",
        "Re-identification by image: each synthetic case's nearest real case (the same similarity, among the "
        "fold's training cases, on the study grid: the BraTS cases share one atlas space) against the patient "
        "whose brain it was built on. A case built on a patient's brain (its tumour moved, or another's inserted) "
        "is expected to be found, which shows the attack works. A case in the template brain has no source "
        "brain to find by image, but its tumour is a training patient's ('template' inserts one), and a tumour's "
        "shape identifies its patient wherever it is placed: the tumour-shape channel of "
        "`python -m MedSynthLib.study.reidentification` (docs/study/reidentification.md, the same edit on all 27 "
        "cases) finds that patient after a similarity alignment. Only a parametric tumour in the template is "
        "anonymous.", "",
        reidentification_table(report), "",
        "## Discussion", "", discussion(report), "",
        "## Figures", "",
    ]
    for title, path in figures.items():
        out += [f"![{title}]({path})", ""]
    stages = timings["stage_seconds"]
    out += ["## Timings", "", "| Stage | Seconds |", "|---|---|"]
    out += [f"| {name} | {seconds:.1f} |" for name, seconds in stages.items()]
    out += ["", "## Reproduce", "", f"```\n{report['command']}\n```", "",
            f"Software: {', '.join(f'{k} {v}' for k, v in report['software'].items())}.", "",
            "Data: real BraTS 2021 / 2020 cases (Baid et al. 2021; Menze et al. 2015; Bakas et al. 2017); the "
            "sha256 of every input file set is in report.json."]
    return "\n".join(out) + "\n"


def write_report(report: dict[str, Any], results: dict[str, Any], study: Any, report_dir: Path, *,
                 overwrite: bool) -> Path:
    from ..schema.volume_io import atomic_directory, write_json
    from .figures import figure_dice, figure_fidelity, figure_memorisation, figure_montage, figure_synthetic_examples

    with atomic_directory(report_dir, overwrite=overwrite) as tmp:
        (tmp / "figures").mkdir()
        figures: dict[str, str] = {}
        figure_dice(report, tmp / "figures" / "dice_boxplot.png")
        figures["Dice per arm and region"] = "figures/dice_boxplot.png"
        figure_fidelity(report, tmp / "figures" / "fidelity.png")
        figures["Fidelity per modality"] = "figures/fidelity.png"
        case_id = figure_montage(study, results, tmp / "figures" / "montage_real_vs_synthetic.png")
        figures[f"Real vs synthetic, {case_id}"] = "figures/montage_real_vs_synthetic.png"
        figure_synthetic_examples(study, results, tmp / "figures" / "synthetic_examples.png")
        figures["Synthetic training cases"] = "figures/synthetic_examples.png"
        figure_memorisation(report, tmp / "figures" / "memorisation.png")
        figures["Memorisation check"] = "figures/memorisation.png"
        report["figures"] = figures
        write_json(report, tmp / "report.json")
        (tmp / "report.md").write_text(render_markdown(report, figures))
    return report_dir
