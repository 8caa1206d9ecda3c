"""Anatomy judged by anatomy: plausibility, contrast order, FreeSurfer agreement, the canvas, readers.

The real-data tests run a representative subset (a BraTS 2021 case, a BRATS 2013
case with weak T1 contrast, a TCIA case whose old labels put GM brightest on T2);
``benchmarks/anatomy_check.py`` covers all 27 cases (docs/anatomy_check.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from conftest import phantom, write_volume
from MedSynthLib.cases.anatomy import ANATOMY_MODELS, DEFAULT_ANATOMY_MODEL, derive_label_map, segment_anatomy
from MedSynthLib.cases.anatomy_check import (class_means, freesurfer_dice, intensity_order,
                                       regional_plausibility)
from MedSynthLib.cases.atlas_anatomy import AtlasPriorEM, RegistrationError
from MedSynthLib.cases.readers import detect_convention, read_case, read_case_files
from MedSynthLib.cli import main
from MedSynthLib.schema.grid import Grid
from MedSynthLib.schema.labels import Label
from MedSynthLib.cases.template import enclosed_background, template_label_map, template_t1

SUBSET = ("brats2021/cases/BraTS2021_00006", "brats_more/cases/Brats18_2013_2_1",
          "brats_more/cases/Brats18_TCIA10_639_1")


def _grid(shape) -> Grid:
    return Grid(tuple(shape[::-1]), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))


# --- the yardstick itself -----------------------------------------------------------------------


def _striped() -> np.ndarray:
    """A block 'brain' striped CSF / GM / WM (12.5 / 37.5 / 50 %) alike in every octant."""
    labels = np.zeros((40, 40, 40), np.uint8)
    stripe = np.array([Label.CSF, Label.GM, Label.GM, Label.GM, Label.WM, Label.WM, Label.WM, Label.WM], np.uint8)
    labels[4:36, 4:36, 4:36] = np.resize(stripe, 32)[None, None, :]
    return labels


def test_regional_plausibility_flags_an_octant_without_white_matter():
    labels = _striped()
    good = regional_plausibility(labels)
    assert good.passed, good.failures
    labels[4:20, 4:20, 4:20] = Label.GM  # one octant all grey matter
    bad = regional_plausibility(labels)
    assert not bad.passed
    assert any(f.startswith("octant 0 WM") for f in bad.failures) and not any("overall" in f for f in bad.failures)


def test_regional_plausibility_skips_octants_full_of_tumour():
    labels = _striped()
    labels[4:20, 4:20, 4:20] = Label.ED  # the same octant is tumour instead: not judged
    result = regional_plausibility(labels)
    assert result.passed, result.failures
    assert not result.octants[0]["checked"] and result.octants[0]["tumour"] > 0.3


def test_intensity_order_flags_swapped_classes():
    labels = np.repeat(np.array([1, 2, 3], np.uint8), 10)
    t1 = np.repeat(np.array([300.0, 600.0, 900.0]), 10)
    t2 = np.repeat(np.array([1500.0, 900.0, 700.0]), 10)
    assert intensity_order(labels, {"t1": t1, "t2": t2}) == []
    assert len(intensity_order(labels, {"t1": t1[::-1], "t2": t2[::-1]})) == 2


def test_freesurfer_dice_scores_labelled_voxels_only():
    aseg = np.array([0, 0, 4, 3, 3, 2, 2])  # 0: unlabelled, 4: ventricle, 3: cortex, 2: cerebral WM
    labels = np.array([1, 2, 1, 2, 2, 3, 2], np.uint8)
    dice = freesurfer_dice(labels, aseg)
    assert dice["CSF"] == pytest.approx(1.0)
    assert dice["GM"] == pytest.approx(2 * 2 / (3 + 2))
    assert dice["WM"] == pytest.approx(2 * 1 / (1 + 2))


# --- the model on real brains -------------------------------------------------------------------


@pytest.fixture(scope="module", params=SUBSET, ids=lambda p: p.split("/")[-1])
def real_case_labels(request, real_data, derived_case):
    folder = real_data / request.param
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    case, labelmap, seconds = derived_case(folder)  # BraTS2021_00006 is derived once for the session
    assert case.tumour is not None, f"{folder}: no tumour segmentation"
    return case, labelmap, seconds


@pytest.mark.realdata
def test_real_anatomy_is_plausible_in_every_octant(real_case_labels):
    case, labelmap, _ = real_case_labels
    result = regional_plausibility(labelmap.array)
    assert result.passed, f"{case.case_id}: {result.failures}"


@pytest.mark.realdata
def test_real_anatomy_follows_t1_and_t2_contrast(real_case_labels):
    case, labelmap, _ = real_case_labels
    assert intensity_order(labelmap.array, case.images) == []
    record = labelmap.history[0]["params"]
    assert record["anatomy_model"]["name"] == "atlas-em"
    assert record["anatomy_contrasts"] == ["t1", "t2", "flair"]


@pytest.mark.realdata
def test_real_tumour_copied_exactly_and_brain_filled(real_case_labels):
    case, labelmap, _ = real_case_labels
    labels, tumour = labelmap.array, case.tumour > 0
    np.testing.assert_array_equal(labels[tumour], case.tumour[tumour])
    brain = case.brain_mask()
    assert np.all(labels[brain & ~tumour] >= Label.CSF) and np.all(labels[brain & ~tumour] <= Label.WM)
    assert np.all(labels[~brain] == 0)


@pytest.mark.realdata
def test_old_model_fails_the_2013_case(real_data):
    """The yardstick separates: the former T1-only default fails where the new model passes."""
    folder = real_data / "brats_more/cases/Brats18_2013_2_1"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    case = read_case(folder)
    labels = derive_label_map(case, ANATOMY_MODELS["kmeans-t1"]).array
    assert not regional_plausibility(labels).passed or intensity_order(labels, case.images)


@pytest.mark.realdata
def test_t1_only_path_agrees_with_freesurfer(real_data):
    """The T1-only fallback keeps Dice GM >= 0.90, WM >= 0.88 against FreeSurfer's aseg."""
    folder = real_data / "healthy_t1"
    image = sitk.ReadImage(str(folder / "vxm_test_t1.nii.gz"))
    t1 = sitk.GetArrayFromImage(image).astype(np.float32)
    aseg = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "vxm_test_aseg.nii.gz")))
    brain = ndimage.binary_fill_holes(t1 > 0)
    model = AtlasPriorEM()
    assert model.used_contrasts({"t1": t1}) == ["t1"]
    labels = segment_anatomy(model, {"t1": t1}, brain, np.zeros_like(brain), Grid.from_image(image))
    dice = freesurfer_dice(labels, aseg)
    assert dice["GM"] >= 0.90 and dice["WM"] >= 0.88, dice


# --- the healthy canvas -------------------------------------------------------------------------


def test_template_canvas_has_no_hole_and_adult_grey_matter():
    labelmap = template_label_map()
    labels = labelmap.array
    assert enclosed_background(labels > 0).sum() == 0, "background enclosed by the brain (cisterns)"
    result = regional_plausibility(labels)
    assert result.passed, result.failures
    assert 0.40 <= result.overall["GM"] <= 0.50
    means = class_means(labels, sitk.GetArrayFromImage(template_t1()))
    assert means["CSF"] < means["GM"] < means["WM"]
    assert labelmap.history[0]["params"]["anatomy_model"]["name"] == "atlas-em"


# --- intensities, determinism, failures on small synthetic brains -------------------------------


def test_negative_values_are_not_read_as_csf():
    """Interpolation undershoot inside white matter carries no evidence: it stays white matter."""
    images, seg = phantom((64, 72, 64))
    arrays = {k: v.astype(np.float32) for k, v in images.items()}
    centre = (32, 36 - 12, 32 - 12)  # inside the phantom's WM, away from the ventricle and tumour
    block = tuple(slice(c - 1, c + 2) for c in centre)
    arrays["t1"][block] = -40.0
    brain = images["t1"] != 0
    labels = segment_anatomy(DEFAULT_ANATOMY_MODEL, arrays, brain | (arrays["t1"] != 0), seg > 0, _grid(seg.shape))
    clean = segment_anatomy(DEFAULT_ANATOMY_MODEL, {k: v.astype(np.float32) for k, v in images.items()}, brain,
                            seg > 0, _grid(seg.shape))
    assert np.all(clean[block] == Label.WM)
    assert not np.any(labels[block] == Label.CSF)


_DERIVE_IN_CHILD = """
import sys, numpy as np, SimpleITK as sitk
sys.path.insert(0, sys.argv[1])
from conftest import phantom
from MedSynthLib.cases.anatomy import DEFAULT_ANATOMY_MODEL, segment_anatomy
from MedSynthLib.schema.grid import Grid
sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(sys.argv[3]))
images, seg = phantom()
grid = Grid(tuple(seg.shape[::-1]), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
arrays = {k: v.astype(np.float32) for k, v in images.items()}
np.save(sys.argv[2], segment_anatomy(DEFAULT_ANATOMY_MODEL, arrays, images["t1"] != 0, seg > 0, grid))
"""


@pytest.mark.parametrize("shape", [(40, 48, 44), (64, 72, 64)])
def test_atlas_model_is_deterministic_across_calls(shape):
    """Repeated calls in one process give the same label map (they did not: a cached atlas
    and ITK's initialiser made later calls differ from the first in 3,000-7,000 voxels)."""
    images, seg = phantom(shape)
    arrays = {k: v.astype(np.float32) for k, v in images.items()}
    brain = images["t1"] != 0
    maps = [segment_anatomy(DEFAULT_ANATOMY_MODEL, arrays, brain, seg > 0, _grid(seg.shape)) for _ in range(3)]
    for other in maps[1:]:
        np.testing.assert_array_equal(maps[0], other)


@pytest.mark.parametrize("stored", ["RAS", "PIR"])
def test_anatomy_does_not_depend_on_the_axis_order_a_case_is_stored_in(stored):
    """The same phantom stored RAS or sagittal-first gets the same anatomy as stored LPS, voxel for voxel (on the
    stored order 1.9 % of a real case's brain voxels changed class when it was stored RAS)."""
    images, seg = phantom((40, 48, 44))
    grid = _grid(seg.shape)
    arrays = {k: v.astype(np.float32) for k, v in images.items()}
    expected = segment_anatomy(DEFAULT_ANATOMY_MODEL, arrays, images["t1"] != 0, seg > 0, grid)

    def reoriented(array: np.ndarray) -> sitk.Image:
        return sitk.DICOMOrient(grid.image(array), stored)

    other = {k: sitk.GetArrayFromImage(reoriented(v)) for k, v in arrays.items()}
    other_grid = Grid.from_image(reoriented(seg))
    other_seg = sitk.GetArrayFromImage(reoriented(seg))
    result = segment_anatomy(DEFAULT_ANATOMY_MODEL, other, other["t1"] != 0, other_seg > 0, other_grid)
    back = sitk.GetArrayFromImage(sitk.DICOMOrient(other_grid.image(result.astype(np.uint8)), "LPS"))
    np.testing.assert_array_equal(back, expected)


def test_atlas_model_is_the_same_in_another_process_with_other_itk_threads(tmp_path):
    import subprocess
    import sys

    images, seg = phantom()
    arrays = {k: v.astype(np.float32) for k, v in images.items()}
    here = segment_anatomy(DEFAULT_ANATOMY_MODEL, arrays, images["t1"] != 0, seg > 0, _grid(seg.shape))
    for threads in (1, 2):
        out = tmp_path / f"labels_{threads}.npy"
        subprocess.run([sys.executable, "-c", _DERIVE_IN_CHILD, str(Path(__file__).parent), str(out), str(threads)],
                       check=True, cwd=tmp_path)
        np.testing.assert_array_equal(np.load(out), here)


def _dumbbell() -> dict[str, np.ndarray]:
    """Two separate blobs 80 mm apart: nothing an affine map of a brain can cover."""
    k, j, i = np.indices((48, 64, 120))
    blob = ((k - 24) ** 2 + (j - 32) ** 2 + (i - 20) ** 2 < 14 ** 2) | ((k - 24) ** 2 + (j - 32) ** 2 + (i - 100) ** 2 < 14 ** 2)
    noise = np.random.default_rng(0).normal(0, 30, blob.shape)
    t1 = np.where(blob, 600 + noise, 0).astype(np.int16)
    return {"t1": t1, "t1ce": t1, "t2": np.where(blob, 1600 - t1, 0).astype(np.int16),
            "flair": np.where(blob, 1200 - t1 // 2, 0).astype(np.int16)}


def test_registration_failure_is_one_line_exit_2_nothing_written(tmp_path, capsys):
    case = tmp_path / "case"
    for modality, array in _dumbbell().items():
        write_volume(array, case / f"x_{modality}.nii.gz")
    out = tmp_path / "labels.nii.gz"
    assert main(["labels", str(case), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "registration of the ICBM152 atlas" in err and "x_t1.nii.gz" in err
    assert not out.exists() and not out.with_suffix("").with_suffix(".json").exists()
    with pytest.raises(RegistrationError):
        arrays = {k: v.astype(np.float32) for k, v in _dumbbell().items()}
        segment_anatomy(DEFAULT_ANATOMY_MODEL, arrays, arrays["t1"] != 0, np.zeros(arrays["t1"].shape, bool),
                        _grid(arrays["t1"].shape))


# --- readers --------------------------------------------------------------------------------------


def _write_case(folder: Path, names: dict[str, str]) -> None:
    images, seg = phantom()
    for kind, name in names.items():
        write_volume(seg if kind == "seg" else images[kind], folder / name)


@pytest.mark.parametrize("names", [
    {"t1": "TCGA-02-0006_t1_bet.nii.gz", "t1ce": "TCGA-02-0006_t1c_bet.nii.gz", "t2": "TCGA-02-0006_t2_bet.nii.gz",
     "flair": "TCGA-02-0006_fla_bet.nii.gz", "seg": "TCGA-02-0006_seg.nii.gz"},
    {"t1": "t1.nii.gz", "t1ce": "t1c.nii.gz", "t2": "t2.nii.gz", "flair": "fla.nii.gz", "seg": "seg.nii.gz"},
    {"t1": "P_t1.nii.gz", "t1ce": "P_t1Gd.nii.gz", "t2": "P_t2.nii.gz", "flair": "P_flair.nii.gz",
     "seg": "P_GlistrBoost_ManuallyCorrected.nii.gz"},
], ids=["toolkit-bet", "toolkit-plain", "tcga"])
def test_tcga_and_toolkit_names_are_read(tmp_path, names):
    _write_case(tmp_path, names)
    assert detect_convention(tmp_path) == "toolkit"
    case = read_case(tmp_path)
    assert case.label_convention == "brats2021"
    assert {m: p.name for m, p in case.files.items()} == names
    _, seg = phantom()
    assert set(np.unique(case.tumour)) == {0, Label.NCR, Label.ED, Label.ET}
    assert int((case.tumour == Label.ET).sum()) == int((seg == 4).sum())


def test_brats2021_names_still_read_as_brats2021(tmp_path):
    _write_case(tmp_path, {m: f"c_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair", "seg")})
    assert detect_convention(tmp_path) == "brats2021"


def test_explicit_files_any_naming(tmp_path, capsys):
    names = {"t1": "anat_A.nii.gz", "t1ce": "anat_B.nii.gz", "t2": "anat_C.nii.gz", "flair": "anat_D.nii.gz",
             "seg": "mask.nii.gz"}
    _write_case(tmp_path, names)
    case = read_case_files({k: tmp_path / v for k, v in names.items()})
    assert case.convention == "explicit" and set(case.images) == {"t1", "t1ce", "t2", "flair"}
    args = [f"--{k}={tmp_path / v}" for k, v in names.items()]
    assert main(["info", *args]) == 0
    assert "explicit" in capsys.readouterr().out
    out = tmp_path / "labels.nii.gz"
    assert main(["labels", *args, "-o", str(out)]) == 0
    assert out.exists()


def test_explicit_t1_only_falls_back_and_says_so(tmp_path, capsys):
    _write_case(tmp_path, {"t1": "a.nii.gz", "seg": "b.nii.gz"})
    out = tmp_path / "labels.nii.gz"
    assert main(["labels", "--t1", str(tmp_path / "a.nii.gz"), "--seg", str(tmp_path / "b.nii.gz"),
                 "-o", str(out)]) == 0
    assert "T1 only" in capsys.readouterr().err
    sidecar = json.loads(out.with_name("labels.json").read_text())
    assert '"anatomy_contrasts": ["t1"]' in json.dumps(sidecar)
    params = sidecar["history"][0]["params"]
    assert params["anatomy_model"] == ANATOMY_MODELS["kmeans-t1"].to_json()
    assert params["anatomy_fallback"]["requested_model"] == "atlas-em"


def _t1_only_case(folder: Path):
    _write_case(folder, {"t1": "a.nii.gz", "seg": "b.nii.gz"})
    return read_case_files({"t1": folder / "a.nii.gz", "seg": folder / "b.nii.gz"})


def test_t1_only_default_records_the_kmeans_model_it_fell_back_to(tmp_path):
    """The default model given T1 alone runs the k-means model: the record names that model with its own
    settings, as ``--anatomy kmeans-t1`` records it, and says which model was asked for and why it did not run
    (it recorded atlas-em with beta 1.0 over voxels k-means with beta 2.0 had labelled)."""
    case = _t1_only_case(tmp_path)
    fallback = derive_label_map(case)
    asked = derive_label_map(case, ANATOMY_MODELS["kmeans-t1"])
    np.testing.assert_array_equal(fallback.array, asked.array)
    params, asked_params = fallback.history[0]["params"], asked.history[0]["params"]
    assert params["anatomy_model"] == asked_params["anatomy_model"] == ANATOMY_MODELS["kmeans-t1"].to_json()
    assert params["anatomy_model"]["name"] == "kmeans-gaussian-mrf" and params["anatomy_model"]["beta"] == 2.0
    assert params["anatomy_contrasts"] == asked_params["anatomy_contrasts"] == ["t1"]
    assert params["anatomy_fallback"] == {"requested_model": "atlas-em", "reason": "missing_contrasts",
                                          "missing_contrasts": ["t2", "flair"]}
    assert "anatomy_fallback" not in asked_params  # a model run as asked is no fallback


def test_t1_only_fallback_record_survives_the_typed_provenance(tmp_path):
    """A synthesized case's provenance.json and an export copy the label map's history through the typed
    schema, which drops any field it does not know: the fallback note must be one of its fields."""
    from MedSynthLib.schema.provenance import Redactions, parse_step

    record = derive_label_map(_t1_only_case(tmp_path)).history[0]
    assert "anatomy_fallback" in record["params"]
    redacted = Redactions()
    step = parse_step(record, redacted)
    assert step.to_json() == record and step.to_json(for_export=True) == record
    assert redacted.count == 0


def test_folder_missing_t2_is_refused(tmp_path, capsys):
    _write_case(tmp_path, {m: f"c_{m}.nii.gz" for m in ("t1", "t1ce", "flair", "seg")})
    out = tmp_path / "labels.nii.gz"
    assert main(["labels", str(tmp_path), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "t2" in err
    assert not out.exists()


def test_case_folder_and_explicit_files_together_are_refused(tmp_path, capsys):
    _write_case(tmp_path, {m: f"c_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair", "seg")})
    assert main(["labels", str(tmp_path), "--t1", str(tmp_path / "c_t1.nii.gz"), "-o", str(tmp_path / "o.nii.gz")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# --- the training cache follows the anatomy model -----------------------------------------------


def test_training_cache_key_changes_with_the_anatomy_model(tmp_path, monkeypatch):
    import MedSynthLib.cases.case_key as case_key

    _write_case(tmp_path, {m: f"c_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair", "seg")})
    case = read_case(tmp_path)
    key_new = case_key.case_files_hash(case)
    monkeypatch.setattr(case_key, "DEFAULT_ANATOMY_MODEL", ANATOMY_MODELS["kmeans-t1"])
    assert case_key.case_files_hash(case) != key_new


def test_template_brain_mask_equals_nilearns_own():
    from nilearn.datasets import load_mni152_brain_mask

    from MedSynthLib.cases import icbm152

    t1 = sitk.GetArrayFromImage(icbm152._load()[0]).astype(np.float32)
    ours = t1 / t1.max() > icbm152.BRAIN_THRESHOLD
    # nibabel's (x, y, z) is SimpleITK's (k, j, i) reversed.
    theirs = np.asarray(load_mni152_brain_mask(resolution=1).dataobj).transpose(2, 1, 0) > 0
    np.testing.assert_array_equal(ours, theirs)
