"""Does the synthesis depend on the order the label map's voxels are stored in?

The network runs on the stored array; every training case is stored LPS (BraTS).  The same label map is
synthesised as stored, with its i and j axes reversed (what a RAS-stored file gives), and with its k and i axes
swapped (a sagittal-first array); each output is mapped back and scored against the real scan (brain SSIM, as
``medsynth evaluate``), with the mean absolute difference from the as-stored output in the brain.

    python benchmarks/orientation_probe.py ../shared/data/brats2021/cases/BraTS2021_00000
"""
import argparse, sys, time
import numpy as np
from pathlib import Path
from MedSynthLib.cases.readers import read_case, MODALITIES
from MedSynthLib.cases.anatomy import derive_label_map
from MedSynthLib.synthesis.models import resolve_model
from MedSynthLib.synthesis.synthesize import SynthesisEngine
from MedSynthLib.synthesis.inference import to_scanner_units
from MedSynthLib.evaluation.evaluate import real_brain_mask
from MedSynthLib.evaluation.metrics import fidelity
from MedSynthLib.schema.errors import MedSynthError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cases", nargs="+", help="BraTS case folders (with their segmentation)")
    args = parser.parse_args()
    try:
        probe(args.cases)
    except MedSynthError as error:  # a bad case folder: one line, as the medsynth commands say it
        print(f"{parser.prog}: {error}", file=sys.stderr)
        return 2
    return 0


def probe(cases: list[str]) -> None:
    engine = SynthesisEngine(resolve_model(None), device="cpu", precision="auto")
    views = {"LPS": (lambda a: a, lambda a: a),
             "RAS": (lambda a: a[..., ::-1, ::-1], lambda a: a[..., ::-1, ::-1]),
             "kiswap": (lambda a: np.swapaxes(a, -1, -3), lambda a: np.swapaxes(a, -1, -3))}
    for folder in cases:
        case = read_case(Path(folder), require_segmentation=True)
        labels = derive_label_map(case).array
        brain = real_brain_mask(case.images)
        outs = {}
        for name, (fwd, back) in views.items():
            t = time.time()
            normalized = np.ascontiguousarray(back(engine.synth.predict(np.ascontiguousarray(fwd(labels)))))
            images = to_scanner_units(normalized, labels, engine.model.normalizers, engine.model.modalities)
            outs[name] = normalized
            ssim = [fidelity(case.images[m], images[m], brain, {})["brain"]["ssim"] for m in MODALITIES]
            diff = float(np.abs(normalized - outs["LPS"])[:, labels > 0].mean())
            print(Path(folder).name, name, round(time.time() - t), "ssim", [round(s, 3) for s in ssim],
                  "mean %.4f" % np.mean(ssim), "mean |diff| vs LPS (normalised units) %.4f" % diff, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
