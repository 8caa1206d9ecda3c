"""How far apart the real cases' healthy tissues lie: each contrast rule's margin on the shared real cases.

A rule's margin is the smallest class-median difference it compares (z inside the brain), as
``MedSynthLib.evaluation.image_checks.check_contrast_rules`` reports it. Here it is measured on the healthy tissue
of each real case only (CSF, GM, WM of the case's derived label map; the tumour left out, so the z-score and the
"darkest" / "brightest" rules compare what a synthesis of the healthy template holds). The narrowest real margin of
a rule is how faint a contrast can be and still be one a real scan shows: the model card compares the template's
synthetic samples with it at a model's appearance spread limit.

    python benchmarks/contrast_margins_real.py --data ../shared/data/brats2021/cases ../shared/data/brats_more/cases \\
        --config Resources/configs/spade_brats27_cpu64_cv.json --cache CACHE -o OUT.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from synthesis_cv import _cached_labels  # noqa: E402

from MedSynthLib.cases.readers import read_case  # noqa: E402
from MedSynthLib.evaluation.image_checks import check_contrast_rules  # noqa: E402
from MedSynthLib.schema.labels import Label  # noqa: E402
from MedSynthLib.schema.volume_io import write_json  # noqa: E402
from MedSynthLib.training.data import find_case_folders  # noqa: E402


def healthy_margins(images: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, float]:
    """Each rule's margin on the healthy tissue of one case (rules needing a tumour class are left out)."""
    healthy = np.where(labels >= Label.NCR, Label.BACKGROUND, labels).astype(labels.dtype)
    return {r["rule"]: r["margin"] for r in check_contrast_rules(images, healthy) if r["margin"] is not None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, nargs="+", required=True)
    parser.add_argument("--config", type=Path, required=True, help="the training config (its normalization)")
    parser.add_argument("--cache", type=Path, default=None, help="training cache of prepared cases (the label maps)")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)
    normalization = json.loads(args.config.read_text()).get("normalization", "percentile")
    rows = []
    for folder in sorted((f for root in args.data for f in find_case_folders(root)), key=lambda f: f.name):
        case = read_case(folder, require_segmentation=True)
        labels = _cached_labels(case, folder, args.cache, normalization)
        rows.append({"case": folder.name, "margins": healthy_margins(case.images, labels)})
        print(folder.name, rows[-1]["margins"], flush=True)
    rules = sorted({rule for row in rows for rule in row["margins"]})
    summary = {}
    for rule in rules:
        values = [row["margins"][rule] for row in rows if rule in row["margins"]]
        summary[rule] = {"cases": len(values), "min": float(np.min(values)), "p05": float(np.percentile(values, 5)),
                         "median": float(np.median(values))}
    report = {"command": shlex.join(["python", "benchmarks/contrast_margins_real.py",
                                     *(sys.argv[1:] if argv is None else argv)]),
              "rows": rows, "summary": summary}
    write_json(report, args.output, overwrite=True)
    for rule, s in summary.items():
        print(f"{rule}: narrowest {s['min']:.3f}, 5th percentile {s['p05']:.3f}, median {s['median']:.3f} z "
              f"({s['cases']} cases)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
