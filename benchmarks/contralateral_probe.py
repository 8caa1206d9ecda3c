"""Does the other hemisphere tell the inpainting more than smoothing does? (a probe of held-out real cases)

Across the brain's midline lies the same patient's healthy tissue, scanned in the same session.  This probe mixes,
after the inpainting engine (its defaults, pasted: no feather), each healthy voxel of the region (CSF, GM, WM) with
an estimate ``(1 - weight) * prediction + weight * estimate`` and scores the region as
``benchmarks/inpainting_inference_ab.py`` does (region = real tumour + 8 mm, SSIM as ``medsynth evaluate``, mean of
the four contrasts).  Estimates, each a local mean over the voxel's own class within a Gaussian of ``sigma`` voxels:

* ``contralateral``: of the real image mirrored across the brain's plane of symmetry (the plane that best overlaps
  the brain mask with its mirror image), never reading the region or its mirror image, brought to the level of its
  class around the region (the real image's median in a 10 mm shell minus the mirrored image's median in the
  mirror of that shell);
* ``self_smooth``: of the prediction itself inside the region (a control: no new information, only smoothing);
* ``both``: the mean of the two;
* ``median``: the prediction's median of the class in the region (a control: contrast shrunk towards it).

    PYTHONPATH=. python benchmarks/contralateral_probe.py --cache CACHE \\
        --data ../shared/data/brats2021/cases ../shared/data/brats_more/cases --fold 0 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from inpainting_eval import (add_held_out_arguments, masked_gaussian_mean, open_held_out,  # noqa: E402
                             real_tumour_region)
from MedSynthLib.evaluation.metrics import fidelity  # noqa: E402
from MedSynthLib.schema.labels import MODALITIES, Label  # noqa: E402
from MedSynthLib.schema.volume_io import write_json  # noqa: E402
from MedSynthLib.synthesis.inpainting import _ball_growth  # noqa: E402

HEALTHY = (Label.CSF, Label.GM, Label.WM)


def mirror_shift(brain: np.ndarray, max_shift: int = 24) -> int:
    """The shift s for which the brain mirrored along the last (left-right) axis and rolled by s overlaps it most."""
    flipped = brain[..., ::-1]
    overlaps = [int((np.roll(flipped, s, axis=-1) & brain).sum()) for s in range(-max_shift, max_shift + 1)]
    return int(np.argmax(overlaps)) - max_shift


def mirror(array: np.ndarray, shift: int) -> np.ndarray:
    return np.roll(array[..., ::-1], shift, axis=-1)


def region_ssim(real: dict, images: dict, brain: np.ndarray, region: np.ndarray) -> tuple[float, list[float]]:
    scores = [fidelity(real[m], images[m].astype(np.float32), brain, {"region": region})["region"]["ssim"]
              for m in MODALITIES]
    return float(np.mean(scores)), [round(s, 4) for s in scores]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_held_out_arguments(parser, threads=1)
    parser.add_argument("--sigmas", nargs="+", type=float, default=[4.0, 8.0])
    parser.add_argument("--weights", nargs="+", type=float, default=[0.3, 0.5])
    args = parser.parse_args()
    names, folders, engine = open_held_out(args)
    rows = []
    for name in names:
        start = time.perf_counter()
        labels, real, brain, _, region = real_tumour_region(folders[name], args.cache)
        predicted = engine.inpaint(labels, real, region, (1.0, 1.0, 1.0), feather_mm=0.0).images
        shift = mirror_shift(brain)
        mirrored_labels, mirrored_region, mirrored_brain = (mirror(a, shift) for a in (labels, region, brain))
        shell = _ball_growth(region, 10.0, (1.0, 1.0, 1.0)) & ~region & brain
        mirrored_shell = mirror(shell, shift)
        # Everything below happens in the region's box grown by the widest Gaussian's reach.
        reach = int(np.ceil(4 * max(args.sigmas)))
        box = tuple(slice(max(int(ix.min()) - reach, 0), int(ix.max()) + reach + 1) for ix in np.nonzero(region))
        inside = {c: (region & (labels == c))[box] for c in HEALTHY}
        row = {"case": name, "mirror_shift": shift, "base": region_ssim(real, predicted, brain, region),
               "healthy_share": round(float(sum(v.sum() for v in inside.values()) / region.sum()), 3)}
        # Per healthy class: the mirrored voxels of that class outside the region (and its mirror image), and the
        # class's voxels of the shell around the region on both sides; none depends on the contrast or sigma.
        usable = {c: (mirrored_labels == c) & ~mirrored_region & mirrored_brain for c in HEALTHY if inside[c].sum() >= 50}
        around = {c: (shell & (labels == c), mirrored_shell & usable[c]) for c in usable}
        estimates: dict[tuple[str, float], dict[str, list]] = {}
        for m in MODALITIES:
            image, prediction = real[m], predicted[m].astype(np.float32)
            mirrored = mirror(image, shift)
            for c, usable_c in usable.items():
                where = inside[c]
                near, mirrored_near = around[c]
                level = (float(np.median(image[near])) - float(np.median(mirrored[mirrored_near]))
                         if near.sum() >= 50 and mirrored_near.sum() >= 50 else 0.0)
                median = np.full(int(where.sum()), np.median(prediction[box][where]), np.float32)
                estimates.setdefault(("median", 0.0), {}).setdefault(m, []).append((where, median))
                for sigma in args.sigmas:
                    contra, den = masked_gaussian_mean(mirrored[box], usable_c[box], sigma)
                    has = where & (den > 0.05)
                    self_smooth, _ = masked_gaussian_mean(prediction[box], where, sigma)
                    for kind, values, mask in (("contralateral", contra + level, has), ("self_smooth", self_smooth, where),
                                               ("both", 0.5 * (contra + level + self_smooth), has)):
                        estimates.setdefault((kind, sigma), {}).setdefault(m, []).append((mask, values[mask]))
        for (kind, sigma), parts in estimates.items():
            for weight in args.weights:
                mixed = {}
                for m in MODALITIES:
                    values = predicted[m].astype(np.float32)
                    in_box = values[box]
                    for mask, estimate in parts.get(m, []):
                        in_box[mask] = (1.0 - weight) * in_box[mask] + weight * estimate
                    mixed[m] = values
                row[f"{kind}_s{sigma:g}_w{weight:g}"] = region_ssim(real, mixed, brain, region)
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    variants = [k for k in rows[0] if isinstance(rows[0][k], list)]
    summary = {v: {"region_ssim": float(np.mean([r[v][0] for r in rows])),
                   "minus_base": float(np.mean([r[v][0] - r["base"][0] for r in rows])),
                   "higher_than_base": int(sum(r[v][0] > r["base"][0] for r in rows))} for v in variants}
    print(json.dumps(summary, indent=1))
    if args.json:
        write_json({"command": " ".join(sys.argv), "model": {"name": engine.model.name, "sha256": engine.model.sha256},
                    "summary": summary, "per_case": rows}, args.json, overwrite=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
