"""Two recipes scored by ``benchmarks/mirror_average_ab.py`` compared case by case, in each inference arm.

Each run of ``mirror_average_ab.py`` scores one model per fold on the fold's held-out cases (the same label maps
and seed), with one forward pass and with the mirror average.  Given the reports of a new recipe (one or more
runs, e.g. one per fold) and of a reference recipe, this prints and writes, for every case the new runs hold,
per arm and per score the new minus the reference (mean difference, cases better / worse, exact sign-flip p),
the contrast rules passed and the checkerboard medians of the new runs.

Usage (from the repository root)::

    python benchmarks/mirror_average_ab_compare.py --new NEW_F0.json NEW_F1.json \\
        --reference docs/synthesis_cv/mirror_average_ab_s37.json --json OUT.json
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

from mirror_average_ab import arm_checks  # noqa: E402

from MedSynthLib.schema.labels import MODALITIES  # noqa: E402
from MedSynthLib.schema.volume_io import write_json  # noqa: E402
from MedSynthLib.study.statistics import paired_comparison  # noqa: E402

ARMS = ("mirror_average", "one_pass")
SCORES = ("brain_ssim", "brain_psnr", "tumour_ssim", *(f"{m}_ssim" for m in MODALITIES))


def load_rows(paths: list[Path]) -> dict[tuple[int, str], dict[str, Any]]:
    """The rows of the reports keyed by (fold, case); a case twice is refused."""
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    for path in paths:
        for row in json.loads(path.read_text())["rows"]:
            key = (int(row["fold"]), row["case"])
            if key in rows:
                raise SystemExit(f"{path}: fold {key[0]} case {key[1]} is in the reports twice")
            rows[key] = row
    return rows


def compare(new: dict[tuple[int, str], dict[str, Any]],
            reference: dict[tuple[int, str], dict[str, Any]]) -> dict[str, Any]:
    """New minus reference on every case of ``new`` (each must be in ``reference``), per arm and score."""
    missing = sorted(set(new) - set(reference))
    if missing:
        raise SystemExit(f"the reference did not score {', '.join(f'fold {f} {c}' for f, c in missing)}")
    keys = sorted(new)
    out: dict[str, Any] = {"cases": [f"{f}/{c}" for f, c in keys]}
    for arm in ARMS:
        per_score = {}
        for score in SCORES:
            a = [new[k][arm][score] for k in keys]
            b = [reference[k][arm][score] for k in keys]
            per_score[score] = {"new": float(np.mean(a)), "reference": float(np.mean(b)), **paired_comparison(a, b)}
        rules, checkerboard = arm_checks([new[k] for k in keys], arm)
        out[arm] = {"scores": per_score, "rules": rules, "checkerboard_median": checkerboard}
    return out


def lines(result: dict[str, Any]) -> list[str]:
    text = []
    for arm in ARMS:
        for score, c in result[arm]["scores"].items():
            text.append(f"{arm:<15} {score:<12} new {c['new']:.4f}  reference {c['reference']:.4f}  "
                        f"{c['mean_difference']:+.4f}  better on {c['wins']}, worse on {c['losses']} of {c['n']}  "
                        f"p {c['p']:.2g}")
        passed, checked = result[arm]["rules"]
        text.append(f"{arm:<15} contrast rules {passed} of {checked}; checkerboard (median, real = 1) "
                    + " / ".join(f"{v:.2f}" for v in result[arm]["checkerboard_median"].values()))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new", type=Path, nargs="+", required=True, help="mirror_average_ab.py reports of the new recipe")
    parser.add_argument("--reference", type=Path, nargs="+", required=True, help="reports of the reference recipe")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = compare(load_rows(args.new), load_rows(args.reference))
    print("\n".join(lines(result)))
    if args.json:
        command = shlex.join(["python", "benchmarks/mirror_average_ab_compare.py", *(argv if argv is not None else sys.argv[1:])])
        write_json({"command": command, "new": [str(p) for p in args.new],
                    "reference": [str(p) for p in args.reference], **result}, args.json, overwrite=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
