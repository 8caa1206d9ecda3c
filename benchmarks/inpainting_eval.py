"""Tumour inpainting on held-out real cases: fidelity in the region, seam, contrast rules, speed, a montage.

For each held-out case (a cross-validation fold the inpainting model never trained on):

1. The region = the case's real tumour grown by ``--margin`` mm (the default of ``synthesize --context``).
2. Three ways to fill it, scored as pasted into the real image (no real voxel left inside the region: the
   feathered blend of the product mixes the real values of the region's outer band into it, which in this test
   are the answer), and shown and seam-measured as blended with the product's feathered weight
   (:func:`MedSynthLib.synthesis.inpainting.feather_weight`), so only what is painted inside differs:
   * **inpainting**: the inpainting model, from the real label map and the real images around the region;
   * **full synthesis**: the synthesis model (``--synthesis-model``, default the shipped one) run on the whole
     label map, its region mapped to the case's scale (z-scored in the brain, then the real image's brain mean
     and standard deviation);
   * **class means**: each label class painted with its mean z-score over the training folds' cases.
3. SSIM / PSNR / MAE (and the contrast rules) of the pasted images, as ``medsynth evaluate`` computes them
   (:func:`MedSynthLib.evaluation.metrics.fidelity`: both images z-scored in the brain, Gaussian SSIM, PSNR
   peak 8), inside the region and inside the tumour; the full synthesis is also scored as it is (not put into
   the real image), as ``medsynth evaluate`` scores a tumour.
4. Seam ratio: mean intensity-gradient magnitude in the band within 1.5 mm of the region's border (both sides),
   blended image over real image (1 = no seam).  The region SSIM of the blended images is kept beside it
   (``region_ssim_feathered``): what the scores were before they were taken on the pasted images.
5. The contrast rules of :mod:`MedSynthLib.evaluation.image_checks` inside the region, beside the real image's.
6. Speed: re-rendering a 15 mm tumour move on one case (torch threads as given), beside a full synthesis of the
   same brain with the synthesis model in the same run (the machine is shared: compare the ratio).
7. A montage of that move (``--montage``): real, edited, and the synthetic-voxel mask.

Cases are read through the training cache (:func:`MedSynthLib.training.data.prepare_volume`: derived label map and
images z-scored against grey and white matter, cropped to the brain box); images are scored in those units
(all metrics are invariant to the linear map back to scanner units).

    PYTHONPATH=. python benchmarks/inpainting_eval.py --model /work/runs/inpaint/f0/model \\
        --data ../shared/data/brats2021/cases ../shared/data/brats_more/cases \\
        --config Resources/configs/inpaint_brats27_cpu_cv.json --fold 0 --cache /work/runs/cache \\
        --markdown docs/inpainting.md --montage docs/figures/inpainting_move15.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from MedSynthLib.evaluation.image_checks import check_contrast_rules  # noqa: E402
from MedSynthLib.evaluation.metrics import fidelity  # noqa: E402
from MedSynthLib.schema.labels import MODALITIES, NUM_CLASSES, brain_mask, tumour_mask  # noqa: E402
from MedSynthLib.synthesis.normalize import zscore  # noqa: E402

SEAM_BAND_MM = 1.5
METHODS = ("inpainting", "full_synthesis", "class_means")


def scanner_like(volume) -> dict[str, np.ndarray]:
    """The cached normalised images as positive 'scanner units' (background 0), float32."""
    return {m: (volume.images[c].astype(np.float32) + 1.0) * 1000.0 for c, m in enumerate(MODALITIES)}


def masked_gaussian_mean(image: np.ndarray, weight: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """The Gaussian-weighted mean of ``image`` over the voxels of ``weight`` (normalised convolution), and the
    Gaussian of ``weight`` itself (how much of each voxel's neighbourhood the mean rests on)."""
    from scipy import ndimage

    member = weight.astype(np.float32)
    share = ndimage.gaussian_filter(member, sigma)
    return ndimage.gaussian_filter(image * member, sigma) / np.maximum(share, 1e-12), share


def add_held_out_arguments(parser: argparse.ArgumentParser, threads: int = 2) -> None:
    """The options of a benchmark that scores an inpainting model on the held-out cases of one fold."""
    parser.add_argument("--model", default="medsynth-inpaint-brats27-f0d")
    parser.add_argument("--data", nargs="+", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=Path("Resources/configs/inpaint_brats27_cpu_cv.json"))
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--cases", nargs="*", default=None, help="held-out cases to score (default: all of the fold)")
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--json", type=Path)


def open_held_out(args: argparse.Namespace) -> tuple[list[str], dict[str, Path], Any]:
    """For :func:`add_held_out_arguments`' options: torch's threads set, the cases to score, every case folder by
    name, and the inpainting model loaded on the CPU."""
    import torch

    from MedSynthLib.synthesis.inpainting import InpaintingEngine
    from MedSynthLib.synthesis.models import resolve_model

    torch.set_num_threads(args.threads)
    names, folders = held_out_cases(args.config, args.fold, args.cases, args.data)
    return names, folders, InpaintingEngine(resolve_model(args.model, kind="inpainting"), "cpu", "auto")


def held_out_cases(config: Path, fold: int, cases: list[str] | None,
                   data: list[Path]) -> tuple[list[str], dict[str, Path]]:
    """The held-out cases of ``fold`` to score (``cases``, all of the fold by default) and every case folder by name.

    Raises:
        AssertionError: a case in ``cases`` is not held out in that fold.
    """
    from MedSynthLib.training.data import find_case_folders

    held = json.loads(config.read_text())["cv_folds"][fold]
    names = cases or held
    assert set(names) <= set(held), "score held-out cases of the fold only"
    return names, {f.name: f for root in data for f in find_case_folders(root)}


def real_tumour_region(folder: Path, cache: Path, margin_mm: float = 8.0) -> tuple[np.ndarray, dict[str, np.ndarray],
                                                                                  np.ndarray, np.ndarray, np.ndarray]:
    """A real case read through the training cache, and the region around its real tumour.

    Returns:
        labels, the images in scanner-like units (:func:`scanner_like`), the brain, the tumour, and the region (the
        tumour grown by ``margin_mm`` within the brain; 1 mm voxels).
    """
    from MedSynthLib.synthesis.inpainting import _ball_growth
    from MedSynthLib.training.data import prepare_volume

    volume = prepare_volume(folder, cache, "tissue_zscore")
    labels, real = volume.labels, scanner_like(volume)
    brain, tumour = brain_mask(labels), tumour_mask(labels)
    return labels, real, brain, tumour, _ball_growth(tumour, margin_mm, (1.0, 1.0, 1.0)) & brain


def to_case_scale(image: np.ndarray, real: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """``image`` z-scored in the brain, then given the real image's brain mean and standard deviation."""
    values = real[brain].astype(np.float64)
    return zscore(image, brain) * float(values.std()) + float(values.mean())


def seam_ratio(blended: np.ndarray, real: np.ndarray, region: np.ndarray, brain: np.ndarray) -> float:
    """Mean gradient magnitude within ``SEAM_BAND_MM`` of the region's border, blended over real."""
    from scipy import ndimage

    inside = ndimage.distance_transform_edt(region)
    outside = ndimage.distance_transform_edt(~region)
    band = ((region & (inside <= SEAM_BAND_MM)) | (~region & (outside <= SEAM_BAND_MM))) & brain

    def gradient(image: np.ndarray) -> np.ndarray:
        return np.sqrt(sum(g ** 2 for g in np.gradient(image.astype(np.float32))))

    reference = float(gradient(real)[band].mean())
    return float(gradient(blended)[band].mean()) / reference if reference > 0 else float("nan")


def pasted_and_blended(fill: np.ndarray, real: np.ndarray, region: np.ndarray,
                       weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``fill`` put into ``real``: pasted inside ``region`` (what is scored: no real value is left in it) and
    blended with the feathered ``weight`` (what the product shows, and what the seam is measured on)."""
    pasted = np.where(region, fill, real).astype(np.float32)
    blended = (weight * fill + (1.0 - weight) * real).astype(np.float32)
    return pasted, blended


def rules_passed(images: dict[str, np.ndarray], labels: np.ndarray, region: np.ndarray) -> tuple[int, int, list]:
    results = check_contrast_rules(images, labels, brain=region)
    checked = [r for r in results if r["passed"] is not None]
    return sum(r["passed"] for r in checked), len(checked), [r["rule"] for r in checked if not r["passed"]]


def training_class_means(volumes) -> dict[str, dict[int, float]]:
    sums = {m: np.zeros(NUM_CLASSES) for m in MODALITIES}
    counts = {m: np.zeros(NUM_CLASSES) for m in MODALITIES}
    for volume in volumes:
        brain = brain_mask(volume.labels)
        images = scanner_like(volume)
        for m in MODALITIES:
            z = zscore(images[m], brain)
            sums[m] += np.bincount(volume.labels[brain], weights=z[brain], minlength=NUM_CLASSES)
            counts[m] += np.bincount(volume.labels[brain], minlength=NUM_CLASSES)
    return {m: {v: float(sums[m][v] / counts[m][v]) for v in range(NUM_CLASSES) if counts[m][v]} for m in MODALITIES}


def move_towards_centre(labels: np.ndarray, distance_mm: float) -> tuple[float, float, float]:
    """A RAS offset of ``distance_mm`` in the axial plane from the tumour's centre towards the brain's (1 mm grid)."""
    tumour = np.argwhere(tumour_mask(labels)).mean(0)
    brain = np.argwhere(brain_mask(labels)).mean(0)
    direction = brain - tumour
    direction[0] = 0.0  # in plane: the old and the new place show in one axial slice
    direction = direction / (np.linalg.norm(direction) or 1.0)
    k, j, i = direction * distance_mm
    return (-float(i), -float(j), float(k))  # identity direction: LPS = (i, j, k); RAS flips the first two


def main() -> int:
    import torch

    from MedSynthLib.synthesis.inpainting import DEFAULT_MARGIN_MM, InpaintingEngine, feather_weight
    from MedSynthLib.synthesis.models import resolve_model
    from MedSynthLib.synthesis.synthesize import SynthesisEngine
    from MedSynthLib.training.data import find_case_folders, prepare_volume

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="inpainting model (folder or registered name)")
    parser.add_argument("--synthesis-model", default=None, help="synthesis model (default: the registry's default)")
    parser.add_argument("--data", nargs="+", type=Path, required=True)
    parser.add_argument("--config", type=Path, required=True, help="training config holding cv_folds")
    parser.add_argument("--fold", type=int, required=True, help="the held-out fold (the model never saw it)")
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN_MM)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-cases", type=int, default=None, help="evaluate the first N held-out cases only")
    parser.add_argument("--mean-cases", type=int, default=None,
                        help="class means from the first N training cases only (default: all)")
    parser.add_argument("--no-move", action="store_true",
                        help="skip the 15 mm move (speed line and montage): the held-out scores only")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--montage", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    folds = json.loads(args.config.read_text())["cv_folds"]
    held = set(folds[args.fold])
    folders = [f for root in args.data for f in find_case_folders(root)]
    test = [f for f in folders if f.name in held][: args.max_cases]
    train = [f for f in folders if f.name not in held]
    means = training_class_means([prepare_volume(f, args.cache, "tissue_zscore") for f in train[: args.mean_cases]])
    inpainter = InpaintingEngine(resolve_model(args.model, kind="inpainting"), "cpu", "auto")
    synthesis = SynthesisEngine(resolve_model(args.synthesis_model), "cpu", "auto")
    spacing = (1.0, 1.0, 1.0)

    per_case = []
    for folder in test:
        labels, real, brain, tumour, region = real_tumour_region(folder, args.cache, args.margin)
        weight = feather_weight(region, spacing)
        # The network's values inside the region, without the feather (weight 1 everywhere in it).
        painted = inpainter.inpaint(labels, real, region, spacing, feather_mm=0.0).images
        full = synthesis.synth.predict(labels)
        fills = {"inpainting": painted,
                 "full_synthesis": {m: to_case_scale(full[c], real[m], brain) for c, m in enumerate(MODALITIES)},
                 "class_means": {}}
        for m in MODALITIES:
            z = np.zeros(labels.shape, np.float32)
            for value, mean in means[m].items():
                z[labels == value] = mean
            values = real[m][brain].astype(np.float64)
            fills["class_means"][m] = z * values.std() + values.mean()
        regions = {"region": region, "tumour": tumour}
        entry = {"case": folder.name, "region_voxels": int(region.sum()), "tumour_voxels": int(tumour.sum())}
        for name, fill in fills.items():
            pasted, blended = {}, {}
            for m in MODALITIES:
                pasted[m], blended[m] = pasted_and_blended(fill[m], real[m], region, weight)
            scores = {m: fidelity(real[m], pasted[m], brain, regions) for m in MODALITIES}
            passed, checked, failed = rules_passed(pasted, labels, region)
            entry[name] = {"fidelity": scores,
                           "region_ssim_feathered": {m: fidelity(real[m], blended[m], brain, regions)["region"]["ssim"]
                                                     for m in MODALITIES},
                           "seam_ratio": {m: seam_ratio(blended[m], real[m], region, brain) for m in MODALITIES},
                           "rules": {"passed": passed, "checked": checked, "failed": failed}}
        entry["full_synthesis_as_is"] = {m: fidelity(real[m], full[c], brain, regions)
                                         for c, m in enumerate(MODALITIES)}
        passed, checked, failed = rules_passed(real, labels, region)
        entry["real_rules"] = {"passed": passed, "checked": checked, "failed": failed}
        per_case.append(entry)
        ssim = {k: np.mean([entry[k]["fidelity"][m]["region"]["ssim"] for m in MODALITIES]) for k in METHODS}
        print(f"{folder.name}: region SSIM inpainting {ssim['inpainting']:.3f} full {ssim['full_synthesis']:.3f} "
              f"means {ssim['class_means']:.3f}", file=sys.stderr, flush=True)

    evaluated = [c["case"] for c in per_case]
    speed = None if args.no_move else move_speed_and_montage(args, per_case, test, inpainter, synthesis)

    summary = {}
    for name in (*METHODS, "full_synthesis_as_is"):
        block = {}
        for where in ("region", "tumour"):
            for metric in ("ssim", "psnr", "mae"):
                values = [(c[name]["fidelity"] if name in METHODS else c[name])[m][where][metric]
                          for c in per_case for m in MODALITIES]
                block[f"{where}_{metric}"] = float(np.mean(values))
        if name in METHODS:
            block["region_ssim_feathered"] = float(np.mean([c[name]["region_ssim_feathered"][m] for c in per_case
                                                            for m in MODALITIES]))
            block["seam_ratio_mean"] = float(np.mean([c[name]["seam_ratio"][m] for c in per_case for m in MODALITIES]))
            block["seam_ratio_max"] = float(np.max([c[name]["seam_ratio"][m] for c in per_case for m in MODALITIES]))
            block["rules_passed"] = int(sum(c[name]["rules"]["passed"] for c in per_case))
            block["rules_checked"] = int(sum(c[name]["rules"]["checked"] for c in per_case))
            block["per_modality_region_ssim"] = {m: float(np.mean([c[name]["fidelity"][m]["region"]["ssim"]
                                                                   for c in per_case])) for m in MODALITIES}
        summary[name] = block
    summary["real_rules_passed"] = int(sum(c["real_rules"]["passed"] for c in per_case))
    summary["real_rules_checked"] = int(sum(c["real_rules"]["checked"] for c in per_case))
    report = {"command": " ".join(sys.argv), "held_out": evaluated, "training_cases": len(train),
              "class_mean_cases": len(train[: args.mean_cases]),
              "inpainting_model": {"name": inpainter.model.name, "sha256": inpainter.model.sha256,
                                   "steps": inpainter.model.config["training"]["steps"]},
              "synthesis_model": {"name": synthesis.model.name, "sha256": synthesis.model.sha256},
              "margin_mm": args.margin, "summary": summary, "speed": speed, "per_case": per_case,
              "seconds": round(time.perf_counter() - started, 1)}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    print(text)
    return 0


def move_speed_and_montage(args, per_case: list, test: list, inpainter, synthesis) -> dict:
    """Move the tumour of the typical held-out case (median tumour size) by 15 mm towards the brain's centre:
    the re-render's time beside a full synthesis of the same brain, the contrast rules in the moved region, and
    the montage (``--montage``)."""
    from MedSynthLib.edits.transforms import Translate
    from MedSynthLib.schema.grid import Grid, LabelMap
    from MedSynthLib.synthesis.inpainting import changed_region
    from MedSynthLib.training.data import prepare_volume

    spacing = (1.0, 1.0, 1.0)
    typical = sorted(per_case, key=lambda c: c["tumour_voxels"])[len(per_case) // 2]["case"]
    test = [f for f in test if f.name == typical]
    volume = prepare_volume(test[0], args.cache, "tissue_zscore")
    labels, real = volume.labels, scanner_like(volume)
    grid = Grid(tuple(int(s) for s in labels.shape[::-1]), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0),
                (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    before = LabelMap(labels, grid, [{"name": "derive_labels", "params": {}, "schema_version": 1}])
    offset = move_towards_centre(labels, 15.0)
    moved = Translate(offset_ras_mm=offset)(before)
    edit_times, full_times = [], []
    for _ in range(3):
        start = time.perf_counter()
        region = changed_region(moved.array, tumour_mask(labels), args.margin, spacing, labels)
        result = inpainter.inpaint(moved.array, real, region, spacing)
        edit_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        synthesis.synth.predict(moved.array)
        full_times.append(time.perf_counter() - start)
    speed = {"case": test[0].name, "offset_ras_mm": [round(v, 2) for v in offset], "region_voxels": int(region.sum()),
             "inpaint_s": statistics.median(edit_times), "full_synthesis_s": statistics.median(full_times),
             "threads": args.threads}
    speed["ratio"] = speed["inpaint_s"] / speed["full_synthesis_s"]
    passed, checked, failed = rules_passed(result.images, moved.array, region)
    speed["moved_rules"] = {"passed": passed, "checked": checked, "failed": failed}
    if args.montage:
        write_montage(args.montage, real, result.images, labels, moved.array, region, test[0].name)
    return speed


def markdown(report: dict) -> str:
    s = report["summary"]
    lines = ["| method (region = real tumour + %g mm; scored pasted) | region SSIM | region PSNR dB | region MAE z | "
             "tumour SSIM | seam ratio mean / max (blended) | contrast rules in region | region SSIM blended |"
             % report["margin_mm"],
             "|---|---|---|---|---|---|---|---|"]
    names = {"inpainting": "inpainting (this model)", "full_synthesis": "full synthesis, its region",
             "class_means": "class means (training folds)"}
    for key, title in names.items():
        b = s[key]
        lines.append(f"| {title} | {b['region_ssim']:.3f} | {b['region_psnr']:.2f} | {b['region_mae']:.3f} | "
                     f"{b['tumour_ssim']:.3f} | {b['seam_ratio_mean']:.2f} / {b['seam_ratio_max']:.2f} | "
                     f"{b['rules_passed']}/{b['rules_checked']} | {b['region_ssim_feathered']:.3f} |")
    b = s["full_synthesis_as_is"]
    lines.append(f"| full synthesis as is (as `medsynth evaluate`) | {b['region_ssim']:.3f} | {b['region_psnr']:.2f} | "
                 f"{b['region_mae']:.3f} | {b['tumour_ssim']:.3f} | - | - | - |")
    lines.append("| real images (contrast rules only) | | | | | | "
                 f"{s['real_rules_passed']}/{s['real_rules_checked']} | |")
    lines += ["", "Region SSIM per modality (inpainting): " + ", ".join(
        f"{m} {v:.3f}" for m, v in s["inpainting"]["per_modality_region_ssim"].items())]
    sp = report["speed"]
    if sp is not None:
        failed = sp["moved_rules"]["failed"]
        lines += ["", f"Speed ({sp['threads']} torch threads, shared machine, median of 3): re-rendering a 15 mm "
                  f"move of {sp['case']} ({sp['region_voxels']} voxels in the region) {sp['inpaint_s']:.2f} s; a "
                  f"full synthesis of the same brain with the synthesis model in the same run "
                  f"{sp['full_synthesis_s']:.2f} s (ratio {sp['ratio']:.2f}). Contrast rules in the moved region: "
                  f"{sp['moved_rules']['passed']}/{sp['moved_rules']['checked']}"
                  + (f" (failed: {', '.join(failed)})" if failed else "") + "."]
    lines += ["", "Per case (mean over the four contrasts):", "",
              "| case | region voxels | inpainting SSIM | full synthesis SSIM | class means SSIM | inpainting seam |",
              "|---|---|---|---|---|---|"]
    for c in report["per_case"]:
        row = [np.mean([c[k]["fidelity"][m]["region"]["ssim"] for m in MODALITIES]) for k in METHODS]
        seam = np.mean([c["inpainting"]["seam_ratio"][m] for m in MODALITIES])
        lines.append(f"| {c['case']} | {c['region_voxels']} | {row[0]:.3f} | {row[1]:.3f} | {row[2]:.3f} | "
                     f"{seam:.2f} |")
    return "\n".join(lines) + "\n"


def write_montage(path: Path, real: dict, edited: dict, labels: np.ndarray, moved: np.ndarray, region: np.ndarray,
                  case: str) -> None:
    """Axial slices through the old and the new tumour centre: real and edited, four contrasts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    old_k = int(np.argwhere(tumour_mask(labels))[:, 0].mean())
    rows = [("real", real, old_k), ("edited", edited, old_k)]
    fig, axes = plt.subplots(len(rows), len(MODALITIES), figsize=(3.2 * len(MODALITIES), 3.6 * len(rows)))
    for r, (title, images, k) in enumerate(rows):
        for c, m in enumerate(MODALITIES):
            ax = axes[r, c]
            values = real[m][labels > 0]
            low, high = np.percentile(values, [1, 99.5])
            ax.imshow(images[m][k], cmap="gray", vmin=low, vmax=high, origin="lower")
            ax.contour(tumour_mask(labels[k]).astype(float), levels=[0.5], colors="cyan", linewidths=0.6)
            ax.contour(tumour_mask(moved[k]).astype(float), levels=[0.5], colors="red", linewidths=0.6)
            ax.contour(region[k].astype(float), levels=[0.5], colors="yellow", linewidths=0.6, linestyles="dashed")
            ax.set_title(f"{title}, {m} (slice {k})", fontsize=8)
            ax.axis("off")
    fig.suptitle(f"{case}: tumour moved 15 mm in plane. Cyan: old tumour (vacated place), red: new tumour, "
                 "yellow dashed: region re-rendered (outside it the real voxels)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    raise SystemExit(main())
