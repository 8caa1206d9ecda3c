"""A/B of inference-time options of the inpainting model on held-out real cases (region SSIM, PSNR, tumour SSIM).

Options of :class:`MedSynthLib.synthesis.inpainting.InpaintingEngine`, applied to the network output in its own
normalised units (the case's grey/white-matter z-score):

* ``base``: one forward pass (``mirror_average=False, match_tissue=False``);
* ``flip``: the mean of the forward pass and the left-right mirrored one (the model trained with left-right flips);
* ``tissue_offset``: each healthy class (CSF, GM, WM) inside the region shifted so that its median matches the
  same class's median in the real image around the region (:func:`~MedSynthLib.synthesis.inpainting.
  match_tissue_medians`): the local brightness of the patient's own tissue, which the network only sees from
  outside;
* ``flip+tissue_offset``: both (the engine's default).

The region is each case's real tumour grown by 8 mm (as ``benchmarks/inpainting_eval.py``); scores as ``medsynth
evaluate`` computes them (both images z-scored in the brain, Gaussian SSIM, PSNR peak 8), mean of the four
contrasts.  Cases: a held-out fold of ``Resources/configs/inpaint_brats27_cpu_cv.json`` (never seen by the
model), read through a training cache of prepared cases.  Choose an option on some held-out cases
(``--cases``) and confirm it on the others.

    PYTHONPATH=. python benchmarks/inpainting_inference_ab.py --cache /work/runs/cache_spade \\
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
from inpainting_eval import add_held_out_arguments, open_held_out, real_tumour_region  # noqa: E402
from MedSynthLib.evaluation.metrics import fidelity  # noqa: E402
from MedSynthLib.schema.labels import MODALITIES  # noqa: E402
from MedSynthLib.schema.volume_io import write_json  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_held_out_arguments(parser, threads=2)
    args = parser.parse_args()
    names, folders, engine = open_held_out(args)
    variants = {"base": (False, False), "flip": (True, False), "tissue_offset": (False, True),
                "flip+tissue_offset": (True, True)}
    rows = []
    for name in names:
        labels, real, brain, tumour, region = real_tumour_region(folders[name], args.cache)
        row = {"case": name}
        for variant, (engine.mirror_average, engine.match_tissue) in variants.items():
            start = time.perf_counter()
            # Pasted, not feathered: the feather would mix the real values of the region's outer band into it.
            images = engine.inpaint(labels, real, region, (1.0, 1.0, 1.0), feather_mm=0.0).images
            seconds = time.perf_counter() - start
            scores = [fidelity(real[m], images[m].astype(np.float32), brain, {"region": region, "tumour": tumour})
                      for m in MODALITIES]
            row[variant] = {"region_ssim": float(np.mean([s["region"]["ssim"] for s in scores])),
                            "region_psnr": float(np.mean([s["region"]["psnr"] for s in scores])),
                            "tumour_ssim": float(np.mean([s["tumour"]["ssim"] for s in scores])),
                            "seconds": round(seconds, 2)}
        rows.append(row)
        print(name, " ".join(f"{v} {row[v]['region_ssim']:.3f}" for v in variants), flush=True)
    summary = {v: {k: float(np.mean([r[v][k] for r in rows])) for k in ("region_ssim", "region_psnr", "tumour_ssim")}
               for v in variants}
    report = {"command": " ".join(sys.argv), "model": {"name": engine.model.name, "sha256": engine.model.sha256},
              "summary": summary, "per_case": rows}
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(report, args.json, overwrite=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
