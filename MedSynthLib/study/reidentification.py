"""Re-identification attack on synthetic cases: can a case be matched to its source patient?

Two channels, each scored as top-1 accuracy against chance (1 / number of real patients):

- **tumour shape**: the whole-tumour mask of the query is compared with every real
  patient's after registration of the two shapes: ``centroid`` aligns centres only;
  ``similarity`` also aligns principal axes (all eight axis sign patterns, so mirrored
  tumours are found) and volume, which undoes the rotations, flips, scalings and moves
  that the random tumour edits apply.  Score: Dice of the aligned masks.
- **image**: the query brain is registered to a common reference (SimpleITK, affine,
  Mattes mutual information) and compared by normalised cross-correlation inside the
  brain with every real patient's brain, registered to the same reference once.  The
  nearest real patient and its NCC are also the nearest-neighbour check.

An attack that cannot re-identify an unedited case proves nothing about an edited one,
so every run also attacks unedited cases (their own label map, moved by a random rigid
transform), which it must re-identify.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

#: Shapes are compared on this isotropic lattice (mm) after normalisation.
SHAPE_LATTICE_MM = 3.0
#: Every shape is scaled to this volume (mm^3) for the ``similarity`` alignment.
SHAPE_VOLUME_MM3 = 60000.0


@dataclass
class Shape:
    """A tumour mask as the physical positions (mm) of its voxels."""

    name: str
    points: np.ndarray  # (n, 3) mm

    @classmethod
    def from_mask(cls, name: str, mask: np.ndarray, spacing: Sequence[float], *, step: int = 1) -> "Shape":
        """``mask`` in array order with ``spacing`` in the same order; every ``step``-th voxel per axis."""
        sub = np.asarray(mask, bool)[::step, ::step, ::step]
        points = np.argwhere(sub).astype(np.float64) * (np.asarray(spacing, float) * step)
        return cls(name, points)

    @property
    def volume_points(self) -> int:
        return int(len(self.points))


def _normalised(points: np.ndarray, similarity: bool) -> list[np.ndarray]:
    """Centred points; with ``similarity`` also rotated to principal axes (8 sign patterns), scaled."""
    centred = points - points.mean(axis=0)
    if not similarity:
        return [centred]
    _, vectors = np.linalg.eigh(np.cov(centred.T) + 1e-9 * np.eye(3))
    aligned = centred @ vectors
    # Scale so that the (convex-hull-free) volume proxy, the product of the axis SDs, is fixed.
    sd = np.sqrt(np.maximum(np.var(aligned, axis=0), 1e-9))
    scale = (SHAPE_VOLUME_MM3 / (np.prod(sd) * 8 * math.pi)) ** (1.0 / 3.0)
    aligned = aligned * scale
    return [aligned * np.array(signs) for signs in itertools.product((1.0, -1.0), repeat=3)]


def _rasterise(points: np.ndarray, lattice: float) -> set[tuple[int, int, int]]:
    return set(map(tuple, np.floor(points / lattice).astype(np.int64).tolist()))


def shape_dice(query: Shape, candidate: Shape, *, similarity: bool) -> float:
    """Dice of the two tumour shapes after centroid (or similarity) alignment."""
    if query.volume_points == 0 or candidate.volume_points == 0:
        return 0.0
    from scipy import ndimage

    lattice = SHAPE_LATTICE_MM
    target = _normalised(candidate.points, similarity)[0]
    best = 0.0
    for moved in _normalised(query.points, similarity):
        both = np.concatenate([moved, target])
        lo = np.floor(both.min(axis=0) / lattice).astype(int) - 2
        shape = np.floor(both.max(axis=0) / lattice).astype(int) - lo + 3
        grids = []
        for pts in (moved, target):
            grid = np.zeros(shape, bool)
            idx = np.floor(pts / lattice).astype(int) - lo
            grid[tuple(idx.T)] = True
            grids.append(ndimage.binary_closing(grid, iterations=1))
        a, b = grids
        dice = 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))
        best = max(best, float(dice))
    return best


def rank_candidates(scores: dict[str, float]) -> list[str]:
    return sorted(scores, key=lambda k: (-scores[k], k))


def attack_summary(queries: list[dict[str, Any]], n_candidates: int) -> dict[str, Any]:
    """Top-1 accuracy of queries whose ``source`` is among the candidates, against chance."""
    scored = [q for q in queries if q.get("source") is not None]
    hits = sum(1 for q in scored if q["ranking"] and q["ranking"][0] == q["source"])
    ranks = [q["ranking"].index(q["source"]) + 1 for q in scored if q["source"] in q["ranking"]]
    n = len(scored)
    p = None
    if n:
        from scipy.stats import binomtest

        p = float(binomtest(hits, n, 1.0 / n_candidates, alternative="greater").pvalue)
    return {"queries": n, "top1_hits": hits, "top1_accuracy": hits / n if n else None,
            "chance": 1.0 / n_candidates, "median_rank": float(np.median(ranks)) if ranks else None,
            "p_above_chance": p}


def shape_attack(queries: list[tuple[Shape, str | None]], candidates: list[Shape], *,
                 similarity: bool) -> dict[str, Any]:
    """Match each query tumour to every candidate patient's; ``source`` is the true patient (or None)."""
    out = []
    for shape, source in queries:
        scores = {c.name: shape_dice(shape, c, similarity=similarity) for c in candidates}
        ranking = rank_candidates(scores)
        out.append({"query": shape.name, "source": source, "ranking": ranking, "best": ranking[0],
                    "best_dice": scores[ranking[0]], "source_dice": scores.get(source) if source else None})
    return {"alignment": "similarity" if similarity else "centroid", "cases": out,
            "summary": attack_summary(out, len(candidates))}


# --- image channel -----------------------------------------------------------------------------


def register_to_reference(image: Any, reference: Any, *, iterations: int = 200, affine: bool = False) -> Any:
    """Rigid (or affine) registration, Mattes MI, of a SimpleITK image onto ``reference``'s grid."""
    import SimpleITK as sitk

    fixed = sitk.Cast(reference, sitk.sitkFloat32)
    moving = sitk.Cast(image, sitk.sitkFloat32)
    initial = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3) if affine
                                                else sitk.Euler3DTransform(),
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.2, seed=2018)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(2.0, 1e-3, iterations, relaxationFactor=0.7)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1.0, 0.0])
    method.SetInitialTransform(initial, inPlace=False)
    transform = method.Execute(fixed, moving)
    return sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def brain_ncc(a: np.ndarray, b: np.ndarray) -> float:
    """NCC over the union of the two brains (non-zero voxels), each z-scored there."""
    union = (a != 0) | (b != 0)
    if np.count_nonzero(union) < 2:
        return 0.0
    x, y = a[union].astype(np.float64), b[union].astype(np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denom) if denom > 0 else 0.0


def image_attack(queries: list[tuple[str, np.ndarray, str | None]], candidates: dict[str, np.ndarray]
                 ) -> dict[str, Any]:
    """Queries and candidates already registered to one reference grid; NCC ranking per query.

    Also the nearest-neighbour check: each query's nearest real patient and NCC, beside
    the NCC of every real patient to its nearest other real patient.
    """
    names = sorted(candidates)
    out = []
    for name, image, source in queries:
        scores = {c: brain_ncc(image, candidates[c]) for c in names}
        ranking = rank_candidates(scores)
        out.append({"query": name, "source": source, "ranking": ranking, "best": ranking[0],
                    "best_ncc": scores[ranking[0]], "source_ncc": scores.get(source) if source else None})
    real_nn = {}
    for a in names:
        real_nn[a] = max(brain_ncc(candidates[a], candidates[b]) for b in names if b != a) if len(names) > 1 else None
    return {"cases": out, "summary": attack_summary(out, len(names)), "real_nearest_neighbour_ncc": real_nn}


# --- the attack on real cases -------------------------------------------------------------------


def _rigid_points(points: np.ndarray, rng: np.random.Generator, degrees: float, shift_mm: float) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    rotation = Rotation.from_euler("xyz", rng.uniform(-degrees, degrees, 3), degrees=True).as_matrix()
    centre = points.mean(axis=0)
    return (points - centre) @ rotation.T + centre + rng.uniform(-shift_mm, shift_mm, 3)


def real_case_files(roots: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """``{case id: {"t1": path, "seg": path}}`` for every BraTS case folder under ``roots``."""
    from pathlib import Path

    from ..training.data import find_case_folders

    out: dict[str, dict[str, Any]] = {}
    for root in roots:
        for folder in find_case_folders(Path(root)):
            files = {k: next(iter(sorted(folder.glob(f"*_{k}.nii*"))), None) for k in ("t1", "seg")}
            if files["t1"] is not None and files["seg"] is not None:
                out[folder.name] = files
    return out


def run_on_real_cases(roots: Sequence[Any], *, seed: int = 2018, template_queries: int | None = None,
                      image_spacing_mm: float = 3.0, progress: Any = None) -> dict[str, Any]:
    """The attack on real BraTS cases: unedited (moved) cases, tumours placed in the template.

    Query sets: ``unedited`` (each case's own whole-tumour mask under a random rigid motion
    of up to 10 degrees and 10 mm; its T1 likewise, registered back), ``template_insert``
    (each case's tumour inserted into the ICBM152 template and moved, rotated, scaled and
    possibly mirrored by the study's random transform edit), ``template_parametric`` (a
    parametric tumour in the template: no source patient, the best match is reported).
    """
    import SimpleITK as sitk

    from ..cases.template import template_label_map, template_t1
    from ..edits import InsertTumour, RandomTumourEdit
    from ..schema.grid import Grid, LabelMap
    from ..schema.errors import EditError
    from ..schema.grid import lps_to_ras
    from ..schema.labels import Label, tumour_to_schema
    from ..schema.volume_io import read_image

    say = progress or (lambda message: None)
    rng = np.random.default_rng(seed)
    files = real_case_files(roots)
    names = sorted(files)
    tumours: dict[str, LabelMap] = {}
    shapes: dict[str, Shape] = {}
    t1s: dict[str, sitk.Image] = {}
    for name in names:
        seg_image = read_image(files[name]["seg"])
        tumour = tumour_to_schema(sitk.GetArrayFromImage(seg_image), "brats2021").astype(np.uint8)
        tumours[name] = LabelMap(tumour, Grid.from_image(seg_image))
        spacing = seg_image.GetSpacing()[::-1]
        shapes[name] = Shape.from_mask(name, tumour >= Label.NCR, spacing, step=2)
        t1 = read_image(files[name]["t1"])
        shrink = [max(1, int(round(image_spacing_mm / s))) for s in t1.GetSpacing()]
        t1s[name] = sitk.Shrink(sitk.Cast(t1, sitk.sitkFloat32), shrink)
    say(f"read {len(names)} real cases")
    candidates = [shapes[n] for n in names]
    unedited = [(Shape(f"{n} (moved)", _rigid_points(shapes[n].points, rng, 10.0, 10.0)), n) for n in names]

    template = template_label_map()
    transform_edit = RandomTumourEdit(p_parametric=0.0)
    parametric_edit = RandomTumourEdit(p_parametric=1.0)
    donors = names if template_queries is None else names[:template_queries]
    inserted, parametric = [], []
    skipped: dict[str, str] = {}
    brain_centre = tuple(float(v) for v in lps_to_ras(template.grid.index_to_lps(
        np.argwhere(template.array > 0).mean(axis=0)[::-1])))
    for i, n in enumerate(donors):
        edited = None
        for centre in (None, brain_centre):  # relative placement first, the brain centre if it does not fit
            try:
                placed = InsertTumour(source=n, centre_ras_mm=centre)(template, tumours[n])
                edited = transform_edit(placed, seed + i)
                break
            except EditError as exc:
                skipped[n] = str(exc)
        if edited is None:
            continue
        skipped.pop(n, None)
        spacing = edited.grid.spacing[::-1]
        inserted.append((Shape.from_mask(f"template + {n}", edited.array >= Label.NCR, spacing, step=2), n))
        drawn = parametric_edit(template, seed + 1000 + i)
        parametric.append((Shape.from_mask(f"template + parametric {i}", drawn.array >= Label.NCR, spacing,
                                           step=2), None))
    say(f"made {len(inserted)} template tumours")
    shape_results: dict[str, Any] = {}
    for label, queries in (("unedited", unedited), ("template_insert", inserted),
                           ("template_parametric", parametric)):
        shape_results[label] = {align: shape_attack(queries, candidates, similarity=align == "similarity")
                                for align in ("centroid", "similarity")}
        say(f"shape attack on {label} done")

    # BraTS cases are co-registered (SRI24): their mean, each scaled by its 99th brain percentile, is the
    # common reference every query is registered to.
    registered = {}
    for n in names:
        array = sitk.GetArrayFromImage(sitk.Resample(t1s[n], t1s[names[0]], sitk.Transform(), sitk.sitkLinear, 0.0,
                                                     sitk.sitkFloat32))
        registered[n] = array / max(float(np.percentile(array[array > 0], 99)), 1e-6)
    reference = sitk.GetImageFromArray(np.mean([registered[n] for n in names], axis=0).astype(np.float32))
    reference.CopyInformation(t1s[names[0]])
    image_queries = []
    for n in names:
        motion = sitk.Euler3DTransform()
        motion.SetCenter(reference.TransformContinuousIndexToPhysicalPoint([v / 2 for v in reference.GetSize()]))
        angles = np.deg2rad(rng.uniform(-10, 10, 3))
        motion.SetRotation(*[float(a) for a in angles])
        motion.SetTranslation([float(v) for v in rng.uniform(-10, 10, 3)])
        moved = sitk.Resample(t1s[n], t1s[n], motion, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        back = register_to_reference(moved, reference)
        image_queries.append((f"{n} (moved, registered)", sitk.GetArrayFromImage(back), n))
    step = max(1, int(round(image_spacing_mm)))
    template_image = register_to_reference(sitk.Shrink(sitk.Cast(template_t1(), sitk.sitkFloat32), [step] * 3),
                                           reference, affine=True)
    template_array = sitk.GetArrayFromImage(template_image)
    template_queries_image = [(f"template image (tumour of {n})", template_array, n) for n in donors]
    images = {"unedited": image_attack(image_queries, registered),
              "template": image_attack(template_queries_image, registered)}
    say("image attack done")
    return {"cases": names, "n_candidates": len(names), "seed": seed, "shape": shape_results, "image": images,
            "template_insert_skipped": skipped,
            "settings": {"shape_lattice_mm": SHAPE_LATTICE_MM, "shape_sampling_mm": 2.0,
                         "image_spacing_mm": image_spacing_mm, "unedited_motion": "rotation <= 10 deg, shift <= 10 mm",
                         "image_registration": "rigid, Mattes MI, to the mean of the real T1s (template: affine)",
                         "template_edit": "InsertTumour into ICBM152 + RandomTumourEdit(p_parametric=0)"}}


def render_markdown(result: dict[str, Any]) -> str:
    """The attack's tables (numbers only; the reading is left to the report that cites them)."""

    def row(label: str, summary: dict[str, Any]) -> str:
        acc = summary["top1_accuracy"]
        p = summary["p_above_chance"]
        return (f"| {label} | {summary['queries']} | {summary['top1_hits']} | "
                f"{'–' if acc is None else f'{acc:.2f}'} | {summary['chance']:.3f} | "
                f"{'–' if summary['median_rank'] is None else format(summary['median_rank'], 'g')} | "
                f"{'–' if p is None else f'{p:.2g}'} |")

    lines = [f"Candidates: {result['n_candidates']} real patients. Settings: "
             + "; ".join(f"{k} = {v}" for k, v in result["settings"].items()) + ".", "",
             "| Query set / channel | queries | top-1 hits | top-1 accuracy | chance | median rank of source | "
             "p (binomial, above chance) |", "|---|---|---|---|---|---|---|"]
    for label, by_alignment in result["shape"].items():
        for alignment, attack in by_alignment.items():
            lines.append(row(f"{label}, tumour shape ({alignment})", attack["summary"]))
    for label, attack in result["image"].items():
        lines.append(row(f"{label}, image (T1, NCC after registration)", attack["summary"]))
    lines += ["", "Best shape Dice of the parametric template tumours (no source patient): "
              + ", ".join(f"{c['best_dice']:.2f} ({c['best']})"
                          for c in result["shape"]["template_parametric"]["similarity"]["cases"]) + "."]
    real_nn = [v for v in result["image"]["unedited"]["real_nearest_neighbour_ncc"].values() if v is not None]
    if real_nn:
        lines.append(f"Nearest-neighbour NCC between distinct real patients: median {np.median(real_nn):.3f}, "
                     f"max {max(real_nn):.3f}; the template image's nearest patient: "
                     f"{result['image']['template']['cases'][0]['best_ncc']:.3f}.")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m MedSynthLib.study.reidentification ROOT... -o FOLDER``: the attack on real cases."""
    import argparse
    import json
    import sys
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m MedSynthLib.study.reidentification")
    parser.add_argument("roots", nargs="+", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=2018)
    args = parser.parse_args(argv)
    result = run_on_real_cases(args.roots, seed=args.seed,
                               progress=lambda m: print(f"re-identification: {m}", file=sys.stderr, flush=True))
    args.output.mkdir(parents=True, exist_ok=True)
    for name, text in (("reidentification.json", json.dumps(result, indent=1)),
                       ("reidentification.md", render_markdown(result))):
        tmp = args.output / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(args.output / name)
    return 0


__all__ = ["Shape", "shape_dice", "shape_attack", "attack_summary", "register_to_reference", "brain_ncc",
           "image_attack", "SHAPE_LATTICE_MM", "real_case_files", "run_on_real_cases"]


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
