"""Typed provenance, honest anonymisation, verified case folders and safe concurrent outputs.

Issue 12 (seam 1: typed records and their registry; seam 3: one owner of the case folder)
and issue 15 items 2-5.  Label maps are small ellipsoid brains; the "derived" map carries
the ``derive_labels`` record ``medsynth labels`` writes, the "template" map the
``template_labels`` record of the healthy template.  Synthesis uses a random-weight tiny
model; the concurrency tests run two real processes against one output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from conftest import run_cli as run, write_random_model
from MedSynthLib.edits import EDITS, InsertTumour, ParametricTumour, Translate
from MedSynthLib.export import export_cases, provenance_summary, read_synthetic_case, sanitise_provenance
from MedSynthLib.schema.errors import InputError
from MedSynthLib.schema.grid import Grid, LabelMap
from MedSynthLib.schema.labelmap import read_label_map, write_label_map
from MedSynthLib.schema.labels import SCHEMA_VERSION, Label
from MedSynthLib.schema.provenance import (MAX_ANONYMOUS_TUMOUR_DICE, RATING_RANGE, RECORD_KINDS, PrivacyRecord,
                                           SynthesisRecord, array_sha256, parse_step, privacy_of, sidecar_path)
from MedSynthLib.synthesis.case_folder import OWNED_FILES, read_case_folder, write_case_folder

DERIVE = {"name": "derive_labels", "params": {"convention": "brats2021", "label_convention": "brats2021",
                                              "anatomy_model": {"name": "kmeans-gaussian-mrf", "beta": 2.0}},
          "schema_version": SCHEMA_VERSION}
TEMPLATE = {"name": "template_labels", "params": {"template": "ICBM152-2009a-sym"}, "schema_version": SCHEMA_VERSION}


def brain(size=(34, 38, 30), spacing=(1.0, 1.1, 1.2), tumour_at=(0.6, 0.5, 0.5), history=(DERIVE,)) -> LabelMap:
    """An ellipsoid brain (CSF rim, GM shell, WM core) with an NCR/ET/ED tumour."""
    grid = Grid(tuple(size), tuple(spacing), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    extent = np.asarray(size, float)
    k, j, i = np.indices(grid.shape, dtype=float)
    idx = (i, j, k)
    centre = (extent - 1) / 2
    r = np.sqrt(sum(((idx[a] - centre[a]) / (0.45 * extent[a])) ** 2 for a in range(3)))
    labels = np.zeros(grid.shape, np.uint8)
    labels[r < 1.0] = Label.CSF
    labels[r < 0.9] = Label.GM
    labels[r < 0.72] = Label.WM
    if tumour_at is not None:
        c = np.asarray(tumour_at) * (extent - 1)
        d = np.sqrt(sum(((idx[a] - c[a]) * spacing[a]) ** 2 for a in range(3)))
        for value, radius in ((Label.ED, 7.0), (Label.ET, 4.5), (Label.NCR, 2.5)):
            labels[(d < radius) & (labels > 0)] = value
    return LabelMap(labels, grid, [dict(record) for record in history])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def fake_images(labelmap: LabelMap) -> dict[str, np.ndarray]:
    means = np.array([0, 420.3, 610.7, 880.2, 350.1, 520.9, 700.4], np.float32)
    return {m: means[labelmap.array] * (1 + 0.1 * n) for n, m in enumerate(("t1", "t1ce", "t2", "flair"))}


def write_case(labelmap: LabelMap, folder: Path, **extra) -> Path:
    """A synthetic case folder written by the case-folder module (stand-in images, no model)."""
    from MedSynthLib.schema.provenance import software_versions

    provenance = {"kind": "medsynth-synthetic-case", "synthetic": True, "label_schema_version": SCHEMA_VERSION,
                  "model": {"name": "tiny", "sha256": "cd" * 32}, "labels_sha256": array_sha256(labelmap.array),
                  "edits": labelmap.history, "privacy": privacy_of(labelmap).to_json(), "seed": 0, "device": "cpu",
                  "precision": "fp32", "grid": labelmap.grid.to_json(), "software": software_versions(),
                  "timings_s": {"network": 0.1}, **extra}
    return write_case_folder(labelmap, fake_images(labelmap), provenance, folder)


# --- A. typed records and their registry (issue 12, seam 1) ------------------------------------------


def test_every_edit_kind_has_a_typed_record_with_its_recorded_fields():
    for name, cls in EDITS.items():
        assert name in RECORD_KINDS, f"edit {name} has no provenance record kind"
        recorded = {f.name for f in dataclasses.fields(cls)} - set(cls._unrecorded)
        recorded |= set(cls.renamed_params)  # older records' spellings stay readable
        typed = {f.name for f in dataclasses.fields(RECORD_KINDS[name])}
        assert recorded == typed, f"{name}: recorded {sorted(recorded)} but typed {sorted(typed)}"
    assert {"derive_labels", "template_labels", "tumour_from_segmentation", "manual_segment_edit"} <= set(RECORD_KINDS)


def test_edit_records_round_trip_through_their_types():
    labelmap = brain()
    edited = ParametricTumour(centre_ras_mm=(-15.0, -20.0, 18.0), radii_mm=(5.0, 4.0, 4.0), seed=3)(
        Translate((2.0, 0.0, 0.0))(labelmap))
    for record in edited.history:
        assert parse_step(record).to_json() == {**record, "params": {
            k: v for k, v in record["params"].items() if v is not None}}, record["name"]


def test_slicer_tumour_from_segmentation_is_recognised_on_export():
    """The Slicer record of a tumour put into the template used to be exported as 'unrecognised'."""
    labelmap = brain(history=(TEMPLATE, {"name": "tumour_from_segmentation", "params": {"label_convention": "brats2021"},
                                         "schema_version": SCHEMA_VERSION}))
    raw = SynthesisRecord().to_json() | {"edits": labelmap.history, "labels_sha256": array_sha256(labelmap.array)}
    clean, removed = sanitise_provenance(raw, labelmap.grid)
    assert [e["name"] for e in clean["edits"]] == ["template_labels", "tumour_from_segmentation"]
    assert clean["edits"][1]["params"] == {"label_convention": "brats2021"} and removed == 0


@pytest.mark.parametrize("effective", [True, False])
def test_whether_the_seed_shaped_the_images_reaches_the_export(effective):
    """``synthesize`` records ``seed_effective`` beside the seed (README: a model without an appearance code ignores
    it); the typed record had no field for it, so every export dropped it and counted it as a removed field."""
    labelmap = brain(history=(DERIVE,))
    raw = SynthesisRecord().to_json() | {"edits": labelmap.history, "labels_sha256": array_sha256(labelmap.array),
                                         "seed": 5, "seed_effective": effective}
    clean, removed = sanitise_provenance(raw, labelmap.grid)
    assert clean["seed"] == 5 and clean["seed_effective"] is effective and removed == 0
    assert "seed_effective" not in SynthesisRecord.from_json({"seed": 1}).to_json()  # older files: not invented


def test_older_sidecars_and_provenance_still_read(tmp_path):
    """Files written before the typed records (no privacy, no hash in the sidecar) read as before."""
    labelmap = brain()
    path = tmp_path / "old.nii.gz"
    sitk.WriteImage(labelmap.image(), str(path))
    sidecar_path(path).write_text(json.dumps({"kind": "medsynth-label-map", "schema_version": SCHEMA_VERSION,
                                              "history": [DERIVE]}))
    read = read_label_map(path)
    assert read.history == [DERIVE] and privacy_of(read).anatomy == "patient"
    old = {"kind": "medsynth-synthetic-case", "synthetic": True, "model": {"name": "x", "sha256": "ab" * 32},
           "edits": [DERIVE], "seed": 1, "timings_s": {"total": 1.0}}
    record = SynthesisRecord.from_json(old)
    assert record.seed == 1 and record.edits[0].name == "derive_labels" and record.privacy is None


# --- E. one typed schema for what may leave (issue 15, item 4) ------------------------------------------

LEAKS = ("BraTS2021_00000", "Doe", "MRN12345", "patient_mrn")


def test_free_tokens_and_nested_keys_never_leave():
    """Nested keys under known parameters, free tokens and voxel_change keys used to pass the key filter."""
    labelmap = brain()
    edits = [
        {"name": "derive_labels", "params": {"convention": "brats2021", "label_convention": "brats2021",
                                             "anatomy_model": {"name": "BraTS2021_00000", "beta": 2.0,
                                                               "reference": "Doe", "case": "MRN12345"}}},
        {"name": "template_labels", "params": {"template": "BraTS2021_00000"}},
        {"name": "manual_segment_edit", "params": {"changed_voxels": 3,
                                                   "voxel_change": {"ET": 3, "BraTS2021_00000": 1, "Doe": -4}}},
        {"name": "flip", "params": {"axis": "LR", "about": "Doe"}},
        {"name": "insert_tumour", "params": {"center_ras_mm": [1, 2, 3], "source": "BraTS2021_00000"}},
    ]
    raw = {"kind": "medsynth-synthetic-case", "synthetic": True, "model": {"name": "BraTS2021_00000",
                                                                           "sha256": "ab" * 32},
           "labels_sha256": array_sha256(labelmap.array), "edits": edits, "seed": 3, "device": "Doe",
           "precision": "fp32", "software": {"torch": "2.13.0", "numpy": "BraTS2021_00000", "Doe": "1.0"},
           "timings_s": {"network": 1.0, "BraTS2021_00000": 2.0},
           "review": {"rating": 3, "note": "Doe's case", "patient_mrn": "MRN12345"}}
    clean, removed = sanitise_provenance(raw, labelmap.grid)
    text = json.dumps(clean) + provenance_summary(clean)
    for word in LEAKS:
        assert word not in text, word
    assert clean["edits"][0]["params"] == {"convention": "brats2021", "label_convention": "brats2021",
                                           "anatomy_model": {"beta": 2.0}}
    assert clean["edits"][2]["params"] == {"changed_voxels": 3, "voxel_change": {"ET": 3}}
    assert clean["edits"][3]["params"] == {"axis": "LR"}
    assert clean["model"]["name"] == "unregistered" and clean["device"] is None
    assert clean["software"] == {"torch": "2.13.0"} and clean["timings_s"] == {"network": 1.0}
    assert clean["review"] == {"rating": 3}
    assert removed >= 13


def test_slicer_and_export_ratings_agree():
    """Slicer stores 0 for 'not rated'; the export keeps 0..5 the same way."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "MedSynth"))  # as the Slicer tests import it
    from MedSynthSlicerLib.parameters import RATINGS

    assert tuple(RATINGS) == RATING_RANGE
    for rating in range(RATING_RANGE[0], RATING_RANGE[1] + 1):
        raw = SynthesisRecord().to_json() | {"review": {"rating": rating}}
        assert sanitise_provenance(raw, brain().grid)[0]["review"] == {"rating": rating}


# --- C. honest anonymisation (issue 15, item 2) -------------------------------------------------------


def test_privacy_is_measured_edit_by_edit():
    derived = brain()
    start = privacy_of(derived)
    assert (start.anatomy, start.brain_dice_to_source, start.tumour_dice_to_source) == ("patient", 1.0, 1.0)
    moved = Translate((6.0, 0.0, 0.0))(derived)
    true = dice(moved.array >= Label.NCR, derived.array >= Label.NCR)
    assert 0.05 < true < 0.95
    assert moved.privacy.tumour_dice_to_source == pytest.approx(true, abs=1e-3)  # one step: exact
    assert moved.privacy.brain_dice_to_source == 1.0  # edits keep the brain outline
    assert not moved.privacy.anonymous()[0]
    back = Translate((-6.0, 0.0, 0.0))(moved)
    assert back.privacy.tumour_dice_to_source >= dice(back.array >= Label.NCR, derived.array >= Label.NCR) - 1e-3
    template = brain(size=(36, 40, 32), tumour_at=None, history=(TEMPLATE,))
    inserted = InsertTumour(source="case")(template, source=derived)
    assert inserted.privacy.anatomy == "template" and inserted.privacy.tumour_origin == "inserted"
    assert not inserted.privacy.anonymous()[0]  # a real tumour's shape identifies its patient
    assert not PrivacyRecord().anonymous()[0]  # no history: source unknown


def test_privacy_survives_the_label_map_files(tmp_path):
    moved = Translate((6.0, 0.0, 0.0))(brain())
    read = read_label_map(write_label_map(moved, tmp_path / "m.nii.gz"))
    assert read.privacy == moved.privacy


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from MedSynthLib.synthesis.networks import MODALITY_ORDER

    return write_random_model(tmp_path_factory.mktemp("models") / "tiny",
                              {m: {"low": 0.0, "high": 1000.0} for m in MODALITY_ORDER}, seed=0)


def test_export_states_privacy_and_anonymous_refuses_a_patients_anatomy(tiny_model, tmp_path, capsys):
    labels = write_label_map(brain(), tmp_path / "labels.nii.gz")  # as `medsynth labels` writes it
    assert run(["tumor", labels, "--translate", 6, 0, 0, "-o", tmp_path / "moved.nii.gz"], capsys)[0] == 0
    case = tmp_path / "case"
    rc, _, err = run(["synthesize", tmp_path / "moved.nii.gz", "-o", case, "--model", tiny_model,
                      "--device", "cpu"], capsys)
    assert rc == 0, err
    privacy = json.loads((case / "provenance.json").read_text())["privacy"]
    moved, source = read_label_map(tmp_path / "moved.nii.gz").array, read_label_map(labels).array
    assert privacy["anatomy"] == "patient" and privacy["brain_dice_to_source"] == 1.0
    assert privacy["tumour_dice_to_source"] == pytest.approx(dice(moved >= 4, source >= 4), abs=1e-3)

    rc, _, err = run(["export", case, "--format", "nifti", "--anonymous", "-o", tmp_path / "anon"], capsys)
    assert rc == 2 and "not anonymous" in err and "anatomy is the source patient's own" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "anon").exists()

    rc, _, err = run(["export", case, "--format", "dicom", "-o", tmp_path / "plain"], capsys)
    assert rc == 0, err
    (exported,) = (tmp_path / "plain").iterdir()
    assert "NOT anonymous" in (exported / "README.txt").read_text()
    meta = json.loads((exported / "provenance.json").read_text())
    assert meta["privacy"]["anonymous"] is False and meta["export"]["anonymous"] is False
    ds = pydicom.dcmread(next((exported / "T1").glob("*.dcm")), stop_before_pixels=True)
    assert "Privacy: anatomy patient" in ds.ImageComments and "NOT anonymous" in ds.ImageComments


def test_anonymous_export_refuses_a_real_tumour_even_in_the_template(tiny_model, tmp_path, capsys):
    """A patient's tumour shape identifies the patient wherever it sits (the study's shape attack)."""
    source = write_label_map(brain(), tmp_path / "patient.nii.gz")
    template = write_label_map(brain(size=(36, 40, 32), tumour_at=None, history=(TEMPLATE,)),
                               tmp_path / "template.nii.gz")
    rc, _, err = run(["tumor", "insert", "--from", source, "--into", template, "-o", tmp_path / "ins.nii.gz"], capsys)
    assert rc == 0, err
    case = tmp_path / "case"
    assert run(["synthesize", tmp_path / "ins.nii.gz", "-o", case, "--model", tiny_model, "--device", "cpu"],
               capsys)[0] == 0
    rc, _, err = run(["export", case, "--format", "nifti", "--anonymous", "-o", tmp_path / "anon"], capsys)
    assert rc == 2 and "shape identifies that patient" in err
    assert not (tmp_path / "anon").exists() or not any((tmp_path / "anon").iterdir())
    rc, _, err = run(["export", case, "--format", "nifti", "-o", tmp_path / "named"], capsys)
    assert rc == 0, err
    (exported,) = (tmp_path / "named").iterdir()
    meta = json.loads((exported / "provenance.json").read_text())
    assert meta["privacy"]["anatomy"] == "template" and meta["privacy"]["tumour_origin"] == "inserted"
    assert meta["privacy"]["anonymous"] is False
    assert "NOT anonymous" in (exported / "README.txt").read_text()


def test_a_parametric_tumour_in_the_template_is_anonymous():
    assert PrivacyRecord("template", None, None, "parametric").anonymous()[0]
    assert PrivacyRecord("template", None, None, "none").anonymous()[0]
    for origin in ("inserted", "mixed"):
        assert not PrivacyRecord("template", None, None, origin).anonymous()[0]


def test_a_tumour_of_unknown_or_loaded_origin_is_not_anonymous():
    """The rule fails closed: a tumour whose origin is not recorded, or a segmentation loaded in Slicer (a patient's
    expert segmentation, say), does not pass even in the template."""
    for origin in ("unknown", "segmentation"):
        ok, reason = PrivacyRecord("template", None, None, origin).anonymous()
        assert not ok and "parametric tumour instead" in reason, origin


def _without_privacy_record(case: Path) -> Path:
    """The case as a MedSynth that recorded no privacy wrote it (the file hashes still match)."""
    from MedSynthLib.schema.provenance import file_sha256

    sidecar = json.loads((case / "labels.json").read_text())
    sidecar.pop("privacy")
    (case / "labels.json").write_text(json.dumps(sidecar))
    provenance = json.loads((case / "provenance.json").read_text())
    provenance.pop("privacy")
    provenance["files"]["labels.json"] = file_sha256(case / "labels.json")
    (case / "provenance.json").write_text(json.dumps(provenance))
    return case


def test_a_case_without_a_privacy_record_is_judged_by_its_history(tmp_path, capsys):
    """An inserted (real) tumour in the template, recorded only in the history, is not exported as anonymous."""
    template = brain(size=(36, 40, 32), tumour_at=None, history=(TEMPLATE,))
    inserted = InsertTumour(source="case")(template, source=brain())
    assert PrivacyRecord.from_history(inserted.history, inserted.array).tumour_origin == "inserted"
    case = _without_privacy_record(write_case(inserted, tmp_path / "inserted"))
    rc, _, err = run(["export", case, "--format", "nifti", "--anonymous", "-o", tmp_path / "anon"], capsys)
    assert rc == 2 and "not anonymous" in err and "shape identifies that patient" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "anon").exists()

    # The shipped template itself: export checks an anonymous claim against the template's voxels.
    from MedSynthLib.cases.template import template_label_map

    parametric = ParametricTumour(centre_ras_mm=(28.0, -12.0, 26.0), radii_mm=(8.0, 7.0, 7.0),
                                  seed=3)(template_label_map())
    assert PrivacyRecord.from_history(parametric.history, parametric.array).tumour_origin == "parametric"
    case = _without_privacy_record(write_case(parametric, tmp_path / "parametric"))
    rc, _, err = run(["export", case, "--format", "nifti", "--anonymous", "-o", tmp_path / "anon"], capsys)
    assert rc == 0, err


def test_a_parametric_tumour_that_replaced_a_real_one_is_not_anonymous(tmp_path, capsys):
    """A replaced (or erased) tumour is refilled with the nearest anatomy labels, which differ from the healthy brain
    inside its outline: set against the template (public) the exported anatomy gives the old tumour's outline back.
    So a parametric tumour drawn over a patient's inserted tumour is not anonymous, nor is that tumour erased."""
    from MedSynthLib.edits.base import healthy_anatomy

    template = brain(size=(36, 40, 32), tumour_at=None, history=(TEMPLATE,))
    inserted = InsertTumour(source="case", centre_ras_mm=(-27.0, -21.5, 18.6))(template, source=brain())
    old = inserted.array >= Label.NCR
    replaced = ParametricTumour(centre_ras_mm=(-8.0, -22.0, 19.0), radii_mm=(3.0, 3.0, 3.0), oedema_mm=2.0,
                                seed=3)(inserted)
    new = replaced.array >= Label.NCR
    trace = (replaced.array != template.array) & ~new
    assert not (new & old).any() and trace.any() and not (trace & ~old).any()  # the anatomy keeps the old outline
    erased = inserted.with_array(healthy_anatomy(inserted.array),
                                 {"name": "manual_segment_edit", "params": {"changed_voxels": int(old.sum())},
                                  "schema_version": SCHEMA_VERSION})  # the Slicer module's eraser
    for labelmap in (replaced, erased):
        for privacy in (labelmap.privacy, PrivacyRecord.from_history(labelmap.history, labelmap.array)):
            ok, reason = privacy.anonymous()
            assert privacy.tumour_origin == "mixed" and not ok and "refilled" in reason, privacy
    drawn_twice = ParametricTumour(centre_ras_mm=(-8.0, -22.0, 19.0), radii_mm=(3.0, 3.0, 3.0), seed=3)(
        ParametricTumour(centre_ras_mm=(-27.0, -21.5, 18.6), radii_mm=(4.0, 4.0, 4.0), seed=1)(template))
    assert drawn_twice.privacy.tumour_origin == "parametric" and drawn_twice.privacy.anonymous()[0]

    case = write_case(replaced, tmp_path / "case")
    rc, _, err = run(["export", case, "--format", "dicom", "--anonymous", "-o", tmp_path / "anon"], capsys)
    assert rc == 2 and "not anonymous" in err and "refilled" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "anon").exists()


def test_a_case_whose_recorded_privacy_is_laxer_than_its_history_is_judged_by_its_history(tmp_path, capsys):
    """A case written before a replaced tumour counted as ``mixed`` records ``parametric`` for a parametric tumour
    drawn over an inserted (real) one; its history says what happened, and the export goes by the stricter."""
    template = brain(size=(36, 40, 32), tumour_at=None, history=(TEMPLATE,))
    inserted = InsertTumour(source="case", centre_ras_mm=(-27.0, -21.5, 18.6))(template, source=brain())
    replaced = ParametricTumour(centre_ras_mm=(-8.0, -22.0, 19.0), radii_mm=(3.0, 3.0, 3.0), seed=3)(inserted)
    recorded = PrivacyRecord("template", None, None, "parametric")  # what the earlier measure wrote
    case = write_case(dataclasses.replace(replaced, privacy=recorded), tmp_path / "case")
    assert json.loads((case / "provenance.json").read_text())["privacy"]["tumour_origin"] == "parametric"
    assert read_synthetic_case(case).privacy.tumour_origin == "mixed"
    rc, _, err = run(["export", case, "--format", "nifti", "--anonymous", "-o", tmp_path / "anon"], capsys)
    assert rc == 2 and "not anonymous" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "anon").exists()
    rc, _, err = run(["export", case, "--format", "nifti", "-o", tmp_path / "named"], capsys)
    assert rc == 0, err
    (exported,) = (tmp_path / "named").iterdir()
    meta = json.loads((exported / "provenance.json").read_text())
    assert meta["privacy"]["tumour_origin"] == "mixed" and meta["privacy"]["anonymous"] is False
    assert "NOT anonymous" in (exported / "README.txt").read_text()


def test_tumour_dice_threshold_applies_to_a_tumour_left_in_place():
    record = PrivacyRecord("template", None, MAX_ANONYMOUS_TUMOUR_DICE, "patient")
    assert not record.anonymous()[0]
    assert dataclasses.replace(record, tumour_dice_to_source=MAX_ANONYMOUS_TUMOUR_DICE / 2).anonymous()[0]


# --- B + D. the case folder: one owner, no intensity round trip, verified files ----------------------------


def test_case_folder_keeps_int16_without_a_round_trip(tmp_path):
    labelmap = brain(history=(TEMPLATE,))
    case = write_case(labelmap, tmp_path / "case")
    folder = read_case_folder(case)
    assert all(image.dtype == np.int16 for image in folder.images.values())
    exported = export_cases([case], tmp_path / "exp", "nifti")[0]
    stored = sitk.ReadImage(str(exported / f"{exported.name}_t1.nii.gz"))
    assert stored.GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(stored), folder.images["t1"])


def test_highdicom_cielab_matches_the_colour_formula():
    from MedSynthLib.export.dicom import segment_colour
    from MedSynthLib.schema.labels import LABEL_INFO

    for info in LABEL_INFO.values():
        rgb = np.asarray(info.color, float)
        linear = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
        xyz = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                        [0.0193339, 0.1191920, 0.9503041]]) @ linear / np.array([0.95047, 1.0, 1.08883])
        f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
        expected = (116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2]))
        np.testing.assert_allclose(segment_colour(tuple(rgb)).lab, expected, atol=0.5)


def test_export_refuses_a_real_image_put_into_a_case(tmp_path):
    case = write_case(brain(history=(TEMPLATE,)), tmp_path / "case")
    other = write_case(brain(tumour_at=(0.4, 0.5, 0.5), history=(TEMPLATE,)), tmp_path / "other")
    (case / "t2.nii.gz").write_bytes((other / "t2.nii.gz").read_bytes())
    with pytest.raises(InputError, match="t2.nii.gz: does not match the sha256"):
        read_synthetic_case(case)
    (case / "t2.nii.gz").unlink()
    (case / "t2.nii.gz").symlink_to(other / "t2.nii.gz")
    with pytest.raises(InputError, match="is a link"):
        export_cases([case], tmp_path / "exp", "nifti")
    assert not (tmp_path / "exp").exists()


# --- F. locks, overwrite, sidecar hash, staging (issue 15, item 5) ------------------------------------------


def test_read_label_map_checks_the_sidecar_hash(tmp_path):
    a = write_label_map(brain(), tmp_path / "a.nii.gz")
    b = write_label_map(Translate((4.0, 0.0, 0.0))(brain()), tmp_path / "b.nii.gz")
    sidecar_path(a).write_text(sidecar_path(b).read_text())  # one run's image with another's sidecar
    with pytest.raises(InputError, match="labels_sha256 differs"):
        read_label_map(a)


def test_overwrite_keeps_a_users_files_and_removes_stale_staging(tmp_path):
    labelmap = brain(history=(TEMPLATE,))
    case = write_case(labelmap, tmp_path / "W")
    (case / "notes.txt").write_text("mine")
    stale = tmp_path / f".W.medsynth-stage-{2 ** 22 + 12345}-abc"  # a killed run's staging (no such process)
    stale.mkdir()
    (stale / "t1.nii.gz").write_bytes(b"partial")
    moved = Translate((3.0, 0.0, 0.0))(labelmap)
    with pytest.raises(Exception, match="already exists"):
        write_case_folder(moved, fake_images(moved), {"kind": "medsynth-synthetic-case"}, case)
    write_case_folder(moved, fake_images(moved), {"kind": "medsynth-synthetic-case"}, case, overwrite=True)
    assert (case / "notes.txt").read_text() == "mine"
    assert read_label_map(case / "labels.nii.gz").array.tobytes() == moved.array.tobytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["W"]  # stale staging gone, no lock file left
    # montage.png and synthetic_mask.nii.gz (inpainting only) are owned but optional: not written here
    optional = {"montage.png", "synthetic_mask.nii.gz"}
    assert {p.name for p in case.iterdir()} == (set(OWNED_FILES) - optional) | {"notes.txt"}


def _concurrent_child(argv: list[str], pause_at: str, barrier, results) -> None:
    """Run ``medsynth ARGV`` in this process, pausing at ``pause_at`` until the other run is there too."""
    import importlib

    module_name, attribute = pause_at.rsplit(".", 1)
    owner_name, _, method = attribute.partition(":")
    module = importlib.import_module(module_name)
    owner = getattr(module, owner_name) if method else module
    name = method or owner_name
    original = getattr(owner, name)

    def paused(*args, **kwargs):
        result = original(*args, **kwargs) if method else None
        barrier.wait(120)  # both runs have checked the output and built their result
        return result if method else original(*args, **kwargs)

    setattr(owner, name, paused)
    from MedSynthLib.cli import main as cli_main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli_main(argv)
    results.put((rc, err.getvalue()))


def _race(argvs: list[list[str]], pause_at: str) -> list[tuple[int, str]]:
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(len(argvs)), ctx.Queue()
    processes = [ctx.Process(target=_concurrent_child, args=(argv, pause_at, barrier, results)) for argv in argvs]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=300) for _ in processes]
    for process in processes:
        process.join(60)
    return sorted(outcomes)


def test_two_concurrent_tumor_runs_on_one_output(tmp_path):
    labels = write_label_map(brain(), tmp_path / "L.nii.gz")
    out = tmp_path / "M.nii.gz"
    argvs = [["tumor", str(labels), "--translate", str(dx), "0", "0", "-o", str(out)] for dx in (3, -3)]
    (first, second) = _race(argvs, "MedSynthLib.cli._write_edited")
    assert first[0] == 0 and second[0] == 2 and "already exists" in second[1], (first, second)
    read_label_map(out)  # image and sidecar of one run (the sidecar hash is checked)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["L.json", "L.nii.gz", "M.json", "M.nii.gz"]
    for _ in range(3):  # before the lock, about one race in three left one run's image with the other's sidecar
        outcomes = _race([a + ["--overwrite"] for a in argvs], "MedSynthLib.cli._write_edited")
        assert [rc for rc, _ in outcomes] == [0, 0], outcomes
        read_label_map(out)
        assert len(list(tmp_path.iterdir())) == 4


def test_two_concurrent_synthesize_runs_on_one_output(tiny_model, tmp_path):
    labels = write_label_map(brain(), tmp_path / "L.nii.gz")
    other = write_label_map(Translate((3.0, 0.0, 0.0))(brain()), tmp_path / "L2.nii.gz")
    out = tmp_path / "C"
    argvs = [["synthesize", str(path), "-o", str(out), "--model", str(tiny_model), "--device", "cpu"]
             for path in (labels, other)]
    (first, second) = _race(argvs, "MedSynthLib.synthesis.synthesize.SynthesisEngine:synthesize")
    assert first[0] == 0 and second[0] == 2 and "already exists" in second[1], (first, second)
    folder = read_case_folder(out)  # every file is the one its provenance records
    assert folder.record.labels_sha256 == array_sha256(folder.labels.array)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["C", "L.json", "L.nii.gz", "L2.json", "L2.nii.gz"]


def test_every_anatomy_model_setting_has_a_typed_field():
    """A setting of an anatomy model missing from the typed record would make its label maps'
    provenance unreadable (it did for the registration sampling when it was added)."""
    from dataclasses import fields

    from MedSynthLib.cases.anatomy import ANATOMY_MODELS
    from MedSynthLib.schema.provenance import AnatomyModelParams

    known = {f.name for f in fields(AnatomyModelParams)}
    for name, model in ANATOMY_MODELS.items():
        assert set(model.to_json()) <= known, (name, set(model.to_json()) - known)


def test_privacy_after_an_edit_counts_the_whole_masks_through_the_changed_box():
    """The step's Jaccard distances, counted in the box where the maps differ, are the whole-volume ones."""
    from MedSynthLib.schema.provenance import PrivacyRecord, _dice_from_distance, _distance_from_dice

    rng = np.random.default_rng(2)
    before = rng.integers(0, 7, (20, 22, 18)).astype(np.uint8)
    after = before.copy()
    after[4:9, 5:12, 6:10] = rng.integers(0, 7, (5, 7, 4))
    start = PrivacyRecord("patient", 0.9, 0.8, "patient")
    record = start.after_step(before, after, {"name": "move_tumour"}, (slice(4, 9), slice(5, 12), slice(6, 10)))
    assert start.after_step(before, after, {"name": "move_tumour"}) == record  # the whole array as the box

    def whole(a, b):
        return 1.0 - np.count_nonzero(a & b) / np.count_nonzero(a | b)

    brain = round(_dice_from_distance(abs(_distance_from_dice(0.9) - whole(before > 0, after > 0))), 4)
    tumour = round(_dice_from_distance(abs(_distance_from_dice(0.8) - whole(before >= 4, after >= 4))), 4)
    assert (record.brain_dice_to_source, record.tumour_dice_to_source) == (brain, tumour)
    assert tumour != 0.8 and brain != 0.9  # the step changed both masks: the test can fail
    same = start.after_step(before, before.copy(), None, (slice(0, 0),) * 3)
    assert (same.brain_dice_to_source, same.tumour_dice_to_source) == (0.9, 0.8)
    # Through LabelMap.with_array, which finds the changed box itself.
    from MedSynthLib.schema.grid import Grid, LabelMap

    grid = Grid(before.shape[::-1], (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    edited = LabelMap(before, grid, [], privacy=start).with_array(after, {"name": "move_tumour"})
    assert edited.privacy == record


@pytest.mark.parametrize("anatomy", ["patient", "template"])
def test_the_refusal_of_a_patients_images_points_to_what_can_be_shared(anatomy):
    """An inpainted real case was told to 'synthesise the whole case instead to share it': a whole synthetic case
    from the same label map keeps the patient's anatomy and is refused too.  The message points to what passes."""
    from MedSynthLib.schema.provenance import PrivacyRecord

    patient_images = PrivacyRecord(anatomy, 1.0 if anatomy == "patient" else None, None, "parametric", "patient")
    ok, reason = patient_images.anonymous()
    assert not ok and "patient's own scan" in reason
    assert "template" in reason and "parametric" in reason
    whole = PrivacyRecord("patient", 1.0, 1.0, "patient")  # the same label map synthesised as a whole case
    assert not whole.anonymous()[0]
