"""Does growing the label map's brain before the network give the brain's outermost layer signal?

The shipped model leaves most of the outermost brain voxel layer at 0 (docs/model_card.md).  This probe grows the
brain outward by k voxels (each background voxel next to the brain takes its 6-neighbours' largest label, k times),
runs the network on that, keeps the output inside the original brain, and prints per contrast: the share of rim
voxels at 0, the rim's median over white matter's, and brain SSIM against the real scan (``medsynth evaluate``'s
metric), beside the same for the real scan's rim.

    python benchmarks/rim_extension_probe.py ../shared/data/brats2021/cases/BraTS2021_00000 \
        ../shared/data/brats_more/cases/Brats18_2013_2_1
"""
import argparse, sys, time, json
import numpy as np
from pathlib import Path
from scipy import ndimage
from MedSynthLib.cases.readers import read_case
from MedSynthLib.cases.anatomy import derive_label_map
from MedSynthLib.schema.grid import LabelMap
from MedSynthLib.synthesis.models import resolve_model
from MedSynthLib.synthesis.synthesize import SynthesisEngine
from MedSynthLib.synthesis.inference import to_scanner_units
from MedSynthLib.evaluation.evaluate import real_brain_mask
from MedSynthLib.evaluation.image_checks import outermost_layer
from MedSynthLib.evaluation.metrics import fidelity
from MedSynthLib.schema.errors import MedSynthError
from MedSynthLib.cases.readers import MODALITIES

def extend(labels, k):
    out = labels.copy()
    for _ in range(k):
        grown = ndimage.grey_dilation(out, footprint=ndimage.generate_binary_structure(3, 1))
        bg = out == 0
        out[bg] = grown[bg]
    return out


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
    for folder in cases:
        folder = Path(folder)
        case = read_case(folder, require_segmentation=True)
        labels = derive_label_map(case).array
        brainmask = labels > 0
        rim = outermost_layer(brainmask)
        realbrain = real_brain_mask(case.images)
        for k in (0, 2, 4):
            t = time.time()
            net_labels = extend(labels, k) if k else labels
            normalized = engine.synth.predict(net_labels)
            images = to_scanner_units(normalized, labels, engine.model.normalizers, engine.model.modalities)
            row = {}
            for m in MODALITIES:
                img = images[m]
                wm = np.median(img[labels == 3])
                row[m] = dict(zero=float(np.mean(img[rim] == 0)), rim_wm=float(np.median(img[rim]) / wm),
                              ssim=fidelity(case.images[m], img, realbrain, {})["brain"]["ssim"])
            real = {m: float(np.median(case.images[m][rim]) / np.median(case.images[m][labels == 3])) for m in MODALITIES}
            print(folder.name, k, round(time.time() - t, 1), json.dumps(row), "real rim/wm", real, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
