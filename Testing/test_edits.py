"""Tests of MedSynthLib.edits: tumour edits as pure functions on label maps.

Small synthetic brains (ellipsoid with WM core, GM shell, CSF rim and ventricle,
and an NCR/ET/ED tumour) are built on several grids: isotropic, anisotropic,
BraTS-like LPS direction diag(-1, -1, 1) and an axis-permuting direction, so
that every RAS <-> index conversion is exercised.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from MedSynthLib.edits import (
                               EDITS,
                               Flip,
                               InsertTumour,
                               ParametricTumour,
                               RandomTumourEdit,
                               Rotate,
                               Scale,
                               Translate,
                               composite,
                               edit_from_record,
                               healthy_anatomy,
                               replay,
                               tumour_centre,
                               )
from MedSynthLib.edits.random_edits import RandomTumourDraw
from MedSynthLib.schema.errors import EditError
from MedSynthLib.schema.grid import Grid, LabelMap, lps_to_ras
from MedSynthLib.schema.labels import Label, tumour_to_schema

REPO_ROOT = Path(__file__).resolve().parents[1]

# --- synthetic data ------------------------------------------------------------------------

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
LPS_FLIP = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # BraTS / NIfTI-RAS images seen by ITK
PERMUTED = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # i runs along y, j along x, k down

GRIDS = {
    "iso": ((1.0, 1.0, 1.0), IDENTITY),
    "aniso": ((0.9, 1.2, 2.0), IDENTITY),
    "brats_lps": ((1.0, 1.0, 1.0), LPS_FLIP),
    "aniso_lps": ((0.9, 1.2, 2.0), LPS_FLIP),
    "permuted": ((1.1, 1.0, 1.5), PERMUTED),
}
SHAPE = (48, 64, 64)  # numpy (k, j, i)


def make_grid(spacing, direction, shape=SHAPE, origin=(12.0, -30.0, 7.0)) -> Grid:
    return Grid((shape[2], shape[1], shape[0]), tuple(spacing), tuple(origin), tuple(direction))


def synthetic_brain(grid: Grid, tumour_at=(0.62, 0.5, 0.5), radii_mm=(3.5, 6.0, 9.0),
                    brain_fraction=0.42) -> LabelMap:
    """Ellipsoid brain (WM core, GM shell, CSF rim + ventricle) with an NCR/ET/ED tumour.

    Args:
        tumour_at: tumour centre as a fraction of the (i, j, k) size, or ``None``.
        radii_mm: outer radii of NCR, ET and ED (mm).
    """
    size = np.asarray(grid.size, float)
    k, j, i = np.indices(grid.shape, dtype=float)
    idx = (i, j, k)
    centre = (size - 1) / 2
    r = np.sqrt(sum(((idx[a] - centre[a]) / (brain_fraction * size[a])) ** 2 for a in range(3)))
    labels = np.zeros(grid.shape, np.uint8)
    labels[r < 1.0] = Label.CSF
    labels[r < 0.9] = Label.GM
    labels[r < 0.72] = Label.WM
    ventricle = np.sqrt(sum(((idx[a] - centre[a]) / (0.08 * size[a])) ** 2 for a in range(3)))
    labels[ventricle < 1.0] = Label.CSF
    if tumour_at is not None:
        c = np.asarray(tumour_at) * (size - 1)
        d = np.sqrt(sum(((idx[a] - c[a]) * grid.spacing[a]) ** 2 for a in range(3)))
        brain = labels > 0
        for value, radius in zip((Label.ED, Label.ET, Label.NCR), radii_mm[::-1]):
            labels[(d < radius) & brain] = value
    return LabelMap(labels, grid)


@pytest.fixture(params=sorted(GRIDS))
def brain(request) -> LabelMap:
    spacing, direction = GRIDS[request.param]
    return synthetic_brain(make_grid(spacing, direction))


def counts(labels: np.ndarray) -> dict[int, int]:
    return {v: int(np.count_nonzero(labels == v)) for v in (Label.NCR, Label.ED, Label.ET)}


def tumour_volume(lm: LabelMap) -> float:
    return float(np.count_nonzero(lm.array >= Label.NCR)) * lm.grid.voxel_volume_mm3


def centre_ras(lm: LabelMap) -> np.ndarray:
    return lps_to_ras(tumour_centre(lm))


def index_to_ras(lm: LabelMap, ijk) -> tuple[float, float, float]:
    return tuple(float(v) for v in lps_to_ras(lm.grid.index_to_lps(np.asarray(ijk, float))))


def brain_centre_ras(lm: LabelMap) -> np.ndarray:
    nz = np.argwhere(lm.array > 0)
    lo, hi = nz.min(axis=0), nz.max(axis=0)
    return lps_to_ras(lm.grid.index_to_lps(((lo + hi) / 2.0)[::-1]))


def check_invariants(before: LabelMap, snapshot: np.ndarray, after: LabelMap, refilled: bool = True) -> None:
    """The rules every edit must keep."""
    assert np.array_equal(before.array, snapshot), "input array was modified"
    assert after.array is not before.array
    assert after.array.dtype == np.uint8 and after.array.max() <= 6
    brain = before.array > 0
    assert np.array_equal(after.array > 0, brain), "background changed"
    assert not np.any((after.array >= Label.NCR) & ~brain)
    if refilled:
        vacated = (before.array >= Label.NCR) & (after.array < Label.NCR)
        healthy = healthy_anatomy(before.array, before.grid.spacing)
        assert np.all((after.array[vacated] >= 1) & (after.array[vacated] <= 3))
        assert np.array_equal(after.array[vacated], healthy[vacated])
    assert len(after.history) == len(before.history) + 1
    record = after.history[-1]
    assert json.loads(json.dumps(record)) == record
    assert edit_from_record(record).to_record() == record


# --- helpers ---------------------------------------------------------------------------------


def test_healthy_anatomy_refills_tumour_with_nearest_anatomy(brain):
    out = healthy_anatomy(brain.array, brain.grid.spacing)
    tumour = brain.array >= Label.NCR
    assert np.array_equal(out[~tumour], brain.array[~tumour])
    assert np.all((out[tumour] >= 1) & (out[tumour] <= 3))
    # Same as the full-volume distance transform (ties may break differently).
    anatomy = (brain.array >= 1) & (brain.array <= 3)
    _, idx = ndimage.distance_transform_edt(~anatomy, sampling=brain.grid.spacing[::-1], return_indices=True)
    reference = brain.array[tuple(idx)]
    assert np.mean(out[tumour] == reference[tumour]) > 0.99


def test_healthy_anatomy_grows_its_box_when_anatomy_is_far():
    labels = np.zeros((20, 20, 40), np.uint8)
    labels[5:15, 5:15, 2:6] = Label.GM
    labels[5:15, 5:15, 6:38] = Label.ED  # only anatomy lies > 8 voxels away for most tumour voxels
    out = healthy_anatomy(labels)
    assert np.all(out[5:15, 5:15, 2:38] == Label.GM)
    only_tumour = np.where(labels > 0, Label.ET, 0).astype(np.uint8)
    assert np.all(healthy_anatomy(only_tumour)[only_tumour > 0] == Label.WM)


def test_composite_clips_oedema_and_refuses_core_outside():
    brain = np.zeros((10, 10, 10), bool)
    brain[2:8, 2:8, 2:8] = True
    anatomy = np.where(brain, Label.WM, 0).astype(np.uint8)
    tumour = np.zeros_like(anatomy)
    tumour[1:4, 4:6, 4:6] = Label.ED
    tumour[4:6, 4:6, 4:6] = Label.ET
    out = composite(anatomy, tumour, brain)
    assert not np.any(out[~brain]) and np.count_nonzero(out == Label.ED) == 8
    tumour[7:9, 4:6, 4:6] = Label.NCR
    with pytest.raises(EditError, match="outside the brain"):
        composite(anatomy, tumour, brain)


# --- Translate -------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [(6.0, 0.0, 0.0), (-4.0, 5.0, 3.0), (2.5, -3.7, 4.2), (0.0, 0.0, -6.0)])
def test_translate_keeps_counts_and_moves_centroid_in_ras(brain, offset):
    snapshot = brain.array.copy()
    out = Translate(offset)(brain)
    check_invariants(brain, snapshot, out)
    assert counts(out.array) == counts(brain.array)
    moved = centre_ras(out) - centre_ras(brain)
    # Rounded to whole voxels: at most half a voxel off along each grid axis.
    ijk_error = np.linalg.solve(brain.grid.index_to_lps_matrix, lps_to_ras(moved - np.asarray(offset)))
    assert np.all(np.abs(ijk_error) <= 0.5 + 1e-9), (moved, offset)


@pytest.mark.parametrize("offset", [(100.0, 0.0, 0.0), (0.0, -45.0, 0.0), (0.0, 0.0, 500.0)])
def test_translate_out_of_the_brain_is_refused(brain, offset):
    # A move past the grid's diagonal is refused before anything is computed; a shorter one by the brain.
    message = "larger than the grid's diagonal" if np.linalg.norm(offset) > 130 else "outside the brain"
    with pytest.raises(EditError, match=message):
        Translate(offset)(brain)


def test_huge_scale_is_refused_without_a_huge_box():
    import tracemalloc

    lm = synthetic_brain(make_grid(*GRIDS["aniso_lps"]))
    tracemalloc.start()
    try:
        with pytest.raises(EditError, match="outside the brain"):
            Scale((15.0, 15.0, 15.0))(lm)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Work stays on the grid (measured: 34x the uint8 label map, about four float64 copies); the box of
    # the 15x tumour (~270 voxels a side) would take > 150 MB.  Its speed: benchmarks/bench_edits.py.
    assert peak < 64 * lm.array.nbytes


def test_edit_without_tumour_is_refused():
    lm = synthetic_brain(make_grid(*GRIDS["iso"]), tumour_at=None)
    for edit in (Translate((1, 0, 0)), Rotate((0, 0, 10)), Scale((2, 2, 2)), Flip("LR")):
        with pytest.raises(EditError, match="no tumour"):
            edit(lm)


# --- Rotate / Scale / Flip ----------------------------------------------------------------


@pytest.mark.parametrize("angles", [(0.0, 0.0, 90.0), (90.0, 0.0, 0.0), (0.0, 0.0, -90.0)])
def test_rotate_90_keeps_centroid_and_volume(brain, angles):
    snapshot = brain.array.copy()
    out = Rotate(angles)(brain)
    check_invariants(brain, snapshot, out)
    assert np.linalg.norm(centre_ras(out) - centre_ras(brain)) <= max(brain.grid.spacing)
    assert tumour_volume(out) == pytest.approx(tumour_volume(brain), rel=0.10)


def test_rotate_turns_an_elongated_tumour():
    grid = make_grid(*GRIDS["brats_lps"])
    lm = Scale((2.0, 1.0, 1.0))(synthetic_brain(grid, tumour_at=(0.5, 0.62, 0.5), radii_mm=(2, 3, 4)))

    def extent(m: LabelMap) -> np.ndarray:  # RAS extent of the tumour
        ras = lps_to_ras(m.grid.index_to_lps(np.argwhere(m.array >= Label.NCR)[:, ::-1]).T).T
        return ras.max(axis=0) - ras.min(axis=0)

    before, after = extent(lm), extent(Rotate((0, 0, 90))(lm))
    assert before[0] > 1.5 * before[1] and after[1] > 1.5 * after[0]


@pytest.mark.parametrize("factors", [(0.7, 0.7, 0.7), (1.3, 1.3, 1.3), (1.0, 1.0, 2.0), (1.2, 0.8, 1.0)])
def test_scale_multiplies_volume(brain, factors):
    snapshot = brain.array.copy()
    out = Scale(factors)(brain)
    check_invariants(brain, snapshot, out)
    assert tumour_volume(out) / tumour_volume(brain) == pytest.approx(float(np.prod(factors)), rel=0.15)
    assert np.linalg.norm(centre_ras(out) - centre_ras(brain)) <= max(brain.grid.spacing)


@pytest.mark.parametrize("axis,ras_axis", [("LR", 0), ("AP", 1), ("SI", 2)])
def test_flip_about_tumour_is_exact_in_place(brain, axis, ras_axis):
    snapshot = brain.array.copy()
    out = Flip(axis, "tumour")(brain)
    check_invariants(brain, snapshot, out)
    assert counts(out.array) == counts(brain.array)
    assert np.linalg.norm(centre_ras(out) - centre_ras(brain)) <= 0.5 * max(brain.grid.spacing) + 1e-9


def test_flip_about_brain_moves_to_other_hemisphere(brain):
    snapshot = brain.array.copy()
    out = Flip("LR", "brain")(brain)
    check_invariants(brain, snapshot, out)
    assert counts(out.array) == counts(brain.array)
    before, after, mid = centre_ras(brain), centre_ras(out), brain_centre_ras(brain)
    assert after[0] == pytest.approx(2 * mid[0] - before[0], abs=max(brain.grid.spacing))
    assert after[1:] == pytest.approx(before[1:], abs=1e-6)
    if abs(before[0] - mid[0]) > 3:  # the tumour was clearly in one hemisphere
        assert np.sign(after[0] - mid[0]) == -np.sign(before[0] - mid[0])


@pytest.mark.parametrize("bad", [lambda: Flip("XY"), lambda: Flip("LR", "skull"), lambda: Scale((0, 1, 1)),
                                 lambda: Translate((1, 2)), lambda: ParametricTumour((0, 0, 0), (-1, 2, 2)),
                                 lambda: ParametricTumour((0, 0, 0), (5, 5, 5), irregularity=2.0)])
def test_bad_parameters_are_refused(bad):
    with pytest.raises(EditError):
        bad()


# --- InsertTumour ------------------------------------------------------------------------------


def brain_box_relative(lm: LabelMap) -> np.ndarray:
    """Tumour centre relative to the brain's LPS bounding box."""
    nz = np.argwhere(lm.array > 0)
    lo, hi = nz.min(axis=0), nz.max(axis=0)
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])], float)
    lps = lm.grid.index_to_lps(corners[:, ::-1])
    return (tumour_centre(lm) - lps.min(axis=0)) / (lps.max(axis=0) - lps.min(axis=0))


@pytest.mark.parametrize("target_grid", sorted(GRIDS))
def test_insert_places_at_relative_position_across_grids(target_grid):
    source = synthetic_brain(make_grid((1.0, 1.0, 1.0), LPS_FLIP, origin=(-50, 80, -3)), tumour_at=(0.35, 0.6, 0.55))
    target = synthetic_brain(make_grid(*GRIDS[target_grid]), tumour_at=(0.62, 0.5, 0.5))
    snapshot = target.array.copy()
    out = InsertTumour(source="brats_case")(target, source)
    check_invariants(target, snapshot, out)
    assert np.abs(brain_box_relative(out) - brain_box_relative(source)).max() < 0.05
    assert tumour_volume(out) == pytest.approx(tumour_volume(source), rel=0.15)
    assert out.history[-1]["params"] == {"centre_ras_mm": None, "keep_existing": False, "source": "brats_case"}


def test_insert_at_ras_point_keeping_existing_tumour():
    grid = make_grid(*GRIDS["aniso_lps"])
    target = synthetic_brain(grid, tumour_at=(0.62, 0.5, 0.5))
    source = synthetic_brain(make_grid(*GRIDS["iso"]), tumour_at=(0.5, 0.5, 0.5), radii_mm=(2, 3, 5))
    point = index_to_ras(target, (0.35 * 63, 0.5 * 63, 0.5 * 47))
    snapshot = target.array.copy()
    out = InsertTumour(centre_ras_mm=point, keep_existing=True)(target, source)
    check_invariants(target, snapshot, out, refilled=False)
    old = target.array >= Label.NCR
    assert np.array_equal(out.array[old], target.array[old])  # the existing tumour is still there
    new = (out.array >= Label.NCR) & ~old
    centre = lps_to_ras(grid.index_to_lps(np.argwhere(new).mean(axis=0)[::-1]))
    assert np.linalg.norm(centre - np.asarray(point)) < 2 * max(grid.spacing)


def test_insert_records_the_source_identifier_only():
    source = synthetic_brain(make_grid(*GRIDS["iso"]), tumour_at=(0.4, 0.5, 0.5))
    target = synthetic_brain(make_grid(*GRIDS["brats_lps"]), tumour_at=None)
    out = InsertTumour(source="caseA")(target, source)
    assert counts(out.array)[Label.NCR] > 0
    assert out.history[-1]["params"] == {"centre_ras_mm": None, "keep_existing": False, "source": "caseA"}
    # A record replays with the source given by its identifier, not a path.
    again = replay(target, out.history[-1:], sources={"caseA": source})
    assert np.array_equal(again.array, out.array)
    with pytest.raises(EditError, match="needs the source"):
        replay(target, out.history[-1:])


def test_insert_refuses_a_tumour_that_cannot_fit():
    big = synthetic_brain(make_grid((2.0, 2.0, 2.0), IDENTITY), tumour_at=(0.5, 0.5, 0.5), radii_mm=(20, 25, 30))
    tiny = synthetic_brain(make_grid((1.0, 1.0, 1.0), IDENTITY, shape=(24, 32, 32)), tumour_at=None)
    with pytest.raises(EditError, match="cannot fit in the target brain"):
        InsertTumour()(tiny, big)
    source = synthetic_brain(make_grid(*GRIDS["iso"]))
    with pytest.raises(EditError, match="cannot fit in the target brain"):
        # Within the grid's diagonal of its centre, but past the brain's edge.
        grid_centre = lps_to_ras(tiny.grid.index_to_lps((np.asarray(tiny.grid.size) - 1.0) / 2.0))
        InsertTumour(centre_ras_mm=tuple(grid_centre + (30.0, 0.0, 0.0)))(tiny, source)
    with pytest.raises(EditError, match="insertion centre .* more than the grid.s diagonal"):
        InsertTumour(centre_ras_mm=(500.0, 0.0, 0.0))(tiny, source)


# --- ParametricTumour ----------------------------------------------------------------------


def parametric_at(lm: LabelMap, seed: int = 0, **kwargs) -> ParametricTumour:
    centre = index_to_ras(lm, (0.38 * 63, 0.5 * 63, 0.5 * 47))
    params = dict(radii_mm=(9.0, 8.0, 7.0), rim_mm=2.0, oedema_mm=6.0, irregularity=0.3, seed=seed)
    params.update(kwargs)
    return ParametricTumour(centre, **params)


def test_parametric_tumour_is_nested_reproducible_and_seeded(brain):
    snapshot = brain.array.copy()
    out = parametric_at(brain, seed=3)(brain)
    check_invariants(brain, snapshot, out)
    a = out.array
    ncr, et, ed = a == Label.NCR, a == Label.ET, a == Label.ED
    assert ncr.sum() > 0 and et.sum() > 0 and ed.sum() > 0
    assert not np.any(ndimage.binary_dilation(ncr) & ~(ncr | et)), "NCR must be enclosed by ET"
    healthy = healthy_anatomy(brain.array, brain.grid.spacing)
    core = ncr | et
    allowed = core | ed | (healthy == Label.CSF) | (healthy == Label.BACKGROUND)
    assert not np.any(ndimage.binary_dilation(core) & ~allowed), "the core must be wrapped in oedema"
    assert not np.any(ed & (healthy == Label.CSF)), "oedema only on GM/WM"
    assert np.array_equal(parametric_at(brain, seed=3)(brain).array, a)
    assert not np.array_equal(parametric_at(brain, seed=4)(brain).array, a)
    # The previous tumour was removed (refilled); with keep_existing it stays.
    kept = parametric_at(brain, seed=3, keep_existing=True)(brain).array
    assert np.count_nonzero(kept >= Label.NCR) > np.count_nonzero(a >= Label.NCR)


def test_parametric_tumour_volume_and_options():
    lm = synthetic_brain(make_grid(*GRIDS["iso"]), tumour_at=None)
    smooth = parametric_at(lm, irregularity=0.0, oedema_mm=0.0)(lm)
    volume = tumour_volume(smooth)
    assert volume == pytest.approx(4 / 3 * np.pi * 9 * 8 * 7, rel=0.1)
    assert np.count_nonzero(smooth.array == Label.ED) == 0
    solid = parametric_at(lm, necrosis=False)(lm)
    assert np.count_nonzero(solid.array == Label.NCR) == 0 and np.count_nonzero(solid.array == Label.ET) > 0


@pytest.mark.parametrize("where,radii", [((0.0, 0.0, 0.0), (5, 5, 5)), ((0.95, 0.5, 0.5), (15, 15, 15)),
                                         ((0.5, 0.5, 0.5), (40, 40, 40))])
def test_parametric_tumour_refused_outside_or_too_big(brain, where, radii):
    centre = index_to_ras(brain, np.asarray(where) * (np.asarray(brain.grid.size) - 1))
    with pytest.raises(EditError, match="outside the brain|does not fit"):
        ParametricTumour(centre, radii)(brain)


# --- records, registry and random sampling --------------------------------------------------


def test_every_registered_edit_round_trips():
    assert set(EDITS) == {"translate", "rotate", "scale", "flip", "insert_tumour", "parametric_tumour",
                          "random_tumour"}
    edits = [Translate((1, 2, 3)), Rotate((1.5, 0, -2)), Scale((1.1, 1.1, 1.1)), Flip("SI", "brain"),
             InsertTumour(centre_ras_mm=(1, 2, 3), source="x"),
             ParametricTumour((1, 2, 3), (4, 5, 6), seed=7),
             RandomTumourDraw(seed=7, drawn_edits=2, **dataclasses.asdict(RandomTumourEdit()))]
    for edit in edits:
        record = edit.to_record()
        assert json.loads(json.dumps(record)) == record
        assert edit_from_record(record).to_record() == record
        assert "secret" not in json.dumps(record)
    with pytest.raises(EditError, match="unknown edit"):
        edit_from_record({"name": "melt", "params": {}})
    with pytest.raises(EditError, match="no parameter"):
        edit_from_record({"name": "translate", "params": {"offset_ras_mm": [0, 0, 0], "speed": 1}})


@pytest.mark.parametrize("seed", range(6))
def test_random_edit_replays_bit_identically(seed):
    lm = synthetic_brain(make_grid(*GRIDS["aniso_lps"]))
    lm.history.append({"name": "load", "params": {}})
    sampler = RandomTumourEdit(translate_mm=6.0, p_parametric=0.3)
    snapshot = lm.array.copy()
    out = sampler(lm, seed)
    assert np.array_equal(lm.array, snapshot)
    records = out.history[len(lm.history):]
    assert records and json.loads(json.dumps(records)) == records
    assert records[0]["name"] == "random_tumour"  # the draw's own record, then the edits it drew
    assert [e.to_record() for e in sampler.sample(lm, seed)] == records[1:]
    assert np.array_equal(replay(lm, records).array, out.array)


def test_random_edit_gives_up_after_bounded_tries():
    lm = synthetic_brain(make_grid(*GRIDS["iso"]))
    with pytest.raises(EditError, match="no valid random tumour edit in 3 tries"):
        RandomTumourEdit(translate_mm=300.0, rotate_deg=0.0, scale_range=(1.0, 1.0), p_parametric=0.0,
                         max_tries=3)(lm, 0)


# --- real data --------------------------------------------------------------------------------


def _data_root() -> Path:
    return Path(os.environ.get("MEDSYNTH_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="module")
def brats_case() -> LabelMap:
    case = _data_root() / "brats2021" / "cases" / "BraTS2021_00000"
    seg_path, t1_path = case / "BraTS2021_00000_seg.nii.gz", case / "BraTS2021_00000_t1.nii.gz"
    if not (seg_path.exists() and t1_path.exists()):
        reason = f"real BraTS case not found under {case} (set MEDSYNTH_DATA)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    t1 = sitk.ReadImage(str(t1_path))
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(seg_path)))
    tumour = tumour_to_schema(seg, "brats2021")
    labels = np.where(sitk.GetArrayFromImage(t1) > 0, Label.WM, 0).astype(np.uint8)
    labels[tumour > 0] = tumour[tumour > 0]
    return LabelMap(labels, Grid.from_image(t1))


def test_real_case_edits_keep_the_brain(brats_case):
    """Every edit on a real 240x240x155 case keeps the brain mask; their times: benchmarks/bench_edits.py."""
    lm = brats_case
    assert lm.array.shape == (155, 240, 240)
    source = Flip("LR", "brain")(lm)
    centre = lps_to_ras(tumour_centre(lm))
    edits = [Translate((10.0, 0.0, 0.0)), Rotate((0.0, 0.0, 20.0)), Scale((0.9, 0.9, 0.9)),
             Flip("LR", "brain"), InsertTumour(source="flipped"),
             ParametricTumour(tuple(centre), (15.0, 12.0, 12.0))]
    for edit in edits:
        out = edit(lm, source) if isinstance(edit, InsertTumour) else edit(lm)
        assert np.array_equal(out.array > 0, lm.array > 0)
        if isinstance(edit, Translate):
            # Counts are kept exactly except where the moved tumour leaves the brain
            # (this case's tumour reaches the cortex): compare with an independent shift.
            shift = edit.voxel_offset(lm.grid)
            padded = np.pad(np.where(lm.array >= Label.NCR, lm.array, 0), [(abs(s), abs(s)) for s in shift])
            window = tuple(slice(abs(s) - s, abs(s) - s + n) for s, n in zip(shift, lm.array.shape))
            expected = np.where(lm.array > 0, padded[window], 0)
            assert counts(out.array) == counts(expected)
            assert np.array_equal(out.array >= Label.NCR, expected > 0)
            print("translate clipped at the brain boundary:",
                  {int(k): counts(lm.array)[k] - v for k, v in counts(out.array).items()})
    # This tumour reaches the cortex: growing it pushes > 2% of its core out of the brain.
    with pytest.raises(EditError, match="outside the brain"):
        Scale((1.2, 1.2, 1.2))(lm)


# --- bounds against the grid (issue 15) -------------------------------------------------------


def test_lengths_beyond_the_grid_are_refused_before_anything_is_allocated():
    import tracemalloc

    lm = synthetic_brain(make_grid(*GRIDS["iso"]))
    centre = index_to_ras(lm, (0.38 * 63, 0.5 * 63, 0.5 * 47))
    tracemalloc.start()
    try:
        for edit, message in [
            (ParametricTumour(centre, (10, 10, 10), oedema_mm=1e9), "oedema margin of 1e\\+09 mm is larger than"),
            (ParametricTumour(centre, (1e6, 10, 10)), "tumour radius of 1e\\+06 mm is larger than"),
            (ParametricTumour(centre, (10, 10, 10), rim_mm=1e5), "rim of 100000 mm is larger than"),
            (ParametricTumour((1e12, 0, 0), (10, 10, 10)), "centre .* more than the grid.s diagonal"),
            (Translate((1e300, 0, 0)), "translation of 1e\\+300 mm is larger than"),
            (Translate((0, -150, 0)), "translation of 150 mm is larger than"),
        ]:
            with pytest.raises(EditError, match=message):
                edit(lm)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * lm.array.nbytes  # refused on the parameters: no box, no distance map


def test_parametric_growth_is_bounded_by_the_brain_box():
    """An oedema margin just under the grid's diagonal (102 mm): the box used to be the margin's reach
    (~300 mm a side, 27 M voxels, several float64 arrays: > 1 GB); now it is the brain's box."""
    import tracemalloc

    lm = synthetic_brain(make_grid(*GRIDS["iso"]))
    centre = index_to_ras(lm, (0.38 * 63, 0.5 * 63, 0.5 * 47))
    tracemalloc.start()
    try:
        out = ParametricTumour(centre, (9, 8, 7), oedema_mm=100.0, seed=1)(lm)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Measured 24 MB: float arrays of the brain's box, the healthy refill and the 65^3 noise lattices.
    assert peak < 200 * lm.array.size
    ed = out.array == Label.ED
    assert ed.sum() > 0.5 * np.isin(lm.array, (Label.GM, Label.WM)).sum()  # the margin fills the brain's GM/WM
    assert np.array_equal(out.array == 0, lm.array == 0)


def test_a_tumour_reaching_past_the_brain_box_is_still_judged_whole():
    """The box is clipped to the brain; the part of the core beyond it still counts as outside the brain."""
    lm = synthetic_brain(make_grid(*GRIDS["iso"]))
    edge = index_to_ras(lm, (0.5 * 63 + 0.42 * 64 - 3, 0.5 * 63, 0.5 * 47))  # just inside the brain's edge
    with pytest.raises(EditError, match="does not fit in the brain"):
        ParametricTumour(edge, (30, 30, 30), oedema_mm=0.0, irregularity=0.0)(lm)


@pytest.mark.parametrize("kwargs, message", [
    (dict(p_parametric=2.0), "p_parametric must be a finite number in \\[0, 1\\]"),
    (dict(p_flip=-0.1), "p_flip must be"),
    (dict(p_flip=float("nan")), "p_flip must be"),
    (dict(translate_mm=float("inf")), "translate_mm must be"),
    (dict(scale_range=(1.3, 0.7)), "low <= high"),
    (dict(radius_fraction=(0.1, 5.0)), "radius_fraction must be"),
    (dict(max_tries=0), "max_tries must be"),
    (dict(flip_about="skull"), "flip_about must be"),
])
def test_random_edit_parameters_are_checked(kwargs, message):
    with pytest.raises(EditError, match=message):
        RandomTumourEdit(**kwargs)


@pytest.mark.parametrize("make", [
    lambda: ParametricTumour((0, 0, 0), (5, 5, 5), oedema_mm=float("nan")),
    lambda: ParametricTumour((0, 0, 0), (5, 5, 5), rim_mm=float("inf")),
    lambda: ParametricTumour((0, 0, float("nan")), (5, 5, 5)),
    lambda: ParametricTumour((0, 0, 0), (5, 5, 5), irregularity=float("nan")),
    lambda: ParametricTumour((0, 0, 0), (5, 5, 5), seed=float("nan")),
    lambda: ParametricTumour((0, 0, 0), (5, 5, 5), seed=2**70),
    lambda: Rotate((0, float("inf"), 0)),
    lambda: Scale((1, 1, float("nan"))),
    lambda: Translate((float("-inf"), 0, 0)),
    lambda: InsertTumour(centre_ras_mm=(float("nan"), 0, 0)),
])
def test_non_finite_parameters_are_refused(make):
    with pytest.raises(EditError):
        make()


def test_a_refused_move_is_not_recorded():
    lm = synthetic_brain(make_grid(*GRIDS["iso"]))
    with pytest.raises(EditError):
        Translate((1e300, 0, 0))(lm)
    assert lm.history == []


def test_records_with_the_old_spelling_still_replay():
    lm = synthetic_brain(make_grid(*GRIDS["aniso_lps"]))
    centre = index_to_ras(lm, (0.38 * 63, 0.5 * 63, 0.5 * 47))
    new = ParametricTumour(centre, (9, 8, 7), seed=4)(lm)
    record = dict(new.history[-1])
    record["params"] = {("center_ras_mm" if k == "centre_ras_mm" else k): v for k, v in record["params"].items()}
    assert "center_ras_mm" in record["params"]
    again = replay(lm, [record])
    assert np.array_equal(again.array, new.array)
    assert again.history[-1] == new.history[-1]  # re-recorded with the current spelling
    source = synthetic_brain(make_grid(*GRIDS["iso"]), tumour_at=(0.4, 0.5, 0.5))
    old_insert = {"name": "insert_tumour", "params": {"center_ras_mm": None, "keep_existing": False, "source": "s"},
                  "schema_version": 1}
    assert np.array_equal(replay(lm, [old_insert], {"s": source}).array, InsertTumour(source="s")(lm, source).array)


def test_a_translate_record_replayed_on_another_grid_or_tampered_is_refused():
    """The recorded whole-voxel offset is what the edit moved: a replay that would move by another one (the record
    made on another grid, or its applied offset edited) is refused, not re-recorded with the new offset."""
    fine = synthetic_brain(make_grid(*GRIDS["iso"]))
    record = Translate((3.2, -2.0, 1.0))(fine).history[-1]
    assert record["params"]["applied_offset_ras_mm"] == [3.0, -2.0, 1.0]
    assert np.array_equal(replay(fine, [record]).array, Translate((3.2, -2.0, 1.0))(fine).array)
    coarse = synthetic_brain(make_grid((1.5, 1.5, 1.5), IDENTITY))  # 3.2 mm rounds to 3.0 mm here, -2 to -1.5
    with pytest.raises(EditError, match="another grid"):
        replay(coarse, [record])
    tampered = {**record, "params": {**record["params"], "applied_offset_ras_mm": [9.0, -2.0, 1.0]}}
    with pytest.raises(EditError, match="applied_offset_ras_mm"):
        replay(fine, [tampered])
    assert Translate((3.2, -2.0, 1.0))(coarse).history[-1]["params"]["applied_offset_ras_mm"] == [3.0, -1.5, 1.5]


@pytest.mark.parametrize("record, message", [
    ({"name": "parametric_tumour", "params": {"necrosis": "false"}}, "necrosis must be true or false"),
    ({"name": "parametric_tumour", "params": {"keep_existing": "no"}}, "keep_existing must be true or false"),
    ({"name": "insert_tumour", "params": {"keep_existing": "false", "source": "s"}},
     "keep_existing must be true or false"),
    ({"name": "flip", "params": {"axis": ["LR"]}}, "flip axis must be one of"),
    ({"name": "insert_tumour", "params": {"source": ["a"]}}, "source must be a string"),
    ({"name": "translate", "params": {"offset_ras_mm": [True, 0, 0]}}, "offset_ras_mm must be three numbers"),
    ({"name": "parametric_tumour", "params": {"rim_mm": True}}, "rim_mm must be a number"),
    ({"name": "parametric_tumour", "params": {"seed": True}}, "seed must be a non-negative integer"),
    ({"name": "rotate", "params": {}, "schema_version": "1"}, r"schema_version is not an integer \(got '1'\)"),
    ({"name": "rotate", "params": {}, "schema_version": True}, r"schema_version is not an integer \(got true\)"),
    ({"name": "rotate", "params": {}, "schema_version": 1.0}, r"schema_version is not an integer \(got 1.0\)"),
])
def test_a_tampered_record_is_refused_with_an_edit_error(record, message):
    """A hand-edited record never replays as something else: ``bool("false")`` is True, so a string flag would
    silently draw the opposite tumour and be re-recorded as true; other wrong types raised TypeError or an
    error saying 'version 1, this MedSynth uses 1'."""
    with pytest.raises(EditError, match=message):
        edit_from_record(record)


# --- library calls, checked against the hand-written code they replaced --------------------------


def _rotation_ras_by_hand(angles_deg):
    """The hand-written Rz @ Ry @ Rx that rotation_ras replaced (kept as the reference)."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _euler_by_hand(rotation):
    """The hand-written inverse that euler_xyz_from_rotation replaced (kept as the reference)."""
    r = np.asarray(rotation, float)
    ay = float(np.arcsin(np.clip(-r[2, 0], -1.0, 1.0)))
    if abs(np.cos(ay)) > 1e-6:
        ax = float(np.arctan2(r[2, 1], r[2, 2]))
        az = float(np.arctan2(r[1, 0], r[0, 0]))
    else:
        az = 0.0
        ax = float(np.arctan2(-r[1, 2], r[1, 1]))
    return np.degrees([ax, ay, az])


def test_scipy_rotation_equals_the_hand_written_euler_code():
    from MedSynthLib.edits import euler_xyz_from_rotation, rotation_ras

    rng = np.random.default_rng(0)
    angles = [*rng.uniform(-180, 180, (200, 3)), (0, 0, 0), (90, 0, 0), (0, 0, -90), (10, 90, 30), (-40, -90, 5),
              (180, 0, 0), (0, 89.9999, 0)]
    for triple in angles:
        matrix = rotation_ras(triple)
        np.testing.assert_allclose(matrix, _rotation_ras_by_hand(triple), atol=1e-12)
        got, expected = euler_xyz_from_rotation(matrix), _euler_by_hand(matrix)
        # Both recover the rotation (the library more exactly: at gimbal lock the hand-written
        # arcsin lost ~1e-8); away from gimbal lock they give the same angles.
        np.testing.assert_allclose(rotation_ras(got), matrix, atol=1e-12)
        np.testing.assert_allclose(rotation_ras(expected), matrix, atol=1e-7)
        if abs(abs(triple[1]) - 90) > 1e-3:
            np.testing.assert_allclose(np.asarray(got), expected, atol=1e-7)


def _mask_box_by_projections(mask, margin):
    """The hand-written per-axis projections mask_box and the edits' _bbox used (kept as the reference)."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(max(hits[0] - margin, 0)), int(min(hits[-1] + 1 + margin, mask.shape[axis]))))
    return tuple(box)


def test_find_objects_box_equals_the_projection_code():
    from MedSynthLib.edits.geometry import bounds
    from MedSynthLib.schema.grid import mask_box

    rng = np.random.default_rng(1)
    for n in range(60):
        shape = tuple(int(v) for v in rng.integers(1, 14, 3))
        mask = rng.random(shape) < [0.002, 0.05, 0.5][n % 3]
        if not mask.any():
            mask[tuple(int(rng.integers(s)) for s in shape)] = True
        for margin in (0, 1, 4):
            assert mask_box(mask, margin) == _mask_box_by_projections(mask, margin)
        view = mask[::-1, :, ::2]  # a non-contiguous view
        if view.any():
            assert mask_box(view, 2) == _mask_box_by_projections(view, 2)
        lo, hi = bounds(mask)
        assert [slice(a, b) for a, b in zip(lo, hi)] == list(_mask_box_by_projections(mask, 0))
    assert bounds(np.zeros((3, 4, 5), bool)) is None
    brain = synthetic_brain(make_grid(*GRIDS["aniso_lps"])).array > 0
    assert mask_box(brain, 4) == _mask_box_by_projections(brain, 4)


# Two records of the first study report (session 6), written with the old spelling center_ras_mm.
_OLD_SPELLING_RECORDS = [
    {"name": "insert_tumour", "params": {"center_ras_mm": [-88.20070942950045, 99.23485072420928, 69.600798108188],
                                         "keep_existing": False, "source": "sha256:d168bc073bc8a55d"},
     "schema_version": 1},
    {"name": "insert_tumour", "params": {"center_ras_mm": None, "keep_existing": False,
                                         "source": "sha256:09940f0faac307e9"}, "schema_version": 1}]


def test_the_shipped_study_records_still_parse():
    """Every edit record in docs/study/report.json, and records in the old spelling (center_ras_mm), rebuild
    their edit, which records the same parameters under the current names."""
    report = json.loads((REPO_ROOT / "docs" / "study" / "report.json").read_text())
    found = []

    def walk(node):
        if isinstance(node, dict):
            if node.get("name") in EDITS and isinstance(node.get("params"), dict):
                found.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(report)
    assert len(found) > 10
    for record in found + _OLD_SPELLING_RECORDS:
        params = edit_from_record(record).to_record()["params"]
        renamed = {EDITS[record["name"]].renamed_params.get(k, k): v for k, v in record["params"].items()}
        assert params == renamed
    assert "center_ras_mm" not in edit_from_record(_OLD_SPELLING_RECORDS[0]).to_record()["params"]


@pytest.mark.parametrize("offset_mm", [(6.0, -4.0, 3.0), (0.0, 0.0, -40.0), (90.0, 0.0, 0.0), (2.0, 2.0, 2.0)])
def test_translate_works_in_the_box_of_both_places_and_equals_the_whole_volume_edit(brain, offset_mm):
    """Translate computes only the box of the old and new tumour; the result is the whole-volume edit's."""
    from MedSynthLib.edits.base import composite, core_count, healthy_anatomy, tumour_only
    from MedSynthLib.schema.errors import EditError

    edit = Translate(offset_mm)
    labels = brain.array
    tumour = tumour_only(labels)
    # The whole array shifted by whole voxels; what leaves the array is gone.
    moved = ndimage.shift(tumour, edit.voxel_offset(brain.grid), order=0, mode="constant", cval=0)
    lost = core_count(tumour) - core_count(moved)
    try:
        expected = composite(healthy_anatomy(labels, brain.grid.spacing), moved, labels > 0, core_lost_voxels=lost)
    except EditError as refused:
        with pytest.raises(EditError, match=re.escape(str(refused))):  # refused alike, with the same counts
            edit(brain)
        return
    result = edit(brain).array
    assert np.array_equal(result, expected)
    assert not np.array_equal(result, labels)


@pytest.mark.parametrize("layout", ["surface", "shell", "scattered"])
def test_healthy_anatomy_fills_each_tumour_voxel_from_a_nearest_anatomy_voxel(layout):
    """Whatever box the refill needs (faces moved out, or grown when it holds no anatomy), every tumour voxel
    takes a label whose nearest voxel is at the whole-volume nearest-anatomy distance."""
    rng = np.random.default_rng({"surface": 1, "shell": 2, "scattered": 3}[layout])
    labels = np.zeros((40, 44, 48), np.uint8)
    if layout == "surface":  # a tumour on the brain's surface: the anatomy lies along the surface, past the box
        labels[:, :, :30] = rng.integers(Label.CSF, Label.WM + 1, (40, 44, 30))
        labels[10:30, 12:32, 24:30] = Label.ED
        labels[14:26, 16:28, 28:30] = Label.ET
    elif layout == "shell":  # background around the tumour, anatomy 6 voxels beyond it: none in the first box
        labels[...] = rng.integers(Label.CSF, Label.WM + 1, labels.shape)
        labels[10:30, 10:34, 10:38] = Label.BACKGROUND
        labels[16:24, 16:28, 16:32] = Label.NCR
    else:
        labels[...] = rng.integers(Label.CSF, Label.WM + 1, labels.shape)
        labels[ndimage.binary_dilation(rng.random(labels.shape) < 0.001, iterations=3)] = Label.ED
    spacing = (1.0, 0.8, 1.3)
    out = healthy_anatomy(labels, spacing)
    tumour = labels >= Label.NCR
    assert np.array_equal(out[~tumour], labels[~tumour])
    sampling = spacing[::-1]
    nearest = ndimage.distance_transform_edt((labels < Label.CSF) | (labels > Label.WM), sampling=sampling)
    for value in (Label.CSF, Label.GM, Label.WM):
        filled = tumour & (out == value)
        to_class = ndimage.distance_transform_edt(labels != value, sampling=sampling)
        assert np.allclose(to_class[filled], nearest[filled])
    assert np.all((out[tumour] >= Label.CSF) & (out[tumour] <= Label.WM))


def _oblique(degrees: float = 20.0) -> tuple[float, ...]:
    a = np.deg2rad(degrees)  # about S (LPS z): a rotation of the LPS x/y plane
    rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    return tuple(float(v) for v in (rot @ np.diag([-1.0, -1.0, 1.0])).ravel())


def test_brain_box_and_centre_use_physical_voxel_positions_on_oblique_grids():
    """On a rotated grid the index box's corners lie outside the brain: the box is that of the voxel centres."""
    from MedSynthLib.edits.geometry import brain_box_lps, brain_centre

    lm = synthetic_brain(make_grid((1.0, 1.0, 1.0), _oblique()))
    kji = np.argwhere(lm.array > 0)
    lps = lm.grid.index_to_lps(kji[:, ::-1].astype(float))
    lo, hi = brain_box_lps(lm)
    assert lo == pytest.approx(lps.min(axis=0), abs=1e-9) and hi == pytest.approx(lps.max(axis=0), abs=1e-9)
    assert brain_centre(lm) == pytest.approx((lps.min(axis=0) + lps.max(axis=0)) / 2, abs=1e-9)
    # Axis-aligned grids: the index box is the physical box (unchanged results, bit for bit).
    for spacing, direction in GRIDS.values():
        aligned = synthetic_brain(make_grid(spacing, direction))
        nz = np.argwhere(aligned.array > 0)
        old = aligned.grid.index_to_lps(((nz.min(axis=0) + nz.max(axis=0)) / 2.0)[::-1])
        assert np.array_equal(brain_centre(aligned), old)


def test_insert_into_the_same_brain_on_an_oblique_grid_lands_in_place():
    source = synthetic_brain(make_grid((1.0, 1.0, 1.0), LPS_FLIP), tumour_at=(0.3, 0.5, 0.5))
    target_grid = make_grid((1.0, 1.0, 1.0), _oblique(), shape=(56, 80, 80))
    # The same brain resampled onto the rotated grid (nearest neighbour by physical position).
    kji = np.indices(target_grid.shape).reshape(3, -1).T.astype(float)
    src_idx = np.round(source.grid.lps_to_index(target_grid.index_to_lps(kji[:, ::-1])))[:, ::-1].astype(int)
    inside = np.all((src_idx >= 0) & (src_idx < source.array.shape), axis=1)
    array = np.zeros(target_grid.shape, np.uint8).reshape(-1)
    array[inside] = source.array[tuple(src_idx[inside].T)]
    target = LabelMap(np.where(array.reshape(target_grid.shape) >= Label.NCR, Label.WM, array.reshape(
        target_grid.shape)).astype(np.uint8), target_grid)
    out = InsertTumour(source="same")(target, source)
    assert np.linalg.norm(tumour_centre(out) - tumour_centre(source)) < 2.5  # was 5.3 mm off (index box)


def test_translate_records_the_offset_it_applied():
    """Whole voxels are moved: the record keeps the request and the offset applied; replay gives the same map."""
    lm = synthetic_brain(make_grid((1.0, 1.0, 5.0), LPS_FLIP))
    out = Translate((0.0, 0.0, 7.0))(lm)  # 1.4 slices -> 1 slice = 5 mm
    params = out.history[-1]["params"]
    assert params["offset_ras_mm"] == [0.0, 0.0, 7.0]
    assert params["applied_offset_ras_mm"] == pytest.approx([0.0, 0.0, 5.0])
    assert centre_ras(out)[2] - centre_ras(lm)[2] == pytest.approx(5.0)
    again = replay(lm, out.history[-1:])
    assert np.array_equal(again.array, out.array) and again.history == out.history
    from MedSynthLib.schema.provenance import parse_step

    assert parse_step(out.history[-1]).to_json()["params"] == params  # the typed record keeps it


def test_insert_checks_the_recorded_source_hash_on_replay():
    from MedSynthLib.schema.provenance import array_sha256, parse_step

    source = synthetic_brain(make_grid(*GRIDS["iso"]), tumour_at=(0.4, 0.5, 0.5))
    other = synthetic_brain(make_grid(*GRIDS["iso"]), tumour_at=(0.6, 0.5, 0.5))
    target = synthetic_brain(make_grid(*GRIDS["brats_lps"]), tumour_at=None)
    out = InsertTumour(source="a.nii.gz", source_labels_sha256=array_sha256(source.array))(target, source)
    record = out.history[-1]
    assert record["params"]["source_labels_sha256"] == array_sha256(source.array)
    assert parse_step(record).to_json()["params"] == {k: v for k, v in record["params"].items() if v is not None}
    assert np.array_equal(replay(target, [record], sources={"a.nii.gz": source}).array, out.array)
    with pytest.raises(EditError, match="not the recorded source"):
        replay(target, [record], sources={"a.nii.gz": other})


# --- clipping at the brain's edge, recorded by the edit ------------------------------------------


@pytest.mark.parametrize("grid", ["iso", "brats_lps"])
def test_a_whole_voxel_move_records_the_tumour_voxels_it_clipped(grid):
    """Translate and flip keep every tumour count but what leaves the brain: their record says how many voxels of
    each class that clipped (so the CLI and Slicer can say it), nothing when none; a replay reproduces it."""
    from MedSynthLib.edits.base import clipped_in_records, clipped_notice

    lm = synthetic_brain(make_grid(*GRIDS[grid]))
    before = counts(lm.array)
    inside = Translate((0.0, 0.0, 4.0))(lm)
    assert "clipped_tumour_voxels" not in inside.history[-1]["params"] and counts(inside.array) == before
    edge = Translate((0.0, 0.0, 12.0))(lm)  # pushes oedema past the brain's top
    recorded = edge.history[-1]["params"]["clipped_tumour_voxels"]
    lost = {Label(v).name: before[v] - n for v, n in counts(edge.array).items() if before[v] > n}
    assert lost and recorded == lost
    assert clipped_in_records(edge.history[len(lm.history):]) == lost
    assert f"{sum(lost.values())} tumour voxels" in clipped_notice(recorded)
    np.testing.assert_array_equal(replay(lm, edge.history[len(lm.history):]).array, edge.array)
    assert replay(lm, edge.history[len(lm.history):]).history == edge.history
    flipped = Flip("SI", about="brain")(lm)
    flip_lost = {Label(v).name: before[v] - n for v, n in counts(flipped.array).items() if before[v] > n}
    assert flipped.history[-1]["params"].get("clipped_tumour_voxels") == (flip_lost or None)


@pytest.mark.parametrize("clipped, message", [
    ({"WM": 3}, "tumour classes"),
    ({"ED": -1}, "positive"),
    ({"ED": True}, "positive"),
    ([("ED", 3)], "tumour classes"),
])
def test_a_malformed_clipping_record_is_refused(clipped, message):
    lm = synthetic_brain(make_grid(*GRIDS["iso"]))
    record = Translate((0.0, 0.0, 12.0))(lm).history[-1]
    record = dict(record, params=dict(record["params"], clipped_tumour_voxels=clipped))
    with pytest.raises(EditError, match=message):
        replay(lm, [record])


def test_a_replay_onto_another_map_records_what_it_clips_there():
    """Records replay onto other maps: the move is the record's, the clipped count this map's."""
    lm = synthetic_brain(make_grid(*GRIDS["iso"]))
    record = Translate((0.0, 0.0, 12.0))(lm).history[-1]
    assert record["params"]["clipped_tumour_voxels"]
    lower = synthetic_brain(make_grid(*GRIDS["iso"]), tumour_at=(0.62, 0.5, 0.35))  # farther from the top
    replayed = replay(lower, [record])
    assert "clipped_tumour_voxels" not in replayed.history[-1]["params"]
    assert counts(replayed.array) == counts(lower.array)


def test_a_flip_on_an_oblique_grid_counts_only_what_leaves_the_brain():
    """On a rotated grid a flip resamples the tumour, which changes its counts by a few voxels: that was reported
    as 'moved outside the brain and clipped' (8 ET voxels here) though nothing left the brain.  Only the voxels
    landing outside the brain are counted."""
    from MedSynthLib.edits.base import clipped_tumour_voxels

    c, s = np.cos(np.radians(7.0)), np.sin(np.radians(7.0))
    lm = synthetic_brain(make_grid((1.0, 1.0, 1.0), (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)))
    flipped = Flip("LR", about="tumour")(lm)
    assert clipped_tumour_voxels(lm.array, flipped.array)  # resampling lost voxels ...
    assert "clipped_tumour_voxels" not in flipped.history[-1]["params"]  # ... none of them at the brain's edge


# --- a parametric tumour smaller than a voxel (user audit) ------------------------------------------------


OBLIQUE_30 = tuple(float(v) for v in np.array([[np.cos(np.pi / 6), -np.sin(np.pi / 6), 0.0],
                                               [np.sin(np.pi / 6), np.cos(np.pi / 6), 0.0], [0.0, 0.0, 1.0]]).ravel())


def _voxel_width_ras(grid: Grid) -> np.ndarray:
    """How wide one voxel is along RAS x, y, z (its box projected on each axis)."""
    return np.abs(grid.index_to_lps_matrix).sum(axis=1)


@pytest.mark.parametrize("name", [*GRIDS, "oblique"])
def test_a_parametric_tumour_narrower_than_a_voxel_is_refused(name):
    """``--radius 0.2`` drew a 'tumour' of one ET voxel in thousands of oedema voxels.  A tumour narrower than one
    voxel along any axis (radius under half the voxel's width there) is refused on its parameters; one voxel wide
    draws a core of at least the voxel at its centre."""
    spacing, direction = GRIDS[name] if name in GRIDS else ((1.0, 1.0, 1.0), OBLIQUE_30)
    lm = synthetic_brain(make_grid(spacing, direction), tumour_at=None)
    centre = index_to_ras(lm, (32, 32, 24))  # a voxel's centre
    width = _voxel_width_ras(lm.grid)
    for axis in range(3):
        radii = [8.0, 8.0, 8.0]
        radii[axis] = 0.45 * width[axis]
        with pytest.raises(EditError, match="smaller than a voxel"):
            ParametricTumour(centre, tuple(radii))(lm)
    with pytest.raises(EditError, match="smaller than a voxel"):
        ParametricTumour(centre, (0.2, 0.2, 0.2))(lm)
    out = ParametricTumour(centre, tuple(0.55 * width), irregularity=0.0)(lm)
    assert np.count_nonzero((out.array == Label.NCR) | (out.array == Label.ET)) >= 1


def test_cli_tumour_new_with_a_radius_under_a_voxel_is_one_line_and_writes_nothing(tmp_path, capsys):
    from MedSynthLib.cli import main
    from MedSynthLib.schema.labelmap import write_label_map

    lm = synthetic_brain(make_grid(*GRIDS["brats_lps"]), tumour_at=None)
    write_label_map(lm, tmp_path / "l.nii.gz")
    centre = index_to_ras(lm, (32, 32, 24))
    argv = ["tumour", "new", tmp_path / "l.nii.gz", "--centre", *centre, "--radius", "0.2", "-o", tmp_path / "t.nii.gz"]
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(tmp_path / "l.nii.gz") in err and "smaller than a voxel" in err and "0.5 mm" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.json", "l.nii.gz"]
