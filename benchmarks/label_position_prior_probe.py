"""Is the within-class intensity field a patient's own, or anatomy that patients share at the same position?

``benchmarks/label_information_probe.py`` shows that knowing each tissue's brightness at 8 voxels
(``class_local_means_8``) lifts the brain SSIM from the case's class means (0.313 on fold 0) to 0.496.  A
generator could learn only the part of that field that is the same in every patient at the same place.  The
BraTS cases are all resampled to one atlas space (240 x 240 x 155, 1 mm), so a voxel index is an anatomical
position.  Leave-one-out over the 9 held-out cases of fold 0 of the inpainting CV folds: for each healthy
class (CSF, GM, WM) and contrast, the other 8 patients' ``class_local_means_8 - case_class_means`` residual,
averaged where they have that class at that voxel, is added to the held-out case's own class means, and the
brain SSIM (as ``medsynth evaluate``) is compared with the class means alone.

    MEDSYNTH_DATA=../shared/data MEDSYNTH_PROBE_CACHE=CACHE PYTHONPATH=. \\
        python benchmarks/label_position_prior_probe.py docs/synthesis_cv/label_position_prior_f0.json
"""

import json, os, sys
from pathlib import Path
import numpy as np
sys.path.insert(0, str(Path(__file__).resolve().parent)); sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import label_information_probe as p
from MedSynthLib.cases.readers import read_case
from MedSynthLib.schema.labels import MODALITIES, brain_mask, tumour_mask
from MedSynthLib.training.data import find_case_folders, prepare_volume
from MedSynthLib.schema.grid import mask_box

DATA = Path(os.environ.get("MEDSYNTH_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CACHE = Path(os.environ.get("MEDSYNTH_PROBE_CACHE", "cache_label_probe"))
held = json.loads((Path(__file__).resolve().parents[1] / "Resources/configs/inpaint_brats27_cpu_cv.json").read_text())["cv_folds"][0]
folders = {f.name: f for r in [DATA / "brats2021/cases", DATA / "brats_more/cases"] for f in find_case_folders(r)}
cases = {}
for name in held:
    v = prepare_volume(folders[name], CACHE, "tissue_zscore")
    case = read_case(folders[name], require_segmentation=True)
    shape = case.images["t1"].shape
    real_brain = np.any([case.images[m] > 0 for m in MODALITIES], axis=0)
    box = mask_box(real_brain, margin=4)
    if tuple(s.stop - s.start for s in box) != v.labels.shape:
        # the cache keeps the brain box of the derived labels, not its place: found again from the images
        print(name, "box mismatch", [s.stop - s.start for s in box], v.labels.shape, flush=True); continue
    labels = np.zeros(shape, np.uint8); labels[box] = v.labels
    real = {m: np.zeros(shape, np.float32) for m in MODALITIES}
    sl = p.scanner_like(v)
    for m in MODALITIES: real[m][box] = sl[m]
    resid = {}
    for m in MODALITIES:
        ccm = p.case_class_means(labels, real[m])
        clm = p.class_local_means(labels, real[m], 8.0)
        r = np.where(labels > 0, clm - ccm, 0).astype(np.float32)
        resid[m] = r
    cases[name] = (labels, real, resid)
    print(name, shape, "ok", flush=True)
rows = []
for name, (labels, real, resid) in cases.items():
    others = [n for n in cases if n != name]
    brain, tumour = brain_mask(labels), tumour_mask(labels)
    out = {"case": name}
    for label in ("ccm", "ccm+prior"):
        s = []
        for m in MODALITIES:
            guess = p.case_class_means(labels, real[m])
            if label == "ccm+prior":
                prior = np.zeros_like(guess)
                for c in (1, 2, 3):  # healthy classes only: same class at the same position in other patients
                    num = np.zeros_like(guess); den = np.zeros_like(guess)
                    for o in others:
                        lo, _, ro = cases[o]
                        w = (lo == c)
                        num += np.where(w, ro[m], 0); den += w
                    mine = labels == c
                    prior[mine] = np.where(den[mine] > 0, num[mine] / np.maximum(den[mine], 1), 0)
                guess = guess + prior
            s.append(p.fidelity(real[m], guess, brain, {"tumour": tumour}))
        out[label] = [x["brain"]["ssim"] for x in s]
    rows.append(out)
    print(name, "ccm", round(np.mean(out["ccm"]), 3), "ccm+prior", round(np.mean(out["ccm+prior"]), 3), flush=True)
print("mean ccm", np.mean([np.mean(r["ccm"]) for r in rows]), "ccm+prior", np.mean([np.mean(r["ccm+prior"]) for r in rows]))
if len(sys.argv) > 1:
    json.dump({"command": " ".join(sys.argv), "per_case": rows}, open(sys.argv[1], "w"), indent=1)
