"""A/B of the inpainting network's box on held-out real cases: region SSIM with the box used before the preview work
(the region's box + 16 voxels, padded at its end with background to the 16-voxel multiple) and with
:func:`MedSynthLib.synthesis.inpainting.lattice_box` (at least 8 voxels of real context, on the 16-voxel lattice).

The region is each case's real tumour grown by 8 mm (as ``benchmarks/inpainting_eval.py``), re-rendered in place by
the registered inpainting model; SSIM as ``medsynth evaluate`` computes it, mean of the four contrasts.  Cases:
fold 0 of ``Resources/configs/inpaint_brats27_cpu_cv.json`` (never seen by the model), read through a training
cache of prepared cases.

    PYTHONPATH=. python benchmarks/inpainting_context_ab.py --cache /work/runs/cache
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inpainting_eval import scanner_like  # noqa: E402
from MedSynthLib.evaluation.metrics import fidelity  # noqa: E402
from MedSynthLib.schema.grid import mask_box  # noqa: E402
from MedSynthLib.schema.labels import MODALITIES, brain_mask, tumour_mask  # noqa: E402
from MedSynthLib.synthesis import inpainting  # noqa: E402
from MedSynthLib.synthesis.inpainting import InpaintingEngine, _ball_growth  # noqa: E402
from MedSynthLib.synthesis.models import resolve_model  # noqa: E402
from MedSynthLib.training.data import prepare_volume  # noqa: E402

def old_box(region, multiple, min_context=16):
    return mask_box(region, 16)  # the network pads it at its end to the multiple


def main() -> None:
    parser = argparse.ArgumentParser(description="A/B of the inpainting network's box (region SSIM)")
    parser.add_argument("--cache", type=Path, required=True, help="training cache of prepared cases")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--cases", nargs="+", default=["BraTS2021_00000", "BraTS2021_00006"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    engine = InpaintingEngine(resolve_model("medsynth-inpaint-brats27-f0d", kind="inpainting"), "cpu", "auto")
    new_box = inpainting.lattice_box

    out = {}
    for name in args.cases:
        folder = args.data / "brats2021" / "cases" / name
        volume = prepare_volume(folder, args.cache, "tissue_zscore")
        labels, real = volume.labels, scanner_like(volume)
        brain, tumour = brain_mask(labels), tumour_mask(labels)
        region = _ball_growth(tumour, 8.0, (1.0, 1.0, 1.0)) & brain
        row = {}
        for label, box in (("old_16_padded", old_box), ("new_lattice_8", new_box)):
            inpainting.lattice_box = box
            images = engine.inpaint(labels, real, region, (1.0, 1.0, 1.0)).images
            row[label] = float(np.mean([fidelity(real[m], images[m].astype(np.float32), brain,
                                                 {"region": region})["region"]["ssim"] for m in MODALITIES]))
        inpainting.lattice_box = new_box
        out[name] = row
        print(name, row, flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
