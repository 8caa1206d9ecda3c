"""Two recipes' fold models compared case by case on the validation each run recorded when it finished.

Every cross-validation run of ``medsynth train --fold K`` scores its fold's held-out cases at its last step and
records the scores per case in its model's ``config.json`` (``validation.per_case``: the network's output against
the case's own normalised images, with a zero appearance code). Two recipes trained on the same
folds are therefore compared in seconds, without synthesising again: per case, the mean over the contrasts of the
brain SSIM, the brain PSNR and the tumour SSIM, and each contrast's brain SSIM; the paired differences (recipe minus
reference) with the exact sign-flip test of ``MedSynthLib.study.statistics``. ``benchmarks/synthesis_cv.py`` remains
the full held-out evaluation (a seed's appearance, the contrast rules, the class signal, montages).

Usage (from the repository root)::

    python benchmarks/recorded_validation_compare.py \\
        --recipe RUNS/new_f0/model RUNS/new_f1/model RUNS/new_f2/model \\
        --reference RUNS/default_f0/model RUNS/default_f1/model RUNS/default_f2/model --json OUT.json
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
sys.path.insert(0, str(REPO / "benchmarks"))

from MedSynthLib.schema.volume_io import write_json  # noqa: E402
from MedSynthLib.study.statistics import paired_comparison  # noqa: E402
from synthesis_cv_pooled import fidelity_summary  # noqa: E402


def case_scores(model: Path) -> list[dict[str, float]]:
    """Per held-out case of one fold model, in the order its run scored them: the compared quantities."""
    path = Path(model) / "config.json"
    if not path.is_file():
        raise SystemExit(f"{model}: no config.json (the run has not exported its model yet?)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SystemExit(f"{path} is not valid JSON: {error}") from None
    validation = config.get("validation") or {}
    if not validation.get("per_case"):
        raise SystemExit(f"{model}: its config.json records no validation per case (trained without held-out cases?)")
    return [fidelity_summary(case) for case in validation["per_case"]]


def compare(recipe: list[Path], reference: list[Path]) -> dict[str, Any]:
    """Paired comparison over every held-out case of the folds (recipe minus reference), per quantity."""
    if len(recipe) != len(reference):
        raise SystemExit("give one reference fold model for each of the recipe's fold models")
    new: list[dict[str, float]] = []
    old: list[dict[str, float]] = []
    for a, b in zip(recipe, reference):
        rows_a, rows_b = case_scores(a), case_scores(b)
        if len(rows_a) != len(rows_b):
            raise SystemExit(f"{a} and {b} recorded different numbers of held-out cases")
        new += rows_a
        old += rows_b
    out: dict[str, Any] = {"cases": len(new), "quantities": {}}
    for key in new[0]:
        pairs = [(x[key], y[key]) for x, y in zip(new, old) if key in x and key in y]
        comparison = paired_comparison([p[0] for p in pairs], [p[1] for p in pairs])
        out["quantities"][key] = {"recipe": float(np.mean([p[0] for p in pairs])),
                                  "reference": float(np.mean([p[1] for p in pairs])), **comparison}
    return out


def lines(result: dict[str, Any]) -> list[str]:
    text = [f"{result['cases']} held-out cases, recipe minus reference"]
    for key, row in result["quantities"].items():
        text.append(f"  {key:<12} {row['recipe']:.4f} vs {row['reference']:.4f}  {row['mean_difference']:+.4f}  "
                    f"better on {row['wins']}, worse on {row['losses']}  p {row['p']:.2g}")
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, nargs="+", required=True, help="the recipe's fold models, fold order")
    parser.add_argument("--reference", type=Path, nargs="+", required=True, help="the reference's, same folds")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    result = compare(args.recipe, args.reference)
    result["command"] = shlex.join(["python", "benchmarks/recorded_validation_compare.py", *sys.argv[1:]])
    result["recipe_models"] = [str(p) for p in args.recipe]
    result["reference_models"] = [str(p) for p in args.reference]
    write_json(result, args.json, overwrite=True)
    print("\n".join(lines(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
