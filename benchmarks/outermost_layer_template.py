"""How much of the healthy template's outermost brain layer a synthesis model leaves at or below its floor, per seed.

The template ships with the project, so this needs no patient data. For seeds 0..N-1 the model synthesises the
template's label map with one pass and with the mirror average; per seed and contrast it records the share of the
outermost layer at 0 and at or below the model's floor (the median of its training brains' darkest signal), then the
mean over the seeds and the worst (share, seed, contrast); and per seed the contrast rules the sample breaks on the
template's classes (a code can keep the layer bright and wash the tissues out instead) and each rule's margin (the
smallest class-median difference it compares, z; ``benchmarks/contrast_margins_real.py`` measures the real cases').
``Testing/test_synthesis.py`` asserts the same shares for
the shipped default; this writes them for any model, for the model card.

    python benchmarks/outermost_layer_template.py --model medsynth-spade27-noint-ft1000 --seeds 6 -o OUT.json

``--appearance-spread S`` draws the seeds' codes at that spread (also past the range synthesis accepts: measuring
there is what sets the range); ``--arms mirror`` skips the one-pass arm.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from MedSynthLib.cases.template import template_label_map  # noqa: E402
from MedSynthLib.evaluation.image_checks import check_contrast_rules, layer_signal_shares, outermost_layer  # noqa: E402
from MedSynthLib.schema.labels import MODALITIES  # noqa: E402
from MedSynthLib.schema.volume_io import write_json  # noqa: E402
from MedSynthLib.synthesis.models import resolve_model  # noqa: E402
from MedSynthLib.synthesis.synthesize import SynthesisEngine  # noqa: E402


def layer_shares(model: str | None, seeds: int, spread: float = 1.0,
                 arms: tuple[str, ...] = ("one_pass", "mirror")) -> dict:
    """Per inference arm, each seed's shares of the template's outermost layer at 0 and at or below the floor."""
    labelmap = template_label_map()
    card = resolve_model(model)
    rim = outermost_layer(labelmap.array > 0)
    floors = {m: card.config["intensity"][m].get("floor", 0.0) for m in MODALITIES}
    out: dict = {"model": card.name, "sha256": card.sha256, "floors": floors, "appearance_spread": spread}
    for arm, mirror in (("one_pass", False), ("mirror", True)):
        if arm not in arms:
            continue
        engine = SynthesisEngine(card, device="cpu", precision="auto", mirror_average=mirror)
        engine._appearance_spread = float(spread)  # past the setter's range check on purpose (see above)
        rows = []
        for seed in range(seeds):
            images = engine.synthesize(labelmap, seed=seed).images
            zero, at_floor = layer_signal_shares(images, rim, floors)
            rules = check_contrast_rules(images, labelmap.array)
            broken = [r["rule"] for r in rules if r["passed"] is False]
            margins = {r["rule"]: r["margin"] for r in rules if r["margin"] is not None}
            rows.append({"seed": seed, "zero": zero, "at_floor": at_floor, "rules_failed": broken,
                         "rule_margins": margins})
        mean = {m: float(np.mean([r["at_floor"][m] for r in rows])) for m in MODALITIES}
        worst = max((r["at_floor"][m], r["seed"], m) for r in rows for m in MODALITIES)
        failing = sum(bool(r["rules_failed"]) for r in rows)
        out[arm] = {"rows": rows, "mean_at_floor": mean, "worst": list(worst), "samples_failing_rules": failing}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="registry name or model folder (default: the registry's)")
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--appearance-spread", type=float, default=1.0)
    parser.add_argument("--arms", nargs="+", choices=("one_pass", "mirror"), default=["one_pass", "mirror"])
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)
    result = layer_shares(args.model, args.seeds, args.appearance_spread, tuple(args.arms))
    result["command"] = shlex.join(["python", "benchmarks/outermost_layer_template.py",
                                    *(sys.argv[1:] if argv is None else argv)])
    write_json(result, args.output, overwrite=True)
    for arm in args.arms:
        mean = {m: round(100 * v, 2) for m, v in result[arm]["mean_at_floor"].items()}
        print(f"{arm}: at or below the floor, mean over seeds (%) {mean}; worst {result[arm]['worst']}; "
              f"samples breaking a contrast rule {result[arm]['samples_failing_rules']} of {args.seeds}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
