"""Where the synthesis fidelity gap lies: a model's held-out brain SSIM beside the SSIM of the real image smoothed.

``medsynth evaluate`` scores a synthetic image against the real one (both z-scored in the brain, Gaussian SSIM).
A label map cannot carry a scan's noise, so a faithful generator would at best give something like the real
image without its noise.  This probe scores, on a cross-validation fold's held-out cases and with the same
label maps as ``benchmarks/synthesis_cv.py`` (a training cache):

* the model's output as it is and Gaussian-smoothed (sigma 0.75 and 1.5 voxels): how much smoothing alone buys;
* the real image Gaussian-smoothed by the same sigmas: the SSIM of a prediction that has the real structure
  and none of its noise.

If the second is far above the first, the gap is the structure the generator gets wrong, not the texture it
cannot know.

    PYTHONPATH=. python benchmarks/synthesis_smoothing_probe.py --model /work/runs/spade64_f0/model \\
        --config Resources/configs/spade_brats27_cpu64_cv.json --fold 0 --max-cases 4 \\
        --data ../shared/data/brats2021/cases ../shared/data/brats_more/cases --cache /work/runs/cache_spade \\
        --json docs/synthesis_cv/smoothing_probe_f0.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from synthesis_cv import _cached_labels  # noqa: E402

from MedSynthLib.cases.readers import MODALITIES, read_case  # noqa: E402
from MedSynthLib.evaluation.evaluate import real_brain_mask  # noqa: E402
from MedSynthLib.evaluation.metrics import fidelity  # noqa: E402
from MedSynthLib.schema.grid import LabelMap  # noqa: E402
from MedSynthLib.schema.volume_io import write_json  # noqa: E402
from MedSynthLib.synthesis.models import resolve_model  # noqa: E402
from MedSynthLib.synthesis.synthesize import SynthesisEngine  # noqa: E402
from MedSynthLib.training.data import find_case_folders  # noqa: E402

SIGMAS = (0.75, 1.5)


def brain_ssim(real: np.ndarray, image: np.ndarray, brain: np.ndarray) -> float:
    return float(fidelity(real, image.astype(np.float32), brain, {})["brain"]["ssim"])


def main(argv: list[str] | None = None) -> int:
    import torch
    from scipy import ndimage

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--config", type=Path, required=True, help="training config holding cv_folds")
    parser.add_argument("--fold", type=int, required=True)
    parser.add_argument("--max-cases", type=int, default=None)
    parser.add_argument("--data", nargs="+", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True, help="training cache (the label maps)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    held = json.loads(args.config.read_text())["cv_folds"][args.fold][: args.max_cases]
    folders = {f.name: f for root in args.data for f in find_case_folders(root)}
    engine = SynthesisEngine(resolve_model(args.model), "cpu", "fp32")
    rows = []
    for name in held:
        case = read_case(folders[name], require_segmentation=True)
        labels = _cached_labels(case, folders[name], args.cache, "tissue_zscore")
        images = engine.synthesize(LabelMap(labels, case.grid)).images
        brain = real_brain_mask(case.images)
        row = {"case": name, "model": {m: brain_ssim(case.images[m], images[m], brain) for m in MODALITIES}}
        for sigma in SIGMAS:
            row[f"model_smoothed_{sigma}"] = {m: brain_ssim(case.images[m], ndimage.gaussian_filter(images[m], sigma),
                                                            brain) for m in MODALITIES}
            row[f"real_smoothed_{sigma}"] = {
                m: brain_ssim(case.images[m], ndimage.gaussian_filter(case.images[m].astype(np.float32), sigma), brain)
                for m in MODALITIES}
        rows.append(row)
        print(name, {k: round(float(np.mean(list(v.values()))), 3) for k, v in row.items() if k != "case"}, flush=True)
    keys = [k for k in rows[0] if k != "case"]
    summary = {k: {"mean": float(np.mean([np.mean(list(r[k].values())) for r in rows])),
                   **{m: float(np.mean([r[k][m] for r in rows])) for m in MODALITIES}} for k in keys}
    arguments = argv if argv is not None else sys.argv[1:]
    command = shlex.join(["python", "benchmarks/synthesis_smoothing_probe.py", *arguments])
    report = {"command": command, "model": {"name": engine.model.name, "sha256": engine.model.sha256},
              "cases": held, "summary": summary, "per_case": rows}
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(report, args.json, overwrite=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
