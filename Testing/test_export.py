"""Tests of ``medsynth export``: BraTS NIfTI and DICOM, marked synthetic, nothing of the source patient.

Case folders are written directly (no trained model): four float32 modalities,
a 7-class label map and a realistic ``provenance.json`` on small oblique grids.
DICOM exports are read back with SimpleITK (GDCM), pydicom and highdicom.
"""

from __future__ import annotations

import atexit
import functools
import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from conftest import run_cli as run
from MedSynthLib.cases.readers import read_case
from MedSynthLib.cli import main
from MedSynthLib.export import (DEIDENTIFICATION_METHOD, MODALITIES, NAMINGS, encode_intensities, export_cases,
                                       read_synthetic_case, sanitise_provenance)
from MedSynthLib.export.dicom import NOT_ANONYMOUS_DEIDENTIFICATION_METHOD
from MedSynthLib.schema.grid import Grid
from MedSynthLib.synthesis.models import read_registry
from MedSynthLib.schema.labels import CONVENTIONS, Label, schema_to_tumour
from MedSynthLib.schema.provenance import OUTPUT_FILES, array_sha256, file_sha256, label_map_record, software_versions

SHAPE = (36, 40, 32)  # (k, j, i): size (32, 40, 36)
SPACING = (0.9, 1.1, 1.3)
ORIGIN = (10.0, -20.0, 5.0)


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    ax, ay, az = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


#: Right-handed: oblique and LPS-flipped (a BraTS-like RAS-stored NIfTI, tilted).
OBLIQUE = tuple((_rotation(8, -6, 15) @ np.diag([-1.0, -1.0, 1.0])).ravel())
#: Left-handed (radiological convention): DICOM readers return it with the slices reversed.
LEFT_HANDED = tuple((_rotation(0, 5, -10) @ np.diag([-1.0, 1.0, 1.0])).ravel())
GEOMETRIES = {"oblique": OBLIQUE, "left_handed": LEFT_HANDED}
IDENTIFIERS = (b"Doe", b"MRN12345", b"hospital")
#: A registered model: the export names a model only when the registry lists that name with its sha256.
MODEL_NAME = read_registry()["default"]
MODEL_SHA = read_registry()["models"][MODEL_NAME]["sha256"]


#: Each modality's mean intensity per label (0 background ... 6 ET).
CLASS_MEANS = {"t1": (0, 420.3, 610.7, 880.2, 350.1, 520.9, 700.4),
               "t1ce": (0, 430.6, 640.2, 900.8, 380.3, 540.5, 1450.6),
               "t2": (0, 1900.5, 1100.2, 800.7, 1300.4, 1700.3, 1200.9),
               "flair": (0, 300.2, 900.8, 700.1, 1000.6, 1350.7, 1100.3)}


def _phantom(scale: float = 1.0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Float32 modalities with fractional values and a 7-class label map with all tumour classes."""
    k, j, i = np.indices(SHAPE, dtype=float)
    c = np.array(SHAPE) / 2.0
    r = np.sqrt(sum(((g - cc) / (n * 0.45)) ** 2 for g, cc, n in zip((k, j, i), c, SHAPE)))
    labels = np.zeros(SHAPE, np.uint8)
    labels[r < 1.0] = Label.CSF
    labels[r < 0.9] = Label.GM
    labels[r < 0.7] = Label.WM
    rt = np.sqrt((k - c[0]) ** 2 + (j - c[1] - 5) ** 2 + (i - c[2] - 4) ** 2)
    labels[(rt < 7) & (r < 1)] = Label.ED
    labels[(rt < 4.5) & (r < 1)] = Label.ET
    labels[(rt < 2.5) & (r < 1)] = Label.NCR
    rng = np.random.default_rng(0)
    images = {}
    for modality, means in CLASS_MEANS.items():
        array = np.asarray(means, np.float64)[labels] + rng.normal(0, 20, SHAPE) * (labels > 0)
        images[modality] = (np.where(labels > 0, np.maximum(array, 1.0), 0.0) * scale).astype(np.float32)
    return images, labels


def _provenance(labels: np.ndarray, **extra) -> dict:
    return {
        "kind": "medsynth-synthetic-case",
        "synthetic": True,
        "label_schema_version": 1,
        "model": {"name": MODEL_NAME, "sha256": MODEL_SHA},
        "labels_sha256": array_sha256(labels),
        "edits": [
            {"name": "derive_labels", "params": {"convention": "brats2021", "label_convention": "brats2021",
                                                 "anatomy_model": {"beta": 2.0, "iterations": 6,
                                                                   "name": "kmeans-gaussian-mrf"}},
             "schema_version": 1},
            {"name": "translate", "params": {"offset_ras_mm": [4.0, -2.0, 1.5]}, "schema_version": 1},
            {"name": "insert_tumour", "params": {"center_ras_mm": None, "keep_existing": False,
                                                 "source": "BraTS2021_00012"}, "schema_version": 1},
        ],
        "seed": 7,
        "device": "cpu",
        "precision": "fp32",
        "grid": {},
        "software": software_versions(),
        "timings_s": {"load_model": 0.4, "network": 2.1, "total": 2.6},
        **extra,
    }


def _write(array: np.ndarray, path: Path, direction, descrip: bytes | None = None) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection([float(v) for v in direction])
    sitk.WriteImage(image, str(path), useCompression=True)
    if descrip is not None:  # a source header's identifying text, as a scanner converter leaves it
        nii = nib.load(str(path))
        header = nii.header.copy()
        header["descrip"] = descrip
        header["aux_file"] = descrip[:23]
        nib.save(nib.Nifti1Image(np.asanyarray(nii.dataobj), nii.affine, header), str(path))


def make_case(folder: Path, direction=OBLIQUE, scale: float = 1.0, descrip: bytes | None = None,
              provenance: dict | None = None, history: list | None = None) -> Path:
    """A ``medsynth synthesize`` output folder written directly (``history``: the label map's, default none)."""
    folder.mkdir(parents=True)
    images, labels = _phantom(scale)
    for modality, array in images.items():
        _write(array, folder / f"{modality}.nii.gz", direction, descrip)
    _write(labels, folder / "labels.nii.gz", direction, descrip)
    (folder / "labels.json").write_text(json.dumps(label_map_record(history or [], labels)))
    provenance = dict(provenance or _provenance(labels))
    provenance.setdefault("files", {name: file_sha256(folder / name) for name in OUTPUT_FILES})
    (folder / "provenance.json").write_text(json.dumps(provenance, indent=2))
    return folder


def inpainted_case(folder: Path) -> Path:
    """A case as ``synthesize --context`` writes it: a patient's scan with the tumour region re-rendered."""
    _, labels = _phantom()
    privacy = {"anatomy": "patient", "brain_dice_to_source": 1.0, "tumour_dice_to_source": 0.6,
               "tumour_origin": "patient", "images": "patient"}
    inpainting = {"context": "patient-scan", "region_margin_mm": 8.0, "feather_mm": 3.0,
                  "old_tumour": "case-segmentation", "synthetic_voxels": int((labels >= Label.NCR).sum())}
    case = make_case(folder, provenance=_provenance(labels, privacy=privacy, inpainting=inpainting))
    _write((labels >= Label.NCR).astype(np.uint8), case / "synthetic_mask.nii.gz", OBLIQUE)
    provenance = json.loads((case / "provenance.json").read_text())
    provenance["files"]["synthetic_mask.nii.gz"] = file_sha256(case / "synthetic_mask.nii.gz")
    (case / "provenance.json").write_text(json.dumps(provenance, indent=2))
    return case


def _case_dir(root: Path) -> Path:
    (case,) = [p for p in root.iterdir() if not p.name.startswith(".")]
    return case


def _hidden(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")] if folder.is_dir() else []


def _series(folder: Path) -> list[pydicom.Dataset]:
    return sorted((pydicom.dcmread(p) for p in folder.glob("*.dcm")), key=lambda ds: int(ds.InstanceNumber))


def _flip_k(grid: Grid) -> Grid:
    """The same voxels indexed from the other end of the third axis."""
    d = grid.direction_matrix.copy()
    d[:, 2] *= -1
    origin = grid.index_to_lps(np.array([0.0, 0.0, grid.size[2] - 1.0]))
    return Grid(grid.size, grid.spacing, tuple(origin), tuple(d.ravel()))


def _assert_grid(actual: Grid, expected: Grid) -> None:
    assert actual.size == expected.size
    np.testing.assert_allclose(actual.spacing, expected.spacing, atol=1e-4)
    np.testing.assert_allclose(actual.origin, expected.origin, atol=1e-4)
    np.testing.assert_allclose(actual.direction, expected.direction, atol=1e-4)


# --- shared exports: one case per (geometry, intensity scale), exported as NIfTI and DICOM --------

@pytest.fixture(scope="module", params=[("oblique", 1.0), ("left_handed", 1.0), ("oblique", 60.0)],
                ids=["oblique-int16", "left_handed-int16", "oblique-rescaled"])
def exported(request, tmp_path_factory) -> dict:
    geometry, scale = request.param
    root = tmp_path_factory.mktemp(f"export_{geometry}_{int(scale)}")
    case = make_case(root / "synth_out", GEOMETRIES[geometry], scale)
    nifti = export_cases([case], root / "nifti", "nifti")[0]
    dicom = export_cases([case], root / "dicom", "dicom")[0]
    labels = sitk.ReadImage(str(case / "labels.nii.gz"))
    return {"case": case, "nifti": nifti, "dicom": dicom, "geometry": geometry, "scale": scale,
            "grid": Grid.from_image(labels), "labels": sitk.GetArrayFromImage(labels)}


# --- NIfTI -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("naming", ["brats2021", "brats2023"])
def test_nifti_export_is_a_brats_case(naming, tmp_path, capsys):
    case = make_case(tmp_path / "synth_out")
    rc, out, err = run(["export", case, "--format", "nifti", "--naming", naming, "-o", tmp_path / "exp"], capsys)
    assert rc == 0, err
    folder = _case_dir(tmp_path / "exp")
    cid = folder.name
    assert cid.startswith("NOT-ANONYMOUS-") and len(cid) == 24  # a label map without history: source unknown
    expected = {f"{cid}{NAMINGS[naming][k]}.nii.gz" for k in (*MODALITIES, "seg", "anatomy")}
    assert {p.name for p in folder.iterdir()} == expected | {"provenance.json", "README.txt"}
    assert str(folder) in out

    images, labels = _phantom()
    grid = Grid.from_image(sitk.ReadImage(str(case / "labels.nii.gz")))
    for modality in MODALITIES:
        image = sitk.ReadImage(str(folder / f"{cid}{NAMINGS[naming][modality]}.nii.gz"))
        assert image.GetPixelID() == sitk.sitkInt16  # BraTS stores int16
        _assert_grid(Grid.from_image(image), grid)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), np.round(images[modality]))
    seg = sitk.ReadImage(str(folder / f"{cid}{NAMINGS[naming]['seg']}.nii.gz"))
    assert seg.GetPixelID() == sitk.sitkUInt8
    _assert_grid(Grid.from_image(seg), grid)
    seg_array = sitk.GetArrayFromImage(seg)
    assert set(np.unique(seg_array)) == {0, *CONVENTIONS[naming].from_schema.values()}
    np.testing.assert_array_equal(seg_array, schema_to_tumour(labels, naming))
    anatomy = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{cid}{NAMINGS[naming]['anatomy']}.nii.gz")))
    np.testing.assert_array_equal(anatomy, np.where(labels <= 3, labels, 0))

    # Any BraTS reader takes it unchanged: MedSynth's own detects the naming and maps the labels back.
    brats = read_case(folder)
    assert brats.convention == naming
    np.testing.assert_array_equal(brats.tumour, np.where(labels >= 4, labels, 0))
    for path in folder.glob("*.nii.gz"):
        header = nib.load(str(path)).header
        for key in ("descrip", "aux_file", "intent_name"):
            assert bytes(header[key]).strip(b"\0 ") == b"", (path.name, key)
    readme = (folder / "README.txt").read_text()
    assert "SYNTHETIC" in readme and cid in readme


def test_nifti_keeps_float32_when_int16_would_lose_values(tmp_path):
    case = make_case(tmp_path / "synth_out", scale=60.0)  # values up to ~1e5: beyond int16
    folder = export_cases([case], tmp_path / "exp", "nifti")[0]
    image = sitk.ReadImage(str(folder / f"{folder.name}_t1ce.nii.gz"))
    assert image.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), _phantom(60.0)[0]["t1ce"])


def test_intensity_encoding_choices():
    ints = encode_intensities(np.array([0.0, 1.0, 2.0, 3.0]))
    assert ints.nifti.dtype == np.int16 and ints.slope == 1.0
    small = encode_intensities(np.array([0.0, 0.25, 0.5, 1.0]))  # normalised: rounding would destroy it
    assert small.nifti.dtype == np.float32 and small.slope < 1e-4
    assert np.max(np.abs(small.stored * small.slope - small.nifti)) <= small.slope / 2 + 1e-9
    signed = encode_intensities(np.array([-70000.0, 0.0, 70000.0]))
    assert signed.stored.min() >= -32768 and signed.stored.max() <= 32767 and signed.stored[1] == 0


def test_a_patient_scans_intensities_are_encoded_exactly():
    # A scan stored as int16 scaled by 0.25 (kept so by `synthesize --context`), its peak in the hundreds: the
    # synthetic rule would round it to whole numbers; a patient's values stay as they are, and DICOM gets the
    # scan's own step as its slope, so stored * slope gives each value back.
    quarter = np.array([0.0, 0.25, 301.25, 455.75, -12.5, 8000.0])
    assert encode_intensities(quarter).nifti.dtype == np.int16  # a synthetic case's rule (BraTS-like int16)
    scaled = encode_intensities(quarter, exact=True)
    assert scaled.nifti.dtype == np.float32 and np.array_equal(scaled.nifti, quarter)
    assert scaled.slope == 0.25 and np.array_equal(scaled.stored * scaled.slope, quarter)
    tenth = np.array([0.0, 0.1, 123.4, 456.7], np.float32)  # a step without an exact binary value: float32 precision
    decimal = encode_intensities(tenth, exact=True)
    assert decimal.slope == 0.1 and np.array_equal((decimal.stored * decimal.slope).astype(np.float32), tenth)
    ints = encode_intensities(np.array([0.0, 1200.0, -3.0]), exact=True)
    assert ints.nifti.dtype == np.int16 and ints.slope == 1.0
    rng = np.random.default_rng(0)
    float_scan = rng.random(1000) * 900.0  # no step at all: float32 in NIfTI, DICOM to half a count of its slope
    free = encode_intensities(float_scan, exact=True)
    assert free.nifti.dtype == np.float32 and np.array_equal(free.nifti, float_scan.astype(np.float32))
    assert np.max(np.abs(free.stored * free.slope - float_scan)) <= free.slope / 2 + 1e-9


# --- DICOM: round trip -----------------------------------------------------------------------------


def test_dicom_round_trip_simpleitk_gdcm(exported):
    grid, nifti, dicom = exported["grid"], exported["nifti"], exported["dicom"]
    expected_grid = grid if exported["geometry"] == "oblique" else _flip_k(grid)
    cid = nifti.name
    for modality, folder in (("t1", "T1"), ("t1ce", "T1ce"), ("t2", "T2"), ("flair", "FLAIR")):
        reader = sitk.ImageSeriesReader()
        names = reader.GetGDCMSeriesFileNames(str(dicom / folder))
        assert len(names) == grid.size[2]
        reader.SetFileNames(names)
        image = reader.Execute()
        _assert_grid(Grid.from_image(image), expected_grid)
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(nifti / f"{cid}_{modality}.nii.gz"))).astype(float)
        if exported["geometry"] != "oblique":
            reference = reference[::-1]
        slope = float(pydicom.dcmread(names[0], stop_before_pixels=True).RescaleSlope)
        np.testing.assert_allclose(sitk.GetArrayFromImage(image).astype(float), reference, rtol=0,
                                   atol=slope / 2 + 1e-3 * slope)
        if exported["scale"] == 1.0:
            assert slope == 1.0
            np.testing.assert_array_equal(sitk.GetArrayFromImage(image), reference)


def test_dicom_round_trip_pydicom(exported):
    grid, nifti, dicom = exported["grid"], exported["nifti"], exported["dicom"]
    cid = nifti.name
    direction = grid.direction_matrix
    for modality, folder in (("t1", "T1"), ("t1ce", "T1ce"), ("t2", "T2"), ("flair", "FLAIR")):
        series = _series(dicom / folder)
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(nifti / f"{cid}_{modality}.nii.gz"))).astype(float)
        assert len(series) == grid.size[2]
        for k, ds in enumerate(series):
            assert (ds.Rows, ds.Columns) == (grid.size[1], grid.size[0])
            np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], [grid.spacing[1], grid.spacing[0]],
                                       atol=1e-6)
            np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient],
                                       np.concatenate([direction[:, 0], direction[:, 1]]), atol=1e-6)
            np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient],
                                       grid.index_to_lps(np.array([0.0, 0.0, k])), atol=1e-4)
            assert float(ds.SliceThickness) == pytest.approx(grid.spacing[2])
            assert ds.pixel_array.dtype == np.int16
            slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
            assert intercept == 0.0
            values = ds.pixel_array * slope + intercept
            np.testing.assert_allclose(values, reference[k], rtol=0, atol=slope / 2 + 1e-3 * slope)


def test_dicom_segmentation_round_trip(exported):
    import highdicom as hd

    dicom, labels = exported["dicom"], exported["labels"]
    t1 = _series(dicom / "T1")
    seg = hd.seg.segread(dicom / "SEG" / "seg.dcm")
    assert seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["NCR", "ED", "ET"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == t1[0].SeriesInstanceUID
    assert seg.FrameOfReferenceUID == t1[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == t1[0].StudyInstanceUID
    pixels = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in t1], combine_segments=True)
    expected = np.select([labels == Label.NCR, labels == Label.ED, labels == Label.ET], [1, 2, 3], 0)
    np.testing.assert_array_equal(pixels, expected)
    # Each frame sits exactly where its T1 slice sits.
    by_uid = {ds.SOPInstanceUID: ds for ds in t1}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
                                   [float(v) for v in by_uid[source].ImagePositionPatient], atol=1e-4)
    # The same voxels through pydicom alone: every NCR/ED/ET voxel of the label map, no other.
    counts = [int(np.sum(seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in t1],
                                                            segment_numbers=[n]))) for n in (1, 2, 3)]
    assert counts == [int(np.sum(labels == v)) for v in (Label.NCR, Label.ED, Label.ET)]


@pytest.mark.parametrize("variant", ["no_tumour", "no_enhancing"])
def test_dicom_strictly_valid_and_partial_tumours(variant, tmp_path, monkeypatch):
    """pydicom's strict validation (VR lengths, characters) accepts every file; empty segments export too."""
    from pydicom import config
    import highdicom as hd

    monkeypatch.setattr(config.settings, "writing_validation_mode", config.RAISE)
    monkeypatch.setattr(config.settings, "reading_validation_mode", config.RAISE)
    images, labels = _phantom()
    labels = np.where(labels >= Label.NCR, Label.WM, labels) if variant == "no_tumour" else \
        np.where(labels == Label.ET, Label.ED, labels)
    labels = labels.astype(np.uint8)
    case = make_case(tmp_path / "synth_out", provenance=_provenance(labels))
    _write(labels, case / "labels.nii.gz", OBLIQUE)
    (case / "labels.json").write_text(json.dumps(label_map_record([], labels)))
    _rehash(case)
    dicom = export_cases([case], tmp_path / "exp", "dicom")[0]
    for path in dicom.rglob("*.dcm"):
        pydicom.dcmread(path)
    t1 = _series(dicom / "T1")
    seg = hd.seg.segread(dicom / "SEG" / "seg.dcm")
    pixels = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in t1], combine_segments=True)
    np.testing.assert_array_equal(pixels, np.select([labels == Label.NCR, labels == Label.ED], [1, 2], 0))


# --- DICOM: tags -------------------------------------------------------------------------------


def _all_datasets(root: Path) -> list[tuple[Path, pydicom.Dataset]]:
    return [(p, pydicom.dcmread(p)) for p in sorted(root.rglob("*.dcm"))]


def test_dicom_tags(exported):
    dicom = exported["dicom"]
    cid = dicom.name
    files = _all_datasets(dicom)
    assert {p.parent.name for p, _ in files} == {"T1", "T1ce", "T2", "FLAIR", "SEG"}
    assert (dicom / "provenance.json").is_file() and "SYNTHETIC" in (dicom / "README.txt").read_text()
    studies, frames, series = set(), set(), {}
    for path, ds in files:
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SyntheticData == "YES"
        assert ds[0x0008, 0x001C].value == "YES"
        # A label map without history: its source is unknown, so the case is not anonymous and says so (an
        # anonymous case: test_a_synthetic_case_of_a_patients_anatomy_is_not_called_anonymous).
        assert ds.PatientIdentityRemoved == "NO"
        assert "synthetic" in ds.DeidentificationMethod.lower()
        assert ds.DeidentificationMethod == NOT_ANONYMOUS_DEIDENTIFICATION_METHOD
        assert str(ds.PatientName) == f"NOT-ANONYMOUS^{cid}" and ds.PatientID == cid
        assert cid.startswith("NOT-ANONYMOUS-")  # not SYNTH-: that reads as a shareable synthetic case
        # The images are synthetic; the tumour labels of a map without history are of unrecorded origin.
        assert ("synthetic" in ds.SeriesDescription.lower()) == (path.parent.name != "SEG"), ds.SeriesDescription
        assert "AcquisitionDate" not in ds and "AcquisitionDateTime" not in ds
        assert ds.Manufacturer == "MedSynth"
        (equipment,) = [item for item in ds.ContributingEquipmentSequence  # highdicom adds its own items
                        if item.Manufacturer == "MedSynth" and "SYNTHETIC" in item.ContributionDescription]
        assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"  # processing equipment
        assert equipment.Manufacturer == "MedSynth"
        assert "SYNTHETIC" in equipment.ContributionDescription and MODEL_SHA in equipment.ContributionDescription
        assert MODEL_NAME in equipment.ManufacturerModelName
        studies.add(ds.StudyInstanceUID)
        frames.add(ds.FrameOfReferenceUID)
        series.setdefault(path.parent.name, set()).add(ds.SeriesInstanceUID)
        if path.parent.name != "SEG":
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4" and ds.Modality == "MR"
            assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
            modality = {"T1": "T1", "T1ce": "T1ce", "T2": "T2", "FLAIR": "FLAIR"}[path.parent.name]
            assert ds.SeriesDescription.startswith(modality)
            assert ds.ContentDate == ds.StudyDate and ds.ContentTime
            assert ds.BitsAllocated == 16 and ds.PixelRepresentation == 1
            comments = ds.ImageComments
            assert "SYNTHETIC" in comments and MODEL_NAME in comments and MODEL_SHA in comments
            assert "seed 7" in comments and "translate" in comments
        else:
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and ds.Modality == "SEG"
    assert len(studies) == 1 and len(frames) == 1
    assert all(len(uids) == 1 for uids in series.values()) and len(set.union(*series.values())) == 5
    descriptions = {pydicom.dcmread(next((dicom / f).glob("*.dcm"))).SeriesDescription for f in series}
    assert len(descriptions) == 5


def test_dicom_provenance_is_sanitised_and_summarised(exported):
    provenance = json.loads((exported["dicom"] / "provenance.json").read_text())
    assert provenance["synthetic"] is True and provenance["kind"] == "medsynth-synthetic-case"
    assert provenance["model"] == {"name": MODEL_NAME, "sha256": MODEL_SHA}
    assert provenance["seed"] == 7 and provenance["precision"] == "fp32"
    assert [e["name"] for e in provenance["edits"]] == ["derive_labels", "translate", "insert_tumour"]
    assert "source" not in provenance["edits"][2]["params"]  # names a source case
    assert provenance["export"]["format"] == "dicom"
    assert provenance["export"]["case_id"] == exported["dicom"].name
    _assert_grid(Grid.from_json(provenance["grid"]), exported["grid"])


# --- UIDs --------------------------------------------------------------------------------------


def _instance_uids(root: Path) -> set[str]:
    """Every UID-valued element of every file, except class and transfer-syntax UIDs (constants)."""
    uids: set[str] = set()

    def collect(dataset: pydicom.Dataset) -> None:
        for element in dataset.iterall():
            if element.VR != "UI" or element.keyword.endswith(("ClassUID", "TransferSyntaxUID")):
                continue
            if element.keyword == "CodingSchemeUID":
                continue
            values = element.value if element.VM > 1 else [element.value]
            uids.update(str(v) for v in values if v)

    for path in root.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        collect(ds.file_meta)
        collect(ds)
    return uids


def test_two_exports_share_no_uids(tmp_path):
    case = make_case(tmp_path / "synth_out")
    first = export_cases([case], tmp_path / "a", "dicom")[0]
    second = export_cases([case], tmp_path / "b", "dicom")[0]
    assert first.name == second.name  # the case id is deterministic ...
    uids_a, uids_b = _instance_uids(first), _instance_uids(second)
    assert len(uids_a) > 4 * SHAPE[0] and len(uids_b) == len(uids_a)
    assert uids_a.isdisjoint(uids_b)  # ... every UID is fresh


# --- de-identification -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["nifti", "dicom"])
def test_no_source_identifier_anywhere(fmt, tmp_path, capsys):
    """A case made from a real case whose files carry a name, an MRN and a hospital path."""
    source_dir = tmp_path / "hospital" / "Doe^John_MRN12345"
    _, labels = _phantom()
    provenance = _provenance(labels, patient_name="Doe^John MRN12345",
                             source_path=str(source_dir / "Doe^John_MRN12345_t1.nii.gz"))
    provenance["edits"][1]["params"]["reference"] = str(source_dir / "seg.nii.gz")
    provenance["edits"][1]["params"]["source_tumour_path"] = str(source_dir / "seg.nii.gz")
    provenance["edits"][2]["params"]["source"] = "Doe^John MRN12345"
    provenance["edits"].append({"name": "translate", "params": {"offset_ras_mm": [1, 0, 0]},
                                "schema_version": 1, "note": "from Doe^John MRN12345"})
    provenance["model"]["name"] = "Doe^John MRN12345"
    provenance["software"]["hospital-pacs"] = "MRN12345"
    case = make_case(source_dir / "synth_out", descrip=b"Doe^John MRN12345", provenance=provenance)
    assert b"Doe^John MRN12345" in bytes(nib.load(str(case / "t1.nii.gz")).header["descrip"])

    out = tmp_path / "export"
    rc, _, err = run(["export", case, "--format", fmt, "-o", out], capsys)
    assert rc == 0, err
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 5
    for path in files:
        relative = str(path.relative_to(out)).encode()
        data = path.read_bytes()
        contents = [relative, data] + ([gzip.decompress(data)] if path.name.endswith(".gz") else [])
        for blob in contents:
            for word in IDENTIFIERS:
                assert word not in blob, f"{word!r} found in {path.relative_to(out)}"
    exported_provenance = json.loads((_case_dir(out) / "provenance.json").read_text())
    assert exported_provenance["export"]["removed_fields"] >= 7
    assert exported_provenance["model"]["name"] == "unregistered"
    assert exported_provenance["edits"][1]["params"] == {"offset_ras_mm": [4.0, -2.0, 1.5]}


def test_a_patients_scan_is_not_labelled_synthetic(tmp_path, capsys):
    """An inpainted case is the patient's scan outside one region: the names a viewer or PACS shows (case id,
    patient name, study and series descriptions, de-identification method) and the command's message say so."""
    case = inpainted_case(tmp_path / "inpainted")
    rc, _, err = run(["export", case, "--format", "nifti", "--anonymous", "-o", tmp_path / "anon"], capsys)
    assert rc == 2 and "patient's own scan" in err
    for fmt in ("nifti", "dicom"):
        rc, out, err = run(["export", case, "--format", fmt, "-o", tmp_path / fmt], capsys)
        assert rc == 0, err
        assert "NOT anonymous" in out and "patient" in out and "synthetic case exported" not in out
        exported = _case_dir(tmp_path / fmt)
        assert exported.name.startswith("PATIENT-") and "SYNTH" not in exported.name
        assert all("SYNTH" not in p.name for p in exported.rglob("*"))
        readme = (exported / "README.txt").read_text()
        assert "PARTLY SYNTHETIC DATA OF A REAL PATIENT" in readme and "NOT anonymous" in readme
    for path, ds in _all_datasets(_case_dir(tmp_path / "dicom")):
        assert "SYNTHETIC" not in str(ds.PatientName).upper() and "PATIENT" in str(ds.PatientName)
        assert ds.PatientID.startswith("PATIENT-")
        assert "NOT anonymous" in ds.DeidentificationMethod and len(ds.DeidentificationMethod) <= 64
        assert ds.PatientIdentityRemoved == "NO"  # the pixels are the patient's scan
        assert "patient" in ds.StudyDescription.lower() and len(ds.StudyDescription) <= 64
        if path.parent.name != "SEG":
            assert "patient scan" in ds.SeriesDescription and len(ds.SeriesDescription) <= 64
            assert ds.ImageComments.startswith("PARTLY SYNTHETIC IMAGE of a real patient")

    # A fully synthetic case keeps its synthetic names, and the message says whether it is anonymous.
    rc, out, err = run(["export", make_case(tmp_path / "synth_out"), "--format", "nifti", "-o", tmp_path / "s"],
                       capsys)
    assert rc == 0, err
    assert "synthetic case exported" in out and "NOT anonymous" in out
    assert _case_dir(tmp_path / "s").name.startswith("NOT-ANONYMOUS-")  # its source unknown


def test_an_inpainted_export_says_which_voxels_are_synthetic(tmp_path, capsys):
    """The synthetic-voxel mask travels with the export: a NIfTI file beside the images, and in DICOM Synthetic
    Data = YES only on the slices that hold a re-rendered voxel (the others are the patient's acquired images)."""
    case = inpainted_case(tmp_path / "inpainted")
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "synthetic_mask.nii.gz"))).astype(bool)
    per_slice = mask.any(axis=(1, 2))
    assert per_slice.any() and not per_slice.all()
    rc, _, err = run(["export", case, "--format", "nifti", "-o", tmp_path / "nifti"], capsys)
    assert rc == 0, err
    exported = _case_dir(tmp_path / "nifti")
    written = sitk.ReadImage(str(exported / f"{exported.name}_synthetic_mask.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(written).astype(bool), mask)
    assert Grid.from_image(written) == Grid.from_image(sitk.ReadImage(str(exported / f"{exported.name}_t1.nii.gz")))
    assert "_synthetic_mask.nii.gz" in (exported / "README.txt").read_text()

    rc, _, err = run(["export", case, "--format", "dicom", "-o", tmp_path / "dicom"], capsys)
    assert rc == 0, err
    flags = {}
    for path, ds in _all_datasets(_case_dir(tmp_path / "dicom")):
        if path.parent.name == "SEG":
            assert ds.SyntheticData == "YES"
        else:
            flags.setdefault(path.parent.name, {})[int(ds.InstanceNumber) - 1] = ds.SyntheticData
    assert len(flags) == 4
    for series in flags.values():
        assert series == {k: "YES" if per_slice[k] else "NO" for k in range(len(per_slice))}

    # A wholly synthetic case: every slice is synthetic, and no mask file is written.
    rc, _, err = run(["export", make_case(tmp_path / "synth_out"), "--format", "dicom", "-o", tmp_path / "s"], capsys)
    assert rc == 0, err
    assert {ds.SyntheticData for _, ds in _all_datasets(_case_dir(tmp_path / "s"))} == {"YES"}
    rc, _, err = run(["export", tmp_path / "synth_out", "--format", "nifti", "-o", tmp_path / "sn"], capsys)
    assert rc == 0, err
    assert not list(_case_dir(tmp_path / "sn").glob("*synthetic_mask*"))


def test_sanitise_provenance_whitelist():
    grid = Grid((2, 2, 2), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    raw = _provenance(np.zeros((2, 2, 2), np.uint8), acquisition_date="20190304", patient={"name": "X"})
    raw["edits"].append({"name": "parametric_tumour", "params": {"center_ras_mm": [1.0, 2.0, 3.0], "seed": 3,
                                                                "file": "a.nii.gz", "radii_mm": [5, 5, 5]}})
    raw["edits"].append({"name": "rm -rf /", "params": {"x": 1}})
    raw["edits"][0]["params"]["convention"] = "C:\\data\\Doe.nii"
    raw["edits"][1]["params"]["offset_ras_mm"] = [1.0, "/home/x", 2.0]
    clean, removed = sanitise_provenance(raw, grid)
    assert set(clean) == {"kind", "synthetic", "label_schema_version", "model", "labels_sha256", "edits", "seed",
                          "device", "precision", "grid", "software", "timings_s", "privacy"}
    assert clean["edits"][0]["params"] == {"label_convention": "brats2021",
                                           "anatomy_model": {"beta": 2.0, "iterations": 6,
                                                             "name": "kmeans-gaussian-mrf"}}
    assert clean["edits"][1]["params"] == {}
    assert clean["edits"][3]["params"] == {"center_ras_mm": [1.0, 2.0, 3.0], "seed": 3, "radii_mm": [5, 5, 5]}
    assert clean["edits"][4] == {"name": "unrecognised", "params": {}, "schema_version": 1}
    assert removed == 7  # 2 unknown top-level, source, file, bad edit, convention path, offset with a path
    text = json.dumps(clean)
    for word in ("Doe", "home", "20190304", "a.nii.gz", "BraTS2021_00012", "rm -rf"):
        assert word not in text


# --- case ids, batch, overwrite ------------------------------------------------------------------


def test_case_id_is_generated_not_from_folder_names(tmp_path, capsys):
    a = make_case(tmp_path / "Patient_ZX81" / "out")
    b = make_case(tmp_path / "other" / "renamed_copy")
    id_a = read_synthetic_case(a).case_id
    assert id_a == read_synthetic_case(b).case_id  # content, not the folder, decides
    assert id_a.startswith("NOT-ANONYMOUS-") and "ZX81" not in id_a and "out" not in id_a  # its source unknown
    rc, _, err = run(["export", a, "--format", "dicom", "--case-id", "TRIAL-007", "-o", tmp_path / "exp"], capsys)
    assert rc == 0, err
    ds = pydicom.dcmread(next((tmp_path / "exp" / "TRIAL-007" / "T1").glob("*.dcm")), stop_before_pixels=True)
    assert ds.PatientID == "TRIAL-007" and str(ds.PatientName) == "NOT-ANONYMOUS^TRIAL-007"  # its source unknown


def test_batch_export_with_progress(tmp_path, capsys):
    first = make_case(tmp_path / "c1")
    second = make_case(tmp_path / "c2", scale=1.5)
    rc, out, err = run(["export", first, second, "--format", "nifti", "--naming", "brats2023",
                        "-o", tmp_path / "exp"], capsys)
    assert rc == 0, err
    cases = sorted(p for p in (tmp_path / "exp").iterdir())
    assert len(cases) == 2 and all(p.name.startswith("NOT-ANONYMOUS-") for p in cases)  # their source unknown
    assert len(out.splitlines()) == 2
    for case in cases:
        assert (case / f"{case.name}-t2f.nii.gz").is_file() and (case / f"{case.name}-seg.nii.gz").is_file()
        assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(case / f"{case.name}-seg.nii.gz"))))) \
            == {0, 1, 2, 3}


def test_overwrite(tmp_path, capsys):
    case = make_case(tmp_path / "synth_out")
    argv = ["export", case, "--format", "nifti", "-o", tmp_path / "exp"]
    assert run(argv, capsys)[0] == 0
    folder = _case_dir(tmp_path / "exp")
    (folder / "stale.txt").write_text("old")
    rc, _, err = run(argv, capsys)
    assert rc == 2 and "--overwrite" in err and (folder / "stale.txt").exists()
    rc, _, err = run(argv + ["--overwrite"], capsys)
    assert rc == 0, err
    assert not (folder / "stale.txt").exists() and (folder / f"{folder.name}_t1.nii.gz").is_file()
    assert _hidden(tmp_path / "exp") == []


# --- bad input ---------------------------------------------------------------------------------


def _rehash(case: Path) -> Path:
    """Record the folder's current files as written (a case made that way, not changed afterwards)."""
    provenance = json.loads((case / "provenance.json").read_text())
    provenance["files"] = {name: file_sha256(case / name) for name in OUTPUT_FILES}
    (case / "provenance.json").write_text(json.dumps(provenance))
    return case


def _missing_modality(tmp: Path):
    case = make_case(tmp / "synth_out")
    (case / "t2.nii.gz").unlink()
    return [case], tmp / "exp", "missing modality t2"


def _different_grids(tmp: Path):
    case = make_case(tmp / "synth_out")
    flair = sitk.ReadImage(str(case / "flair.nii.gz"))
    flair.SetOrigin((12.0, -20.0, 5.0))
    sitk.WriteImage(flair, str(case / "flair.nii.gz"), useCompression=True)
    return [_rehash(case)], tmp / "exp", "not on the grid of labels.nii.gz: origin"


def _resized(tmp: Path):
    case = make_case(tmp / "synth_out")
    t1 = sitk.ReadImage(str(case / "t1.nii.gz"))
    sitk.WriteImage(t1[:, :, :-2], str(case / "t1.nii.gz"), useCompression=True)
    return [_rehash(case)], tmp / "exp", "size"


def _target_under_a_file(tmp: Path):
    case = make_case(tmp / "synth_out")
    (tmp / "a_file").write_text("x")
    return [case], tmp / "a_file" / "exp", "not a folder"


def _not_synthetic(tmp: Path):
    case = make_case(tmp / "synth_out")
    (case / "provenance.json").write_text(json.dumps({"kind": "medsynth-demo"}))
    return [case], tmp / "exp", "only synthetic cases can be exported"


def _labels_changed(tmp: Path):
    case = make_case(tmp / "synth_out")
    labels = sitk.ReadImage(str(case / "labels.nii.gz"))
    array = sitk.GetArrayFromImage(labels)
    array[array == Label.ET] = Label.NCR
    edited = sitk.GetImageFromArray(array)
    edited.CopyInformation(labels)
    sitk.WriteImage(edited, str(case / "labels.nii.gz"), useCompression=True)
    (case / "labels.json").write_text(json.dumps(label_map_record([], array)))
    return [_rehash(case)], tmp / "exp", "labels_sha256 differs"


def _scan_from_elsewhere(tmp: Path) -> Path:
    """Another image on the case's grid, standing in for a real patient's T1."""
    scan = sitk.ReadImage(str(make_case(tmp / "hospital" / "Doe_John", scale=1.7) / "t1.nii.gz"))
    path = tmp / "hospital" / "Doe_John_t1.nii.gz"
    sitk.WriteImage(scan, str(path), useCompression=True)
    return path


def _real_t1_copied(tmp: Path):
    case = make_case(tmp / "synth_out")
    shutil.copyfile(_scan_from_elsewhere(tmp), case / "t1.nii.gz")
    return [case], tmp / "exp", "t1.nii.gz: does not match the sha256 recorded in provenance.json"


def _real_t1_linked(tmp: Path):
    case = make_case(tmp / "synth_out")
    (case / "t1.nii.gz").unlink()
    (case / "t1.nii.gz").symlink_to(_scan_from_elsewhere(tmp))
    return [case], tmp / "exp", "t1.nii.gz: is a link"


def _no_checksums(tmp: Path):
    case = make_case(tmp / "synth_out")
    provenance = json.loads((case / "provenance.json").read_text())
    del provenance["files"]
    (case / "provenance.json").write_text(json.dumps(provenance))
    return [case], tmp / "exp", "records no file checksums"


def _batch_one_bad(tmp: Path):
    good = make_case(tmp / "good")
    bad = make_case(tmp / "bad", scale=2.0)
    (bad / "flair.nii.gz").unlink()
    return [good, bad], tmp / "exp", "missing modality flair"


def _other_schema(tmp: Path):
    case = make_case(tmp / "synth_out")
    provenance = json.loads((case / "provenance.json").read_text())
    (case / "provenance.json").write_text(json.dumps(dict(provenance, label_schema_version=99)))
    return [case], tmp / "exp", "schema version 99"


def _bad_case_id(tmp: Path):
    return [make_case(tmp / "synth_out"), "--case-id", "../Doe"], tmp / "exp", "case id"


def _sidecar_missing(tmp: Path):
    case = make_case(tmp / "synth_out")
    (case / "labels.json").unlink()
    return [case], tmp / "exp", "labels.json: missing"


def _synthetic_mask_missing(tmp: Path):
    case = inpainted_case(tmp / "synth_out")
    (case / "synthetic_mask.nii.gz").unlink()
    return [case], tmp / "exp", "synthetic_mask.nii.gz: missing"


BAD = [_missing_modality, _different_grids, _resized, _target_under_a_file, _not_synthetic, _labels_changed,
       _batch_one_bad, _other_schema, _bad_case_id, _real_t1_copied, _real_t1_linked, _no_checksums,
       _sidecar_missing, _synthetic_mask_missing]


@pytest.mark.parametrize("fmt", ["nifti", "dicom"])
@pytest.mark.parametrize("build", BAD, ids=lambda f: f.__name__.strip("_"))
def test_bad_input(build, fmt, tmp_path, capsys):
    inputs, target, words = build(tmp_path)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    rc, out, err = run(["export", *inputs, "--format", fmt, "-o", target], capsys)
    assert rc == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medsynth: error:") and words in lines[0], err
    assert not target.exists()
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written, no temporary folders


def test_non_writable_target(tmp_path, capsys, monkeypatch):
    case = make_case(tmp_path / "synth_out")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked else real_access(p, mode))
    rc, _, err = run(["export", case, "--format", "dicom", "-o", locked / "exp"], capsys)
    assert rc == 2 and err.startswith("medsynth: error:") and "not writable" in err and len(err.splitlines()) == 1
    assert list(locked.iterdir()) == []


def test_existing_target_is_kept_without_overwrite(tmp_path, capsys):
    case = make_case(tmp_path / "synth_out")
    cid = read_synthetic_case(case).case_id
    target = tmp_path / "exp" / cid
    target.mkdir(parents=True)
    (target / "mine.txt").write_text("keep")
    rc, _, err = run(["export", case, "--format", "dicom", "-o", tmp_path / "exp"], capsys)
    assert rc == 2 and "already exists" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert [p.name for p in target.iterdir()] == ["mine.txt"] and _hidden(tmp_path / "exp") == []


def test_naming_only_for_nifti(tmp_path, capsys):
    case = make_case(tmp_path / "synth_out")
    rc, _, err = run(["export", case, "--format", "dicom", "--naming", "brats2023", "-o", tmp_path / "x"], capsys)
    assert rc == 2 and "--naming" in err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("review, expected", [
    # The note is the reviewer's free text (it may name someone): kept in the case folder, never exported.
    ({"rating": 4, "note": "rim too thin", "reviewed_at": "2026-11-26T21:00:00+00:00"},
     {"rating": 4, "reviewed_at": "2026-11-26T21:00:00+00:00"}),
    ({"rating": 5, "note": "ok", "reviewer": "Dr Doe"}, {"rating": 5}),  # unknown key dropped
    ({"rating": 0, "note": "Dr Doe saw it"}, {"rating": 0}),  # 0 = not rated, as the Slicer module stores it
    ({"rating": 9, "note": "out of range"}, None),
    ({"rating": True}, None),
    ("five stars", None),
])
def test_review_is_whitelisted(review, expected):
    """A clinician's review survives the typed record as rating (0-5, 0 = not rated) and time only."""
    from MedSynthLib.export import sanitise_provenance

    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1:3, 1:4, 1:5] = Label.WM
    grid = Grid((6, 5, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    manual = {"name": "manual_segment_edit", "params": {"changed_voxels": 12, "voxel_change": {"ET": 12, "WM": -12}},
              "schema_version": 1}
    clean, removed = sanitise_provenance(_provenance(labels, review=review, edits=[manual]), grid)
    assert clean.get("review") == expected
    assert clean["edits"] == [manual], "Segment Editor strokes are recorded as counts"
    assert "reviewer" not in json.dumps(clean) and "Dr Doe" not in json.dumps(clean)
    assert "note" not in json.dumps(clean)
    if expected is None or set(review) - {"rating", "note", "reviewed_at"}:
        assert removed >= 1


def test_a_missing_case_to_export_is_called_an_input(tmp_path, capsys):
    """The folder export reads is the synthetic case (an input), not an output folder."""
    assert main(["export", str(tmp_path / "nocase"), "--format", "nifti", "-o", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'nocase'}: synthetic case folder not found" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_export_removes_the_staging_folder_a_killed_export_left(tmp_path):
    """kill -9 during an export leaves its hidden staging folder (36 MB of DICOM in one audit); the next export
    into that folder removes it when its process is gone, and leaves a running one's alone."""
    import subprocess
    import sys

    from MedSynthLib.export.package import EXPORT_STAGE
    from MedSynthLib.schema.outputs import STAGE_MARK

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its pid names no process
    root = tmp_path / "export"
    stale = root / f".{EXPORT_STAGE}{STAGE_MARK}{gone.pid}-abc.tmp"
    live = root / f".{EXPORT_STAGE}{STAGE_MARK}{os.getppid()}-def.tmp"  # pytest's parent is running
    for folder in (stale, live):
        (folder / "half").mkdir(parents=True)
    case = make_case(tmp_path / "synth_out")
    exported_case = export_cases([case], root, "nifti")[0]
    assert not stale.exists() and live.is_dir() and exported_case.is_dir()


# --- what an export says a case is: anonymous synthetic, synthetic of a patient's anatomy, a patient's scan -------

TEMPLATE_STEP = {"name": "template_labels", "params": {"template": "ICBM152-2009a-sym"}, "schema_version": 1}
PARAMETRIC_STEP = {"name": "parametric_tumour", "params": {"radii_mm": [5.0, 5.0, 5.0], "seed": 3},
                   "schema_version": 1}


def painted_images(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Float32 images painted from a label map (class means and noise, 0 outside the brain), as a synthesised case's
    are, without a network."""
    rng = np.random.default_rng(0)
    return {modality: np.where(labels > 0, np.maximum(np.asarray(means, np.float32)[labels]
                                                      + rng.normal(0, 20, labels.shape).astype(np.float32), 1.0),
                               0.0).astype(np.float32)
            for modality, means in CLASS_MEANS.items()}


@functools.lru_cache(maxsize=1)
def template_tumours():
    """The shipped template with a parametric tumour drawn over another (the first one's place refilled)."""
    from MedSynthLib.cases.template import template_label_map
    from MedSynthLib.edits import ParametricTumour

    first = ParametricTumour(centre_ras_mm=(28.0, -12.0, 26.0), radii_mm=(12.0, 11.0, 10.0), oedema_mm=6.0, seed=3)
    second = ParametricTumour(centre_ras_mm=(-30.0, -12.0, 26.0), radii_mm=(10.0, 10.0, 9.0), oedema_mm=5.0, seed=4)
    return second(first(template_label_map()))


@functools.lru_cache(maxsize=1)
def _anonymous_case_source() -> Path:
    """One anonymous case per test process, written as ``synthesize`` writes one (a template-sized case takes
    seconds to write; each test copies it)."""
    from types import SimpleNamespace

    from MedSynthLib.schema.provenance import privacy_of
    from MedSynthLib.synthesis.case_folder import case_provenance, write_case_folder

    root = Path(tempfile.mkdtemp(prefix="medsynth-test-anonymous-case-"))
    atexit.register(shutil.rmtree, root, True)
    labelmap = template_tumours()
    model = SimpleNamespace(name=MODEL_NAME, sha256=MODEL_SHA)
    provenance = case_provenance(model, labelmap, privacy_of(labelmap), seed=0, device="cpu", precision="fp32")
    return write_case_folder(labelmap, painted_images(labelmap.array), provenance, root / "synth_out")


def anonymous_case(folder: Path) -> Path:
    """Parametric tumours drawn in the shipped healthy template: what ``export --anonymous`` lets through (its
    voxels are checked against the template, so a phantom on another grid would not do)."""
    return Path(shutil.copytree(_anonymous_case_source(), folder))


def patient_anatomy_case(folder: Path) -> Path:
    """A whole synthetic case from a patient's own label map, its tumour moved 10 mm (the audit's repro:
    ``labels`` of a real case, ``tumour --translate``, ``synthesize``): every image synthetic, the anatomy the
    patient's (brain-mask Dice 1.00 to the source)."""
    _, labels = _phantom()
    privacy = {"anatomy": "patient", "brain_dice_to_source": 1.0, "tumour_dice_to_source": 0.41,
               "tumour_origin": "patient", "images": "synthetic"}
    history = [_provenance(labels)["edits"][0],
               {"name": "translate", "params": {"offset_ras_mm": [10.0, 0.0, 0.0]}, "schema_version": 1}]
    return make_case(folder, provenance=_provenance(labels, privacy=privacy, edits=history), history=history)


def _opening(text: str, length: int = 160) -> str:
    return text[:length]


def test_a_synthetic_case_of_a_patients_anatomy_is_not_called_anonymous(tmp_path, capsys):
    """Audit: DICOM of a whole synthetic case built on a patient's own brain opened 'SYNTHETIC IMAGE, not a real
    patient' with De-identification Method 'no source identifiers' and Patient Identity Removed YES, though its
    anatomy is the patient's; NOT anonymous came only deep in the comments.  Only an anonymous case may say 'not a
    real patient' / 'no source identifiers'; the others say up front that the images are synthetic, the anatomy
    (or tumour) a real patient's, and NOT anonymous."""
    cases = {"patient_anatomy": patient_anatomy_case(tmp_path / "patient_anatomy"),
             "unknown": make_case(tmp_path / "unknown"),  # a label map with no history: its source is unknown
             "anonymous": anonymous_case(tmp_path / "anonymous")}
    assert [read_synthetic_case(c).privacy.anonymous()[0] for c in cases.values()] == [False, False, True]
    for name, case in cases.items():
        anonymous = name == "anonymous"
        for fmt in ("nifti", "dicom"):
            rc, out, err = run(["export", case, "--format", fmt, "-o", tmp_path / f"{name}-{fmt}"], capsys)
            assert rc == 0, err
            assert ("of a real patient's anatomy" in out) == (name == "patient_anatomy"), out  # what it printed
            exported = _case_dir(tmp_path / f"{name}-{fmt}")
            # SYNTH- (synthetic, shareable) only for an anonymous case, as its DICOM patient name SYNTHETIC^.
            assert exported.name.startswith("SYNTH-" if anonymous else "NOT-ANONYMOUS-"), exported.name
            readme = (exported / "README.txt").read_text()
            head = "\n".join(readme.splitlines()[:4])
            assert "SYNTHETIC" in head
            if anonymous:
                assert "not a scan of any person" in head and "NOT anonymous" not in readme
            else:
                assert "NOT anonymous" in head and "not a scan of any person" not in readme, head
                assert "real patient" in head
                if name == "patient_anatomy":
                    assert "anatomy" in head
        for path, ds in _all_datasets(_case_dir(tmp_path / f"{name}-dicom")):
            assert ds.SyntheticData == "YES"
            assert len(ds.DeidentificationMethod) <= 64 and len(ds.StudyDescription) <= 64
            texts = [item.ContributionDescription for item in ds.ContributingEquipmentSequence  # ours, not highdicom's
                     if item.Manufacturer == "MedSynth" and item.get("ManufacturerModelName", "").startswith(
                         "MedSynth model")]
            if path.parent.name != "SEG":
                texts.append(ds.ImageComments)
            assert texts
            if anonymous:
                assert ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethod == DEIDENTIFICATION_METHOD
                assert all(t.startswith("SYNTHETIC IMAGE, not a real patient") for t in texts)
                assert "NOT anonymous" not in ds.StudyDescription
                continue
            # The identity can be read back from the pixel data (the brain outline, a tumour's shape): not removed.
            assert ds.PatientIdentityRemoved == "NO", path
            assert "NOT anonymous" in ds.DeidentificationMethod and "no source identifiers" not in \
                ds.DeidentificationMethod
            assert "NOT anonymous" in ds.StudyDescription
            for text in texts:
                assert "not a real patient" not in text and "no source identifiers" not in text
                assert text.startswith("SYNTHETIC IMAGE") and "NOT anonymous" in _opening(text), text[:200]
                assert "real patient" in _opening(text)
                if name == "patient_anatomy":
                    assert "anatomy" in _opening(text)


@pytest.mark.parametrize("case_id", ["SYNTH-0001", "synth-0001", "SYNTHETIC-7", "Synth_case"])
def test_a_patients_scan_cannot_take_a_synthetic_case_id(case_id, tmp_path, capsys):
    """Audit: ``--case-id SYNTH-0001`` gave an inpainted patient's scan the PatientID of a synthetic case.  The
    SYNTH prefix (the default id of a case whose images are synthetic) is refused for a case carrying a patient's
    images, in one line with nothing written; the default id of such a case is PATIENT-<hash>."""
    case = inpainted_case(tmp_path / "inpainted")
    assert read_synthetic_case(case).case_id.startswith("PATIENT-")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for fmt in ("nifti", "dicom"):
        rc, out, err = run(["export", case, "--format", fmt, "--case-id", case_id, "-o", tmp_path / "exp"], capsys)
        assert rc == 2 and out == "" and "Traceback" not in err
        assert len(err.splitlines()) == 1 and err.startswith("medsynth: error:") and case_id in err, err
        assert str(case) in err and "patient" in err and "SYNTH" in err
        assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    # Another id is the user's to choose; an anonymous synthetic case may take the SYNTH prefix.
    rc, _, err = run(["export", case, "--format", "nifti", "--case-id", "TRIAL-7", "-o", tmp_path / "exp"], capsys)
    assert rc == 0 and (tmp_path / "exp" / "TRIAL-7").is_dir(), err
    rc, _, err = run(["export", anonymous_case(tmp_path / "synth_out"), "--format", "nifti", "--case-id", case_id,
                      "-o", tmp_path / "exp"], capsys)
    assert rc == 0 and (tmp_path / "exp" / case_id).is_dir(), err


@pytest.mark.parametrize("build", [patient_anatomy_case, make_case], ids=["patient_anatomy", "unknown_source"])
def test_a_case_that_is_not_anonymous_cannot_take_a_synthetic_case_id(build, tmp_path, capsys):
    """Audit: a whole synthetic case that is not anonymous (a patient's anatomy or tumour, or a source not
    recorded) got the default id SYNTH-<hash>, its DICOM PatientID: next to the patient name NOT-ANONYMOUS^ it read
    as a synthetic case free to share.  Its default id is NOT-ANONYMOUS-<hash>, and a SYNTH id given for it is
    refused in one line, nothing written."""
    case = build(tmp_path / "case")
    default = read_synthetic_case(case).case_id
    assert default.startswith("NOT-ANONYMOUS-") and "SYNTH" not in default.upper()
    exported = export_cases([case], tmp_path / "dicom", "dicom")[0]
    for path, ds in _all_datasets(exported):
        assert ds.PatientID == default and str(ds.PatientName) == f"NOT-ANONYMOUS^{default}", path
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    rc, out, err = run(["export", case, "--format", "dicom", "--case-id", "SYNTH-0001", "-o", tmp_path / "e"], capsys)
    assert rc == 2 and out == "" and "Traceback" not in err
    assert len(err.splitlines()) == 1 and "SYNTH-0001" in err and "not anonymous" in err and str(case) in err, err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def _output_is_the_case(tmp: Path):
    case = make_case(tmp / "demo1")
    return [case], case, [], "is the input case folder"


def _output_inside_the_case(tmp: Path):
    case = make_case(tmp / "demo1")
    return [case], case / "sub", [], "lies inside the input case folder"


def _output_deep_inside_the_case(tmp: Path):
    case = make_case(tmp / "demo1")
    return [case], case / "a" / "b", ["--overwrite"], "lies inside the input case folder"


def _output_a_link_to_the_case(tmp: Path):
    case = make_case(tmp / "demo1")
    (tmp / "link").symlink_to(case, target_is_directory=True)
    return [case], tmp / "link", ["--overwrite"], "is the input case folder"


def _output_relative_inside_the_case(tmp: Path):
    case = make_case(tmp / "demo1")
    return [case], case / ".." / "demo1" / "sub", [], "lies inside the input case folder"


def _output_inside_the_second_case(tmp: Path):
    first, second = make_case(tmp / "c1"), make_case(tmp / "c2", scale=1.5)
    return [first, second], second / "exp", [], "lies inside the input case folder"


def _target_is_the_case(tmp: Path):
    """The output folder holds the input, and the case id names it: --overwrite would replace the input."""
    case = make_case(tmp / "demo1")
    return [case], tmp, ["--case-id", "demo1", "--overwrite"], "is also an input"


@pytest.mark.parametrize("build", [_output_is_the_case, _output_inside_the_case, _output_deep_inside_the_case,
                                   _output_a_link_to_the_case, _output_relative_inside_the_case,
                                   _output_inside_the_second_case, _target_is_the_case],
                         ids=lambda f: f.__name__.strip("_"))
def test_an_export_is_never_written_into_its_input_case_folder(build, tmp_path, capsys):
    """Audit: ``export demo1 -o demo1`` and ``-o demo1/sub`` wrote the export into the input case folder.  An
    export folder that is, or lies inside, an input case folder (links and '..' resolved), or a case folder of the
    export that is an input, is refused in one line, exit 2, nothing written (with --overwrite too)."""
    inputs, output, extra, words = build(tmp_path)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    rc, out, err = run(["export", *inputs, "--format", "nifti", *extra, "-o", output], capsys)
    assert rc == 2 and out == "" and "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("medsynth: error:") and words in err, err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_an_export_beside_its_input_case_is_written(tmp_path, capsys):
    """An export folder that holds the input case (``export synth_out -o .``) writes the export beside it."""
    case = make_case(tmp_path / "synth_out")
    before = sorted(p.name for p in case.iterdir())
    rc, out, err = run(["export", case, "--format", "nifti", "-o", tmp_path], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["synth_out", read_synthetic_case(case).case_id])
    assert sorted(p.name for p in case.iterdir()) == before


def test_an_inpainted_cases_local_only_hashes_are_removed_and_counted(tmp_path, capsys):
    """The inpainting record's hashes of the patient's case and of the map before the edit are local only: the
    export left them out without counting them (removed_fields 0 for a real export), as the edits' are counted."""
    case = inpainted_case(tmp_path / "inpainted")
    provenance = json.loads((case / "provenance.json").read_text())
    provenance["inpainting"].update(context_sha256="a" * 64, old_labels_sha256="b" * 64, old_tumour="old-labels")
    (case / "provenance.json").write_text(json.dumps(provenance, indent=2))
    plain = inpainted_case(tmp_path / "plain")
    counts = {}
    for name, folder in (("with", case), ("without", plain)):
        rc, _, err = run(["export", folder, "--format", "nifti", "-o", tmp_path / f"out-{name}"], capsys)
        assert rc == 0, err
        exported = json.loads((_case_dir(tmp_path / f"out-{name}") / "provenance.json").read_text())
        assert "context_sha256" not in exported["inpainting"] and "old_labels_sha256" not in exported["inpainting"]
        counts[name] = exported["export"]["removed_fields"]
    assert counts["with"] == counts["without"] + 2, counts


# --- what the DICOM says of the tumour labels and of the patient -------------------------------------------------

SEGMENTATION_STEP = {"name": "tumour_from_segmentation", "params": {"label_convention": "brats2021"},
                     "schema_version": 1}
MOVE_STEP = {"name": "translate", "params": {"offset_ras_mm": [4.0, 0.0, 0.0]}, "schema_version": 1}


def template_case(folder: Path, history: list, origin: str) -> Path:
    """A whole synthetic case on the healthy template whose tumour came from ``history`` (origin ``origin``)."""
    _, labels = _phantom()
    privacy = {"anatomy": "template", "brain_dice_to_source": None, "tumour_dice_to_source": None,
               "tumour_origin": origin, "images": "synthetic"}
    return make_case(folder, provenance=_provenance(labels, privacy=privacy, edits=history), history=history)


SEGMENT_CASES = {
    "parametric": lambda folder: anonymous_case(folder),
    "patient_moved": lambda folder: patient_anatomy_case(folder),
    "slicer_segmentation": lambda folder: template_case(folder, [TEMPLATE_STEP, SEGMENTATION_STEP], "segmentation"),
    "slicer_segmentation_moved": lambda folder: template_case(
        folder, [TEMPLATE_STEP, SEGMENTATION_STEP, MOVE_STEP], "segmentation"),
    "mixed": lambda folder: template_case(
        folder, [TEMPLATE_STEP, SEGMENTATION_STEP, {**PARAMETRIC_STEP, "params": {**PARAMETRIC_STEP["params"],
                                                                                  "keep_existing": True}}], "mixed"),
    "inserted": lambda folder: template_case(
        folder, [TEMPLATE_STEP, {"name": "insert_tumour", "params": {"centre_ras_mm": [0.0, 0.0, 0.0]},
                                 "schema_version": 1}], "inserted"),
    "unknown": lambda folder: make_case(folder),  # a label map without history
}


@pytest.mark.parametrize("kind", list(SEGMENT_CASES))
def test_dicom_segments_say_where_the_tumour_came_from(kind, tmp_path):
    """Audit: every DICOM SEG segment read "(synthetic)", also when the tumour is a patient's own segmentation
    that MedSynth moved, or one loaded in Slicer.  Synthetic (and AUTOMATIC) only when MedSynth drew the tumour;
    otherwise the segments, content and series descriptions say where it came from, and whether MedSynth edited
    it, and the algorithm type is SEMIAUTOMATIC (a segmentation someone made, placed or edited by MedSynth)."""
    case = SEGMENT_CASES[kind](tmp_path / "case")
    seg = pydicom.dcmread(export_cases([case], tmp_path / "exp", "dicom")[0] / "SEG" / "seg.dcm")
    descriptions = [item.SegmentDescription for item in seg.SegmentSequence]
    texts = [*descriptions, seg.ContentDescription, seg.SeriesDescription]
    assert len(seg.ContentDescription) <= 64 and len(seg.SeriesDescription) <= 64
    drawn = kind == "parametric"
    for text in texts:
        assert ("synthetic" in text.lower()) == drawn, text
    assert {item.SegmentAlgorithmType for item in seg.SegmentSequence} == {"AUTOMATIC" if drawn else "SEMIAUTOMATIC"}
    # The algorithm family (CID 7162): MedSynth's network paints the images, never these labels, so no segment is
    # "Artificial Intelligence" (123110).  A parametric tumour is shaped by morphological operations (123104: a
    # noisy ellipsoid, its rim and oedema grown by distance); a tumour someone segmented (a patient's expert
    # segmentation, a map's or a Slicer segment) is manual processing (123109) that MedSynth at most placed.
    families = {(code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning)
                for item in seg.SegmentSequence
                for algorithm in item.SegmentationAlgorithmIdentificationSequence
                for code in algorithm.AlgorithmFamilyCodeSequence}
    assert families == ({("123104", "DCM", "Morphological Operations")} if drawn
                        else {("123109", "DCM", "Manual Processing")}), families
    assert [d.split(" (")[0].split(",")[0] for d in descriptions] == [
        "Necrotic / non-enhancing tumour core", "Peritumoural oedema", "Enhancing tumour"]
    edited = kind in ("patient_moved", "slicer_segmentation_moved")
    for text in texts:
        assert ("edited by MedSynth" in text) == edited, text
    if kind == "patient_moved":
        assert all("patient's" in text for text in texts), texts
    if kind.startswith("slicer_segmentation"):
        assert all("Slicer" in text for text in texts), texts
    if kind == "mixed":
        assert all("mixed" in text for text in texts), texts
    if kind == "unknown":
        assert all("origin" in text for text in texts), texts
    if kind == "inserted":
        assert all("another" in text and "placed by MedSynth" in text for text in texts), texts
    if kind != "parametric":
        assert all("patient" in text for text in descriptions), descriptions  # may be a patient's


def test_dicom_patient_name_says_not_anonymous(tmp_path):
    """Audit: a whole synthetic case whose anatomy or tumour is a patient's was named SYNTHETIC^<case id>; in a
    PACS worklist that reads as a shareable, anonymous case, though its study description and De-identification
    Method say NOT anonymous.  Only an anonymous case is SYNTHETIC^; the others NOT-ANONYMOUS^ (the images being
    synthetic stays in Synthetic Data, the descriptions and the SYNTH- case id), the README says which."""
    cases = {"anonymous": anonymous_case(tmp_path / "anonymous"),
             "patient_anatomy": patient_anatomy_case(tmp_path / "patient_anatomy"),
             "slicer_segmentation": SEGMENT_CASES["slicer_segmentation"](tmp_path / "slicer"),
             "unknown": make_case(tmp_path / "unknown")}
    for name, case in cases.items():
        exported_case = export_cases([case], tmp_path / f"exp-{name}", "dicom")[0]
        cid = exported_case.name
        family = "SYNTHETIC" if name == "anonymous" else "NOT-ANONYMOUS"
        for path, ds in _all_datasets(exported_case):
            assert str(ds.PatientName) == f"{family}^{cid}", path
            assert ds.SyntheticData == "YES"
        assert f"Patient name {family}^<case id>" in (exported_case / "README.txt").read_text()
