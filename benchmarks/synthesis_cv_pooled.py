"""Pool the per-fold reports of ``benchmarks/synthesis_cv.py`` into one cross-validated table.

Every case is held out in exactly one fold, so the pooled numbers are means over all held-out cases
(each case scored by the model that never saw it), beside each fold's own mean and the class-mean
baselines of the same reports.  Writes ``pooled.json`` and ``pooled.md``.

Usage (from the repository root; ``REPORT=LABEL``: a fold's report.json and the model label in it)::

    python benchmarks/synthesis_cv_pooled.py --name "SPADE 64^3" \\
        docs/synthesis_cv/fold0_step6000/report.json=spade64_f0 \\
        docs/synthesis_cv/fold1_step6000/report.json=spade64_f1 \\
        docs/synthesis_cv/fold2_step6000/report.json=spade64_f2 -o docs/synthesis_cv/pooled

``--against OTHER/pooled.json`` adds the case-by-case comparison with another recipe pooled over the same
cases (mean paired difference, cases better and worse, exact sign-flip p).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from MedSynthLib.evaluation.evaluate import class_signal_summary, spread_text  # noqa: E402
from MedSynthLib.schema.labels import MODALITIES  # noqa: E402
from MedSynthLib.schema.volume_io import write_json  # noqa: E402

ROWS = (("model", "the model"), ("class_mean_training", "class means of the fold's training cases"),
        ("class_mean_oracle", "class means of the case itself"))


def case_scores(entry: dict[str, Any], key: str) -> dict[str, float]:
    """One held-out case's brain SSIM / PSNR and tumour SSIM (means over the four contrasts), and per contrast."""
    return fidelity_summary(entry[key])


def fidelity_summary(scores: dict[str, Any]) -> dict[str, float]:
    """The compared quantities of one case's fidelity per contrast (``metrics.fidelity`` by modality, as reports and
    a training run's recorded validation hold it): brain SSIM / PSNR and tumour SSIM, means over the four contrasts,
    and each contrast's brain SSIM."""
    out = {"brain_ssim": float(np.mean([scores[m]["brain"]["ssim"] for m in MODALITIES])),
           "brain_psnr": float(np.mean([scores[m]["brain"]["psnr"] for m in MODALITIES]))}
    tumour = [scores[m]["tumour"]["ssim"] for m in MODALITIES if "tumour" in scores[m]]
    if tumour:
        out["tumour_ssim"] = float(np.mean(tumour))
    out.update({f"{m}_ssim": float(scores[m]["brain"]["ssim"]) for m in MODALITIES})
    return out


def pool(folds: list[tuple[Path, str]]) -> dict[str, Any]:
    """Per-case scores from every fold's report, pooled; raises SystemExit on a case held out twice."""
    cases: dict[str, dict[str, Any]] = {}
    per_fold: list[dict[str, Any]] = []
    rules: dict[str, dict[str, int]] = {}
    checkerboard: dict[str, list[float]] = {m: [] for m in MODALITIES}
    signalled: list[dict[str, Any]] = []  # cases whose report has the class signal (reports since session 34)
    for path, label in folds:
        report = json.loads(path.read_text())
        if label not in report["models"]:
            raise SystemExit(f"{path}: no model {label!r} in it (it has {', '.join(report['models'])})")
        result = report["models"][label]
        fold_cases = []
        signalled.extend(entry for entry in result["cases"] if "class_signal" in entry)
        for entry in result["cases"]:
            name = entry["case"]
            if name in cases:
                raise SystemExit(f"{path}: case {name} is held out in two folds")
            cases[name] = {"fold": report["fold"], **{key: case_scores(entry, key) for key, _ in ROWS if key in entry}}
            fold_cases.append(name)
            for m in MODALITIES:
                checkerboard[m].append(float(entry["checkerboard_ratio"][m]))
        for rule, counts in result["contrast_rules"].items():
            total = rules.setdefault(rule, {"checked": 0, "synthetic_passed": 0, "real_passed": 0})
            for k in total:
                total[k] += int(counts[k])
        per_fold.append({"fold": report["fold"], "label": label, "report": str(path), "cases": fold_cases,
                         "model": _mean([cases[c]["model"] for c in fold_cases])})
    pooled = {key: _mean([c[key] for c in cases.values() if key in c]) for key, _ in ROWS}
    spread = {metric: float(np.std([c["model"][metric] for c in cases.values()], ddof=1))
              for metric in ("brain_ssim", "brain_psnr")} if len(cases) > 1 else {}
    out = {"cases": cases, "folds": per_fold, "pooled": pooled, "case_sd": spread, "contrast_rules": rules,
           "checkerboard_median": {m: float(np.median(v)) for m, v in checkerboard.items()}}
    if signalled:
        out["class_signal"] = {"cases": len(signalled), **class_signal_summary(signalled)}
    return out


COMPARED = (("brain_ssim", "brain SSIM", 3), ("brain_psnr", "brain PSNR (dB)", 2), ("tumour_ssim", "tumour SSIM", 3),
            *((f"{m}_ssim", f"brain SSIM, {m.upper() if m != 't1ce' else 'T1ce'}", 3) for m in MODALITIES))


def compare(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Our model minus theirs, case by case (both pooled over the same held-out cases): per metric the mean
    paired difference, wins and losses, and the exact sign-flip p (``MedSynthLib.study.statistics``)."""
    from MedSynthLib.study.statistics import paired_comparison

    if set(ours["cases"]) != set(theirs["cases"]):
        raise SystemExit("the two recipes were not scored on the same held-out cases: "
                         f"{sorted(set(ours['cases']) ^ set(theirs['cases']))}")
    names = sorted(ours["cases"])
    return {metric: paired_comparison([ours["cases"][n]["model"][metric] for n in names],
                                      [theirs["cases"][n]["model"][metric] for n in names])
            for metric, _, _ in COMPARED if all(metric in ours["cases"][n]["model"] for n in names)}


def comparison_markdown(ours: str, theirs: str, result: dict[str, dict[str, Any]]) -> str:
    lines = [f"## {ours} minus {theirs}, case by case", "",
             "| metric | mean difference | SD | cases better, worse | sign-flip p |", "|---|---|---|---|---|"]
    for metric, title, digits in COMPARED:
        if metric in result:
            c = result[metric]
            kind = "exact" if c["p_exact"] else "Monte Carlo"
            lines.append(f"| {title} | {c['mean_difference']:+.{digits}f} | {c['sd_difference']:.{digits}f} | "
                         f"{c['wins']} better, {c['losses']} worse (of {c['n']}) | {c['p']:.2g} ({kind}) |")
    return "\n".join(lines) + "\n"


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for row in rows for k in row})
    return {k: float(np.mean([row[k] for row in rows if k in row])) for k in keys}


def markdown(name: str, result: dict[str, Any], command: str) -> str:
    n = len(result["cases"])
    lines = [f"# {name}: cross-validated held-out fidelity ({n} cases, {len(result['folds'])} folds)", "",
             f"Command: `{command}`", "",
             "Each case is scored by the fold model that did not train on it; means over cases of the "
             "four contrasts' brain SSIM / PSNR (z-scored in the brain, Gaussian SSIM, PSNR peak 8).", "",
             "| | brain SSIM | brain PSNR (dB) | tumour SSIM | T1 | T1ce | T2 | FLAIR |", "|---|---|---|---|---|---|---|---|"]
    for key, label in ROWS:
        s = result["pooled"][key]
        lines.append(f"| {label}, pooled | {s['brain_ssim']:.3f} | {s['brain_psnr']:.2f} | "
                     f"{s.get('tumour_ssim', float('nan')):.3f} | "
                     + " | ".join(f"{s[f'{m}_ssim']:.3f}" for m in MODALITIES) + " |")
    for fold in result["folds"]:
        s = fold["model"]
        lines.append(f"| the model, fold {fold['fold']} ({len(fold['cases'])} cases) | {s['brain_ssim']:.3f} | "
                     f"{s['brain_psnr']:.2f} | {s.get('tumour_ssim', float('nan')):.3f} | "
                     + " | ".join(f"{s[f'{m}_ssim']:.3f}" for m in MODALITIES) + " |")
    sd = result["case_sd"]
    if sd:
        lines += ["", f"Spread over cases (SD): brain SSIM {sd['brain_ssim']:.3f}, PSNR {sd['brain_psnr']:.2f} dB."]
    cb = result["checkerboard_median"]
    lines += ["", "Checkerboard ratio (median over cases; real = 1): "
              + ", ".join(f"{m.upper() if m != 't1ce' else 'T1ce'} {cb[m]:.2f}" for m in MODALITIES) + ".", "",
              "| contrast rule | synthetic held | real held | of |", "|---|---|---|---|"]
    for rule, c in result["contrast_rules"].items():
        lines.append(f"| {rule} | {c['synthetic_passed']} | {c['real_passed']} | {c['checked']} |")
    total = {k: sum(c[k] for c in result["contrast_rules"].values()) for k in ("synthetic_passed", "real_passed",
                                                                                 "checked")}
    lines.append(f"| all | {total['synthetic_passed']} | {total['real_passed']} | {total['checked']} |")
    signal = result.get("class_signal")
    if signal:
        lines += ["", f"Class signal ({signal['cases']} cases): each class's median z, mean over cases; synthetic minus "
                  "real with each image z-scored on its own (as the metrics and the rules read it) and with the "
                  "synthetic image in the patient's frame (`evaluate`); spread: the synthetic image's spread over the "
                  "brain in that frame as a fraction of the real one's.", "",
                  "| contrast | class | cases | real | synthetic minus real, own z | in the patient's frame | "
                  "mean absolute, patient's frame |", "|---|---|---|---|---|---|---|"]
        for m in MODALITIES:
            if m not in signal:
                continue
            for name, row in signal[m]["classes"].items():
                lines.append(f"| {m} | {name} | {row['cases']} | {row['real']:+.2f} | {row['synthetic_minus_real']:+.2f} | "
                             f"{row['patient_frame_minus_real']:+.2f} | {row['patient_frame_abs_difference']:.2f} |")
            lines.append(f"| {m} | spread {spread_text(signal[m]['brain_spread_ratio'])} | | | | | |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", help="REPORT.json=LABEL, one per fold")
    parser.add_argument("--name", required=True, help="the recipe's name in the table's title")
    parser.add_argument("--against", type=Path, help="another recipe's pooled.json on the same cases: adds the "
                        "case-by-case comparison with it")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    folds = []
    for item in args.reports:
        path, sep, label = item.rpartition("=")
        if not sep or not Path(path).is_file():
            parser.error(f"{item}: give REPORT.json=LABEL with an existing report")
        folds.append((Path(path), label))
    result = pool(folds)
    if args.against is not None and not args.against.is_file():
        parser.error(f"--against {args.against}: no such pooled.json")
    other = json.loads(args.against.read_text()) if args.against else None
    if other is not None:
        result["against"] = {"pooled": str(args.against), "name": other["name"], "comparison": compare(result, other)}
    command = shlex.join(["python", "benchmarks/synthesis_cv_pooled.py", *sys.argv[1:]])
    args.output.mkdir(parents=True, exist_ok=True)
    write_json({"command": command, "name": args.name, **result}, args.output / "pooled.json", overwrite=True)
    text = markdown(args.name, result, command)
    if other is not None:
        text += "\n" + comparison_markdown(args.name, other["name"], result["against"]["comparison"])
    (args.output / "pooled.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
