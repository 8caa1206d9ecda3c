"""Tests of the label schema, the case readers of every convention, anatomy and templates.

Synthetic cases are written with :func:`conftest.phantom` in each on-disk
convention on a non-trivial oblique LPS grid; the real BraTS 2021 cases are read
once per session and their label maps derived once and shared.
"""

from __future__ import annotations

import re

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import phantom, write_volume
from MedSynthLib.cases.anatomy import derive_label_map, tissue_statistics
from MedSynthLib.cases.readers import detect_convention, read_case
from MedSynthLib.cases.template import template_label_map, template_t1
from MedSynthLib.schema.errors import InputError
from MedSynthLib.schema.grid import Grid
from MedSynthLib.schema.labelmap import read_label_map, write_label_map
from MedSynthLib.schema.labels import (
                                       CONVENTIONS,
                                       Label,
                                       LabelValueError,
                                       check_label_map,
                                       detect_tumour_convention,
                                       schema_to_tumour,
                                       tumour_to_schema,
                                       )
from MedSynthLib.synthesis.normalize import (HealthyTissueZScore, IntensityNormalizer, mean_normalizer,
                                             normalizer_from_json)

# --- label conventions -----------------------------------------------------------------------

#: (convention, dataset value, schema label) as documented in each challenge's release notes.
MAPPINGS = [
    ("brats2021", 1, Label.NCR), ("brats2021", 2, Label.ED), ("brats2021", 4, Label.ET),
    ("brats2023", 1, Label.NCR), ("brats2023", 2, Label.ED), ("brats2023", 3, Label.ET),
    ("msd", 1, Label.ED), ("msd", 2, Label.NCR), ("msd", 3, Label.ET),
    ("brats2015", 1, Label.NCR), ("brats2015", 2, Label.ED), ("brats2015", 3, Label.NCR),
    ("brats2015", 4, Label.ET),
]

#: (convention, dataset value, value it exports as after a round trip through the schema).
ROUND_TRIPS = [(c, v, v) for c, v, _ in MAPPINGS if not (c == "brats2015" and v == 3)] + [
    ("brats2015", 3, 1),  # NET folds into NCR and exports as necrosis
]

#: Values each convention does not define.
OUTSIDE = [
    ("brats2021", 3), ("brats2021", 5), ("brats2021", 255),
    ("brats2023", 4), ("brats2023", 6),
    ("msd", 4), ("msd", 7),
    ("brats2015", 5), ("brats2015", 9),
]


@pytest.mark.parametrize("convention, value, label", MAPPINGS)
def test_tumour_to_schema_maps_each_value(convention, value, label):
    """Every dataset value maps to its documented schema label; background stays 0."""
    seg = np.array([[[0, value], [value, 0]]], dtype=np.uint8)
    out = tumour_to_schema(seg, convention)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.array([[[0, label], [label, 0]]], dtype=np.uint8))


@pytest.mark.parametrize("convention", sorted(CONVENTIONS))
def test_conventions_cover_the_table(convention):
    """The table above lists every value each convention defines, nothing more."""
    listed = {v for c, v, _ in MAPPINGS if c == convention}
    assert CONVENTIONS[convention].allowed_values == frozenset(listed | {0})


@pytest.mark.parametrize("convention, value, exported", ROUND_TRIPS)
def test_schema_to_tumour_round_trip(convention, value, exported):
    """Dataset -> schema -> dataset returns the value (brats2015 NET 3 exports as 1)."""
    seg = np.full((2, 2, 2), value, dtype=np.uint8)
    seg[0, 0, 0] = 0
    back = schema_to_tumour(tumour_to_schema(seg, convention), convention)
    expected = np.full((2, 2, 2), exported, dtype=np.uint8)
    expected[0, 0, 0] = 0
    np.testing.assert_array_equal(back, expected)


@pytest.mark.parametrize("convention", sorted(CONVENTIONS))
def test_schema_to_tumour_drops_anatomy(convention):
    """Anatomy labels export as background; tumour labels survive a schema round trip."""
    labels = np.arange(7, dtype=np.uint8).reshape(7, 1, 1)
    exported = schema_to_tumour(labels, convention)
    assert exported[:4].ravel().tolist() == [0, 0, 0, 0]
    np.testing.assert_array_equal(tumour_to_schema(exported, convention)[4:], labels[4:])


@pytest.mark.parametrize("convention, value", OUTSIDE)
def test_values_outside_convention_raise(convention, value):
    """A value the convention does not define is refused, and named in the message."""
    seg = np.zeros((3, 3, 3), dtype=np.int32)
    seg[1, 1, 1] = value
    with pytest.raises(LabelValueError, match=rf"\[{value}\]"):
        tumour_to_schema(seg, convention)


@pytest.mark.parametrize("value", [1.5, 2.0000002, -0.25])
@pytest.mark.parametrize("reader", [lambda seg: tumour_to_schema(seg, "brats2021"), detect_tumour_convention,
                                    check_label_map])
def test_non_integer_segmentation_values_named_as_such(reader, value):
    """A segmentation resampled with linear interpolation holds fractions: the message names the fraction.

    It used to truncate 1.5 to 1 and report "label values [1] are not defined ... (allowed [0, 1, 2, 4])",
    a line that contradicts itself, or to read the fractions as whole labels when detecting the convention.
    """
    seg = np.zeros((3, 3, 3), dtype=np.float32)
    seg[0, 0, 0], seg[1, 1, 1], seg[2, 2, 2] = 1.0, 2.0, np.float32(value)
    with pytest.raises(LabelValueError, match="non-integer") as raised:
        reader(seg)
    # Shown as stored, never rounded to a whole number: 2.0000002 read as "2" named a valid label non-integer.
    shown = re.search(r"non-integer label values? \(([^)]*)\)", str(raised.value)).group(1)
    assert shown == np.format_float_positional(np.float32(value), trim="-"), str(raised.value)


def test_schema_to_tumour_rejects_non_schema_values():
    """A label map with a value above 6 cannot be exported."""
    with pytest.raises(LabelValueError, match=r"\[7\]"):
        schema_to_tumour(np.array([[[0, 7]]], dtype=np.uint8), "brats2021")


# --- synthetic cases in every convention ------------------------------------------------------

_ANGLE = np.deg2rad(20.0)
_ROT_Z = np.array([[np.cos(_ANGLE), -np.sin(_ANGLE), 0.0], [np.sin(_ANGLE), np.cos(_ANGLE), 0.0], [0, 0, 1.0]])
#: An oblique LPS-flipped direction (20 degrees about z after the usual NIfTI RAS flip).
OBLIQUE_LPS = tuple(float(v) for v in (_ROT_Z @ np.diag([-1.0, -1.0, 1.0])).ravel())
GEOMETRY = dict(spacing=(0.9, 1.1, 1.3), origin=(10.0, -20.0, 5.0), direction=OBLIQUE_LPS)

IMAGES, SEG21 = phantom()
#: The schema labels every convention's case must come back with.
EXPECTED_TUMOUR = tumour_to_schema(SEG21, "brats2021")
#: Half of the NCR voxels are written as BRATS 2015 'non-enhancing' (3).
_NET = (SEG21 == 1) & (np.indices(SEG21.shape)[2] % 2 == 0)


def _write_separate(folder: Path, names: dict[str, str], seg: np.ndarray, seg_name: str) -> Path:
    for modality, name in names.items():
        write_volume(IMAGES[modality], folder / name, **GEOMETRY)
    write_volume(seg, folder / seg_name, **GEOMETRY)
    return folder


def _write_msd(folder: Path, image_name: str, label_path: Path) -> Path:
    channels = []
    for modality in ("flair", "t1", "t1ce", "t2"):
        image = sitk.GetImageFromArray(IMAGES[modality].astype(np.float32))
        image.SetSpacing(GEOMETRY["spacing"])
        image.SetOrigin(GEOMETRY["origin"])
        image.SetDirection(OBLIQUE_LPS)
        channels.append(image)
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.JoinSeries(channels), str(folder / image_name), useCompression=True)
    msd = np.select([SEG21 == 2, SEG21 == 1, SEG21 == 4], [1, 2, 3], 0).astype(np.uint8)
    write_volume(msd, label_path, **GEOMETRY)
    return folder / image_name


def _build_brats2021(root: Path) -> tuple[Path, Path]:
    d = _write_separate(root / "Case21", {m: f"X_{m}.nii.gz" for m in IMAGES}, SEG21, "X_seg.nii.gz")
    return d, d / "X_t1.nii.gz"


def _build_brats2023(root: Path) -> tuple[Path, Path]:
    keys = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}
    seg = np.where(SEG21 == 4, 3, SEG21).astype(np.uint8)
    d = _write_separate(root / "Case23", {m: f"X-{k}.nii.gz" for m, k in keys.items()}, seg, "X-seg.nii.gz")
    return d, d / "X-t1n.nii.gz"


def _build_msd_file(root: Path) -> tuple[Path, Path]:
    task = root / "Task01"
    image = _write_msd(task / "imagesTr", "BRATS_001.nii.gz", task / "labelsTr" / "BRATS_001.nii.gz")
    return image, image


def _build_msd_folder(root: Path) -> tuple[Path, Path]:
    folder = root / "MsdFolder"
    image = _write_msd(folder, "BRATS_002.nii.gz", folder / "BRATS_002_label.nii.gz")
    return folder, image


def _build_brats2015(root: Path) -> tuple[Path, Path]:
    folder = root / "Case15"
    keys = {"t1": "MR_T1", "t1ce": "MR_T1c", "t2": "MR_T2", "flair": "MR_Flair"}
    for n, (modality, key) in enumerate(keys.items()):
        name = f"VSD.Brain.XX.O.{key}.{54510 + n}"
        write_volume(IMAGES[modality], folder / name / f"{name}.mha", **GEOMETRY)
    seg = np.where(_NET, 3, SEG21).astype(np.uint8)
    name = "VSD.Brain_3more.XX.O.OT.5"
    write_volume(seg, folder / name / f"{name}.mha", **GEOMETRY)
    return folder, folder / "VSD.Brain.XX.O.MR_T1.54510" / "VSD.Brain.XX.O.MR_T1.54510.mha"


#: (id, builder, expected convention)
SYNTHETIC = [
    ("brats2021", _build_brats2021, "brats2021"),
    ("brats2023", _build_brats2023, "brats2023"),
    ("msd_file", _build_msd_file, "msd"),
    ("msd_folder", _build_msd_folder, "msd"),
    ("brats2015", _build_brats2015, "brats2015"),
]


@pytest.fixture(scope="module")
def synthetic_cases(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Every convention written once: id -> (case path, the file holding the T1)."""
    root = tmp_path_factory.mktemp("conventions")
    return {case_id: builder(root) for case_id, builder, _ in SYNTHETIC}


def _file_grid(path: Path) -> Grid:
    """The grid stored in a file, as plain SimpleITK reads it (first channel of a 4D image)."""
    image = sitk.ReadImage(str(path))
    if image.GetDimension() == 4:
        image = image[:, :, :, 0]
    return Grid.from_image(image)


@pytest.mark.parametrize("case_id, expected", [(c, e) for c, _, e in SYNTHETIC])
def test_detect_convention(synthetic_cases, case_id, expected):
    """Each on-disk layout is recognised from its file names alone."""
    assert detect_convention(synthetic_cases[case_id][0]) == expected


@pytest.mark.parametrize("case_id, expected", [(c, e) for c, _, e in SYNTHETIC])
def test_read_case_tumour_and_grid(synthetic_cases, case_id, expected):
    """Tumour voxels equal the schema labels and the grid equals the written one exactly."""
    path, t1_file = synthetic_cases[case_id]
    case = read_case(path)
    assert case.convention == expected
    assert case.label_convention == expected
    np.testing.assert_array_equal(case.tumour, EXPECTED_TUMOUR)
    assert case.grid == _file_grid(t1_file)
    assert case.grid == _file_grid(case.files["seg"])
    # ... and the stored grid is the geometry we asked for (NIfTI keeps float32 precision).
    assert case.grid.size == (44, 48, 40)
    np.testing.assert_allclose(case.grid.spacing, GEOMETRY["spacing"], rtol=1e-6)
    np.testing.assert_allclose(case.grid.origin, GEOMETRY["origin"], atol=1e-5)
    np.testing.assert_allclose(case.grid.direction, OBLIQUE_LPS, atol=1e-6)
    for modality, array in IMAGES.items():  # channel order of MSD and file matching of the others
        np.testing.assert_array_equal(case.images[modality], array.astype(np.float32), err_msg=modality)


def test_brats2015_net_folds_into_ncr(synthetic_cases):
    """BRATS 2015 necrosis (1) and non-enhancing (3) both become NCR."""
    case = read_case(synthetic_cases["brats2015"][0])
    assert _NET.any() and ((SEG21 == 1) & ~_NET).any()
    assert np.all(case.tumour[_NET] == Label.NCR)
    assert np.all(case.tumour[(SEG21 == 1) & ~_NET] == Label.NCR)


def test_msd_image_without_labels_reads_without_tumour(tmp_path, synthetic_cases):
    """An MSD imagesTr file with no labelsTr partner is a case without segmentation."""
    image = tmp_path / "imagesTr" / "BRATS_009.nii.gz"
    image.parent.mkdir()
    shutil.copy(synthetic_cases["msd_file"][0], image)
    case = read_case(image)
    assert case.tumour is None and "seg" not in case.files
    with pytest.raises(InputError, match="no tumour segmentation"):
        read_case(image, require_segmentation=True)


# --- explicit overrides ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def brats2021_names_2023_labels(tmp_path_factory) -> Path:
    """BraTS 2021 file names holding a BraTS 2023 segmentation (ET = 3)."""
    folder = tmp_path_factory.mktemp("override") / "Mixed"
    seg = np.where(SEG21 == 4, 3, SEG21).astype(np.uint8)
    return _write_separate(folder, {m: f"X_{m}.nii.gz" for m in IMAGES}, seg, "X_seg.nii.gz")


def test_wrong_label_convention_is_refused(brats2021_names_2023_labels):
    """Read with the naming's own labels, the ET=3 segmentation is refused, naming the seg file."""
    with pytest.raises(InputError) as info:
        read_case(brats2021_names_2023_labels)
    assert info.value.path == str(brats2021_names_2023_labels / "X_seg.nii.gz")
    assert "[3]" in info.value.problem and "--label-convention" in info.value.problem


def test_label_convention_override(brats2021_names_2023_labels):
    """``label_convention='brats2023'`` reads ET=3 as ET on BraTS 2021 names."""
    case = read_case(brats2021_names_2023_labels, label_convention="brats2023")
    assert (case.convention, case.label_convention) == ("brats2021", "brats2023")
    np.testing.assert_array_equal(case.tumour, EXPECTED_TUMOUR)


def test_label_convention_override_cli(brats2021_names_2023_labels, capsys):
    """``medsynth info --label-convention brats2023`` counts the tumour classes."""
    import json

    from MedSynthLib.cli import main

    assert main(["info", str(brats2021_names_2023_labels), "--label-convention", "brats2023", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["label_convention"] == "brats2023"
    assert info["tumour_voxels"] == {name: int((EXPECTED_TUMOUR == label).sum())
                                     for name, label in (("NCR", 4), ("ED", 5), ("ET", 6))}


def test_naming_convention_override(tmp_path):
    """A folder fitting two namings is ambiguous until ``convention`` picks one."""
    folder = _write_separate(tmp_path / "Both", {m: f"A_{m}.nii.gz" for m in IMAGES}, SEG21, "A_seg.nii.gz")
    keys = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}
    seg23 = np.where(SEG21 == 4, 3, SEG21).astype(np.uint8)
    _write_separate(folder, {m: f"B-{k}.nii.gz" for m, k in keys.items()}, seg23, "B-seg.nii.gz")
    with pytest.raises(InputError, match="ambiguous"):
        detect_convention(folder)
    for convention, prefix in (("brats2021", "A_"), ("brats2023", "B-")):
        case = read_case(folder, convention=convention)
        assert case.convention == convention
        assert all(p.name.startswith(prefix) for p in case.files.values())
        np.testing.assert_array_equal(case.tumour, EXPECTED_TUMOUR)


# --- geometry mismatch --------------------------------------------------------------------------

_IDENTITY = (1, 0, 0, 0, 1, 0, 0, 0, 1)
#: (id, geometry of the T2, word naming the difference)
MISMATCHES = [
    ("origin", dict(spacing=(0.9, 1.1, 1.3), origin=(0.9, 0.0, 0.0), direction=_IDENTITY), "origin"),
    ("spacing", dict(spacing=(1.0, 1.1, 1.3), origin=(0.0, 0.0, 0.0), direction=_IDENTITY), "spacing"),
    ("direction", dict(spacing=(0.9, 1.1, 1.3), origin=(0.0, 0.0, 0.0), direction=OBLIQUE_LPS), "direction"),
]


def _mismatched_case(folder: Path, t2_geometry: dict) -> Path:
    base = dict(spacing=(0.9, 1.1, 1.3), origin=(0.0, 0.0, 0.0), direction=_IDENTITY)
    for modality, array in IMAGES.items():
        write_volume(array, folder / f"X_{modality}.nii.gz", **(t2_geometry if modality == "t2" else base))
    write_volume(SEG21, folder / "X_seg.nii.gz", **base)
    return folder


@pytest.mark.parametrize("kind, geometry, word", MISMATCHES, ids=[m[0] for m in MISMATCHES])
def test_geometry_mismatch_is_refused(tmp_path, kind, geometry, word):
    """A T2 on another grid is refused, naming the T2 file and what differs."""
    folder = _mismatched_case(tmp_path / "Geo", geometry)
    with pytest.raises(InputError) as info:
        read_case(folder)
    assert info.value.path == str(folder / "X_t2.nii.gz")
    assert word in info.value.problem and "X_t1.nii.gz" in info.value.problem
    assert "--resample" in info.value.problem


@pytest.mark.parametrize("kind, geometry, word", MISMATCHES, ids=[m[0] for m in MISMATCHES])
def test_geometry_mismatch_resampled(tmp_path, kind, geometry, word):
    """With ``resample=True`` the case reads on the T1's grid."""
    folder = _mismatched_case(tmp_path / "Geo", geometry)
    case = read_case(folder, resample=True)
    assert case.grid == _file_grid(folder / "X_t1.nii.gz")
    assert case.images["t2"].shape == case.grid.shape
    np.testing.assert_array_equal(case.images["t1"], IMAGES["t1"].astype(np.float32))
    np.testing.assert_array_equal(case.tumour, EXPECTED_TUMOUR)
    if kind == "origin":  # shifted one voxel along i: resampled[..., i] == t2[..., i - 1]
        np.testing.assert_allclose(case.images["t2"][..., 1:], IMAGES["t2"][..., :-1], atol=0.5)
        assert np.all(case.images["t2"][..., 0] == 0)


# --- real BraTS 2021 cases ------------------------------------------------------------------

#: README voxel counts of labels {1, 2, 4} -> schema NCR, ED, ET.
README_COUNTS = {
    "00000": (11738, 12836, 32731),
    "00002": (11248, 155695, 23651),
    "00006": (25506, 85957, 26448),
    "00014": (2, 35799, 2557),
    "00019": (1605, 131017, 10375),
}


@pytest.fixture(scope="session")
def real_cases(brats_derived):
    """Every real case, read once: id -> Case."""
    return {name.split("_")[-1]: case for name, (case, _, _) in brats_derived.items()}


@pytest.fixture(scope="session")
def real_labels(brats_derived):
    """Label maps derived once per real case (the session's): id -> (LabelMap, seconds)."""
    return {name.split("_")[-1]: (labelmap, seconds) for name, (_, labelmap, seconds) in brats_derived.items()}


@pytest.mark.realdata
def test_real_cases_present(real_cases):
    """All five README cases are there, read as BraTS 2021 on their 240x240x155 1 mm grid."""
    assert sorted(real_cases) == sorted(README_COUNTS)
    for case in real_cases.values():
        assert (case.convention, case.label_convention) == ("brats2021", "brats2021")
        assert case.grid.size == (240, 240, 155)
        assert case.grid.spacing == (1.0, 1.0, 1.0)


@pytest.mark.realdata
@pytest.mark.parametrize("case_id", sorted(README_COUNTS))
def test_real_tumour_counts(real_cases, case_id):
    """NCR/ED/ET voxel counts equal the README's counts of labels 1/2/4."""
    tumour = real_cases[case_id].tumour
    counts = tuple(int((tumour == label).sum()) for label in (Label.NCR, Label.ED, Label.ET))
    assert counts == README_COUNTS[case_id]
    assert set(np.unique(tumour)) <= {0, 4, 5, 6}


@pytest.mark.realdata
@pytest.mark.parametrize("case_id", sorted(README_COUNTS))
def test_real_derived_label_map(real_cases, real_labels, case_id, tmp_path):
    """Grid bit-identical to the seg file, tumour copied exactly, plausible anatomy."""
    case = real_cases[case_id]
    labelmap, _ = real_labels[case_id]
    seg_grid = _file_grid(case.files["seg"])
    assert labelmap.grid == seg_grid
    written = write_label_map(labelmap, tmp_path / "labels.nii.gz")
    reread = read_label_map(written)
    assert reread.grid == seg_grid
    assert _file_grid(written) == seg_grid
    np.testing.assert_array_equal(reread.array, labelmap.array)
    assert reread.history == labelmap.history

    labels = labelmap.array
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= set(range(7))
    tumour = case.tumour > 0
    np.testing.assert_array_equal(labels[tumour], case.tumour[tumour])
    assert not np.any(labels[~tumour] >= Label.NCR)
    brain = case.brain_mask()
    assert np.all(labels[brain] > 0), "unlabelled voxels inside the brain mask"
    assert np.all(labels[~brain] == 0)

    stats = tissue_statistics(labels, case.images["t1"])
    assert stats["CSF"]["mean_t1"] < stats["GM"]["mean_t1"] < stats["WM"]["mean_t1"]
    assert 0.05 <= stats["CSF"]["fraction"] <= 0.30
    assert 0.25 <= stats["GM"]["fraction"] <= 0.60
    assert 0.25 <= stats["WM"]["fraction"] <= 0.65


@pytest.mark.realdata
def test_real_derivation_report(real_cases, real_labels):
    """Print fractions, mean T1 and time per case (run with -s).

    The time per case is measured, on every real case, by benchmarks/anatomy_check.py (CPU and wall
    seconds); a wall-clock limit here failed under load on a shared machine.
    """
    print()
    for case_id, (labelmap, seconds) in sorted(real_labels.items()):
        stats = tissue_statistics(labelmap.array, real_cases[case_id].images["t1"])
        parts = ", ".join(f"{k} {v['fraction']:.1%} (T1 {v['mean_t1']:.0f})" for k, v in stats.items())
        print(f"BraTS2021_{case_id}: {parts}; derived in {seconds:.1f} s")
    assert len(real_labels) == len(README_COUNTS)


@pytest.mark.realdata
def test_real_derivation_is_deterministic(real_cases, real_labels):
    """Deriving a case twice gives the identical label map."""
    case_id = "00014" if "00014" in real_cases else sorted(real_cases)[0]
    again = derive_label_map(real_cases[case_id])
    first = real_labels[case_id][0]
    np.testing.assert_array_equal(again.array, first.array)
    assert again.grid == first.grid and again.history == first.history


# --- template -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template():
    return template_label_map(), sitk.GetArrayFromImage(template_t1())


def test_template_label_map(template):
    """Only anatomy 0-3, CSF < GM < WM in T1, plausible fractions, the 197x233x189 1 mm grid."""
    labelmap, t1 = template
    assert set(np.unique(labelmap.array)) == {0, 1, 2, 3}
    assert labelmap.grid.size == (197, 233, 189)
    np.testing.assert_allclose(labelmap.grid.spacing, (1.0, 1.0, 1.0), rtol=1e-6)
    assert labelmap.grid == Grid.from_image(template_t1())
    assert t1.shape == labelmap.array.shape
    stats = tissue_statistics(labelmap.array, t1)
    assert stats["CSF"]["mean_t1"] < stats["GM"]["mean_t1"] < stats["WM"]["mean_t1"]
    assert 0.05 <= stats["CSF"]["fraction"] <= 0.30
    assert 0.25 <= stats["GM"]["fraction"] <= 0.60
    assert 0.25 <= stats["WM"]["fraction"] <= 0.65
    assert labelmap.history[0]["name"] == "template_labels"


# --- intensity normalisation ---------------------------------------------------------------


@pytest.fixture(scope="module")
def normalised_t1():
    brain = IMAGES["t1"] > 0
    image = IMAGES["t1"].astype(np.float32)
    return image, brain, IntensityNormalizer.fit(image, brain)


def test_normalizer_round_trip_inside_brain(normalised_t1):
    """Values between the percentiles come back (float32 precision); background is 0."""
    image, brain, norm = normalised_t1
    assert norm.low < norm.high
    forward = norm.forward(image, brain)
    assert forward.dtype == np.float32
    assert forward[brain].min() >= -1.0 and forward[brain].max() <= 1.0
    back = norm.inverse(forward, brain)
    in_range = brain & (image >= norm.low) & (image <= norm.high)
    assert in_range.sum() > 0.95 * brain.sum()
    np.testing.assert_allclose(back[in_range], image[in_range], rtol=1e-5, atol=1e-3 * (norm.high - norm.low))
    assert np.all(back[~brain] == 0)


@pytest.mark.parametrize("value, expected", [(-1e6, -1.0), (1e6, 1.0)])
def test_normalizer_clips_outliers(normalised_t1, value, expected):
    """Outliers map to the ends of [-1, 1] and return as the percentile values."""
    _, _, norm = normalised_t1
    one = np.ones((1, 1, 1), bool)
    forward = norm.forward(np.full((1, 1, 1), value, np.float32), one)
    assert forward[0, 0, 0] == expected
    back = norm.inverse(forward, one)[0, 0, 0]
    assert back == pytest.approx(norm.low if expected < 0 else norm.high, rel=1e-6)


def test_normalizer_background(normalised_t1):
    """Outside the brain, forward gives -1 and -1 inverts to 0."""
    image, brain, norm = normalised_t1
    forward = norm.forward(image, brain)
    assert np.all(forward[~brain] == -1.0)
    assert np.all(norm.inverse(np.full(image.shape, -1.0, np.float32), brain)[~brain] == 0.0)
    # -1 inside the brain is the low percentile, not 0.
    assert norm.inverse(np.full((1, 1, 1), -1.0, np.float32), np.ones((1, 1, 1), bool))[0, 0, 0] == \
        pytest.approx(norm.low, rel=1e-6)


def test_normalizer_constant_image_is_invertible():
    """A constant brain gets high = low + 1 rather than a division by zero."""
    image = np.full((4, 4, 4), 7.0, np.float32)
    brain = np.ones(image.shape, bool)
    norm = IntensityNormalizer.fit(image, brain)
    assert norm.high == norm.low + 1.0
    np.testing.assert_allclose(norm.inverse(norm.forward(image, brain), brain), image)


def test_normalizer_empty_brain():
    """An empty brain cannot be normalised."""
    with pytest.raises(ValueError, match="empty brain"):
        IntensityNormalizer.fit(np.zeros((2, 2, 2)), np.zeros((2, 2, 2), bool))


def _brain_with_tumour(tumour_value: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Phantom T1 whose tumour (the seg's voxels) is set to one value; brain, healthy masks."""
    image = IMAGES["t1"].astype(np.float32).copy()
    brain = image > 0
    tumour = (SEG21 > 0) & brain
    image[tumour] = tumour_value
    return image, brain, brain & ~tumour


def test_healthy_zscore_ignores_the_tumour():
    """The healthy-tissue z-score is the same whatever the tumour looks like; the percentile map is not."""
    dim, brain, healthy = _brain_with_tumour(1.0)
    bright, _, _ = _brain_with_tumour(float(dim[brain].max()) * 5)
    assert healthy.sum() < brain.sum()
    z_dim, z_bright = HealthyTissueZScore.fit(dim, healthy), HealthyTissueZScore.fit(bright, healthy)
    assert z_dim == z_bright
    assert z_dim.mean == pytest.approx(float(dim[healthy].mean()), rel=1e-6)
    assert z_dim.std == pytest.approx(float(dim[healthy].std()), rel=1e-6)
    assert IntensityNormalizer.fit(dim, brain) != IntensityNormalizer.fit(bright, brain)
    # Healthy tissue therefore gets identical normalised values in both cases.
    np.testing.assert_array_equal(z_dim.forward(dim, brain)[healthy], z_bright.forward(bright, brain)[healthy])


def test_healthy_zscore_round_trip_and_background():
    """Inside +-scale standard deviations the map inverts; background is -1 forward and 0 back."""
    image, brain, healthy = _brain_with_tumour(1.0)
    norm = HealthyTissueZScore.fit(image, healthy)
    forward = norm.forward(image, brain)
    assert forward.dtype == np.float32 and forward.min() >= -1 and forward.max() <= 1
    assert np.all(forward[~brain] == -1.0)
    back = norm.inverse(forward, brain)
    inside = brain & (np.abs(image - norm.mean) < norm.scale * norm.std)
    assert inside.sum() > 0.95 * brain.sum()
    np.testing.assert_allclose(back[inside], image[inside], rtol=1e-5, atol=1e-4 * norm.std)
    assert np.all(back[~brain] == 0) and back.min() >= 0
    # Healthy tissue is centred: its normalised mean is 0 and its spread 1/scale.
    assert float(forward[healthy].mean()) == pytest.approx(0.0, abs=1e-3)
    assert float(forward[healthy].std()) == pytest.approx(1 / norm.scale, rel=1e-2)
    with pytest.raises(ValueError, match="healthy"):
        HealthyTissueZScore.fit(image, np.zeros(image.shape, bool))


def test_a_models_floor_is_the_lowest_intensity_it_returns_in_the_brain():
    """A model's floor lifts only the brain's voxels below it; a caller's higher floor wins; background stays 0."""
    norm = HealthyTissueZScore(100.0, 20.0, 15.0, "tissue_zscore", floor=30.0)
    normalized = np.array([[[-1.0, -0.25, -0.2, 0.5]]], np.float32)  # 100 - 300, 25, 40, 250
    brain = np.array([[[True, True, True, False]]])
    np.testing.assert_allclose(norm.inverse(normalized, brain), [[[30.0, 30.0, 40.0, 0.0]]], rtol=1e-6)
    np.testing.assert_allclose(norm.inverse(normalized, brain, floor=35.0), [[[35.0, 35.0, 40.0, 0.0]]], rtol=1e-6)
    assert norm.to_json()["floor"] == 30.0 and normalizer_from_json(norm.to_json()) == norm
    # Without a floor of its own (a case's normaliser) only the caller's floor counts, a z-scored scan's negative
    # minimum included, and the entry is what it was before floors existed.
    own = HealthyTissueZScore(100.0, 20.0, 15.0, "tissue_zscore")
    np.testing.assert_allclose(own.inverse(normalized, brain, floor=-150.0), [[[-150.0, 25.0, 40.0, 0.0]]], rtol=1e-6)
    assert "floor" not in own.to_json()


def test_signal_floor_z_is_the_darkest_signal_of_the_brain_left_out_its_zeros():
    """The percentile is taken over the brain's voxels with signal: a contrast's own zeros inside the label map's
    brain (its mask a little smaller) do not pull the floor to 0; the model's floor is never below 0."""
    from MedSynthLib.synthesis.normalize import SIGNAL_FLOOR_PERCENTILE, signal_floor_z, with_signal_floor

    rng = np.random.default_rng(5)
    image = rng.uniform(50.0, 1000.0, (20, 20, 20)).astype(np.float32)
    brain = np.ones(image.shape, bool)
    image[:2] = 0.0  # 10 % of the brain without signal
    norm = HealthyTissueZScore.fit(image, image > 0, "tissue_zscore")
    floor_z = signal_floor_z(norm.forward(image, brain), brain, norm)
    expected = (np.percentile(image[image > 0], SIGNAL_FLOOR_PERCENTILE) - norm.mean) / norm.std
    assert floor_z == pytest.approx(expected, abs=1e-4)
    assert with_signal_floor(norm, floor_z).floor == pytest.approx(
        np.percentile(image[image > 0], SIGNAL_FLOOR_PERCENTILE), rel=1e-4)
    assert with_signal_floor(norm, -50.0).floor == 0.0
    with pytest.raises(ValueError, match="signal"):
        signal_floor_z(norm.forward(np.zeros_like(image), brain), brain, norm)


@pytest.mark.parametrize("entry, kind", [
    ({"low": 10.0, "high": 200.0}, IntensityNormalizer),  # model configs written before the z-score existed
    ({"low": 10.0, "high": 200.0, "kind": "percentile"}, IntensityNormalizer),
    ({"mean": 100.0, "std": 20.0, "scale": 6.0, "kind": "healthy_zscore"}, HealthyTissueZScore),
    ({"mean": 100.0, "std": 20.0, "scale": 15.0, "kind": "tissue_zscore"}, HealthyTissueZScore),
])
def test_normalizer_from_json(entry, kind):
    norm = normalizer_from_json(entry)
    assert isinstance(norm, kind)
    assert normalizer_from_json(norm.to_json()) == norm


def test_normalizer_from_json_unknown_kind():
    with pytest.raises(ValueError, match="unknown intensity normalisation 'minmax'"):
        normalizer_from_json({"low": 0.0, "high": 1.0, "kind": "minmax"})


def test_mean_normalizer():
    """A model's statistics are the mean over its training cases; kinds cannot be mixed."""
    a, b = HealthyTissueZScore(100.0, 10.0), HealthyTissueZScore(300.0, 30.0)
    assert mean_normalizer([a, b]) == HealthyTissueZScore(200.0, 20.0)
    assert mean_normalizer([IntensityNormalizer(0.0, 10.0), IntensityNormalizer(2.0, 30.0)]) == \
        IntensityNormalizer(1.0, 20.0)
    with pytest.raises(ValueError, match="mix"):
        mean_normalizer([a, IntensityNormalizer(0.0, 10.0)])


@pytest.mark.parametrize("points, margin, expected", [
    ([(2, 3, 4)], 0, (slice(2, 3), slice(3, 4), slice(4, 5))),
    ([(2, 3, 4), (5, 1, 7)], 0, (slice(2, 6), slice(1, 4), slice(4, 8))),
    ([(2, 3, 4), (5, 1, 7)], 2, (slice(0, 8), slice(0, 6), slice(2, 10))),  # clipped at 0 and the shape
    ([(0, 0, 0), (7, 8, 9)], 5, (slice(0, 8), slice(0, 9), slice(0, 10))),
])
def test_mask_box(points, margin, expected):
    from MedSynthLib.schema.grid import mask_box

    mask = np.zeros((8, 9, 10), bool)
    for point in points:
        mask[point] = True
    assert mask_box(mask, margin) == expected
    with pytest.raises(ValueError, match="empty"):
        mask_box(np.zeros((3, 3, 3), bool))


# --- a tumour-only map's convention, detected --------------------------------------------------------

#: A BraTS 2017-2021 map (1 NCR, 2 ED, 4 ET) written in another convention's values.
RECODE = {"brats2021": {1: 1, 2: 2, 4: 4}, "brats2023": {1: 1, 2: 2, 4: 3}, "msd": {1: 2, 2: 1, 4: 3}}


def _recode(seg: np.ndarray, convention: str) -> np.ndarray:
    out = np.zeros_like(seg)
    for src, dst in RECODE[convention].items():
        out[seg == src] = dst
    return out


def _all_real_tumour_maps(root: Path) -> list[Path]:
    maps = sorted(root.glob("*/cases/*/*_seg.nii.gz")) + sorted(root.glob("brats2020_seg/*.nii.gz")) + \
        sorted(root.glob("brats2021/seg_only/*.nii.gz"))
    assert len(maps) == 46, f"expected the 27 cases' and 19 tumour-only maps of {root}, found {len(maps)}"
    return maps


@pytest.mark.realdata
def test_every_real_tumour_map_reads_right_in_each_convention(real_data):
    """All 46 real maps, recoded as BraTS 2023 and as MSD Task01 (oedema 1, core 2): each is detected as what it is.

    MSD and BraTS 2023 share the values {1, 2, 3} with oedema and core swapped; the oedema is the label whose
    boundary faces the healthy brain, the core the one enclosed by tumour.
    """
    from MedSynthLib.schema.labels import detect_tumour_convention

    for path in _all_real_tumour_maps(real_data):
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.int16)
        expected = tumour_to_schema(seg, "brats2021")
        for convention in RECODE:
            recoded = _recode(seg, convention)
            detected = detect_tumour_convention(recoded)
            assert detected == convention, f"{path.name} written as {convention} read as {detected}"
            assert np.array_equal(tumour_to_schema(recoded, detected), expected)


@pytest.mark.parametrize("values, expected", [
    ({4}, "brats2021"), ({2, 4}, "brats2021"), ({3}, "brats2023"), ({1, 2, 3, 4}, "brats2015"), ({3, 4}, "brats2015"),
])
def test_values_alone_decide_where_every_reading_agrees(values, expected):
    from MedSynthLib.schema.labels import detect_tumour_convention

    seg = np.zeros((6, 6, 6), np.int16)
    for k, value in enumerate(sorted(values)):
        seg[1 + k, 1:5, 1:5] = value
    assert detect_tumour_convention(seg) == expected


@pytest.mark.parametrize("values", [{1}, {2}, {1, 3}, {2, 3}])
def test_a_map_that_reads_two_ways_asks_for_its_convention(values):
    """One of oedema/core alone: BraTS (1 core, 2 oedema) and MSD (1 oedema, 2 core) both fit, and no shape tells."""
    from MedSynthLib.schema.labels import AmbiguousConventionError, detect_tumour_convention

    seg = np.zeros((6, 6, 6), np.int16)
    for k, value in enumerate(sorted(values)):
        seg[1 + k, 1:5, 1:5] = value
    with pytest.raises(AmbiguousConventionError, match="--label-convention"):
        detect_tumour_convention(seg)


def test_oedema_and_core_touching_the_brain_alike_ask_for_the_convention():
    """Two side-by-side blobs {1, 2} whose boundaries face the brain alike: no reading is preferred."""
    from MedSynthLib.schema.labels import AmbiguousConventionError, detect_tumour_convention

    seg = np.zeros((8, 8, 8), np.int16)
    seg[2:6, 2:6, 1:4], seg[2:6, 2:6, 4:7] = 1, 2
    with pytest.raises(AmbiguousConventionError, match="msd"):
        detect_tumour_convention(seg)


def test_values_no_convention_defines_are_refused():
    from MedSynthLib.schema.labels import detect_tumour_convention

    seg = np.zeros((4, 4, 4), np.int16)
    seg[1, 1, 1] = 7
    with pytest.raises(LabelValueError, match=r"\[7\]"):
        detect_tumour_convention(seg)


# --- formats with a separate data file (.mhd, .nhdr) ------------------------------------------------------

#: An oblique grid, so that geometry is checked in every component.
_B = np.deg2rad(20.0)
OBLIQUE = dict(spacing=(0.9, 1.1, 1.3), origin=(12.5, -30.0, 7.25),
               direction=tuple(float(v) for v in (np.array([[np.cos(_B), -np.sin(_B), 0], [np.sin(_B), np.cos(_B), 0],
                                                            [0, 0, 1]]) @ np.diag([-1.0, -1.0, 1.0])).ravel()))


def _header_data_file(path: Path) -> str:
    key = "ElementDataFile" if path.suffix == ".mhd" else "data file"
    for line in path.read_text(errors="replace").splitlines():
        if line.split("=")[0].split(":")[0].strip() == key:
            return line.split("=" if "=" in line else ":", 1)[1].strip()
    raise AssertionError(f"{path} names no data file")


def _assert_same_volume(image: sitk.Image, array: np.ndarray, grid: Grid) -> None:
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)
    assert Grid.from_image(image).difference(grid, rtol=1e-6) is None


@pytest.fixture(scope="module")
def oblique_template(template):
    labelmap, t1 = template
    grid = Grid(labelmap.grid.size, OBLIQUE["spacing"], OBLIQUE["origin"], OBLIQUE["direction"])
    return type(labelmap)(labelmap.array.copy(), grid, list(labelmap.history)), t1


def test_mhd_label_map_and_image_write_as_a_readable_pair(oblique_template, tmp_path):
    """A .mhd label map (with its sidecar) and a synthesised image as .mhd/.nhdr: the header names the final data
    file, MedSynth and SimpleITK read back the same voxels and grid, and no temporary file is left (it was
    ``ElementDataFile = .l.mhd.XXXX.tmp.zraw``, a file already gone)."""
    from MedSynthLib.schema.volume_io import compact_intensities, read_image, write_image

    labelmap, t1 = oblique_template
    out = tmp_path / "out"
    write_label_map(labelmap, out / "l.mhd")
    image = compact_intensities(t1.astype(np.float32) * 3.7)
    write_image(labelmap.grid.image(image), out / "t1.mhd")
    write_image(labelmap.grid.image(image), out / "t1.nhdr")
    assert sorted(p.name for p in out.iterdir()) == ["l.json", "l.mhd", "l.zraw", "t1.mhd", "t1.nhdr",
                                                     "t1.raw.gz", "t1.zraw"]
    assert _header_data_file(out / "l.mhd") == "l.zraw"
    assert _header_data_file(out / "t1.mhd") == "t1.zraw"
    assert _header_data_file(out / "t1.nhdr") == "t1.raw.gz"
    read = read_label_map(out / "l.mhd")
    np.testing.assert_array_equal(read.array, labelmap.array)
    assert read.grid.difference(labelmap.grid, rtol=1e-6) is None
    assert read.history == labelmap.history
    _assert_same_volume(sitk.ReadImage(str(out / "l.mhd")), labelmap.array, labelmap.grid)
    for name in ("t1.mhd", "t1.nhdr"):
        _assert_same_volume(read_image(out / name), image, labelmap.grid)
        _assert_same_volume(sitk.ReadImage(str(out / name)), image, labelmap.grid)


def test_mhd_overwrite_replaces_both_files_and_a_failure_leaves_no_half_pair(oblique_template, tmp_path,
                                                                             monkeypatch):
    """Without --overwrite an existing header or data file refuses the write; with it both are replaced.  A write
    that fails half way (between the two renames) leaves the old pair as it was, or nothing, and no temporary."""
    import os

    from MedSynthLib.schema.errors import OutputExistsError
    from MedSynthLib.schema.volume_io import write_image

    labelmap, _ = oblique_template
    grid = labelmap.grid
    first, second = labelmap.array.copy(), np.where(labelmap.array == Label.WM, Label.GM, labelmap.array)
    path = tmp_path / "a.mhd"
    write_image(grid.image(first), path)
    with pytest.raises(OutputExistsError):
        write_image(grid.image(second), path)
    write_image(grid.image(second), path, overwrite=True)
    _assert_same_volume(sitk.ReadImage(str(path)), second, grid)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mhd", "a.zraw"]

    (tmp_path / "orphan.zraw").write_bytes(b"a user's file")  # the data file alone is an output too
    with pytest.raises(OutputExistsError):
        write_image(grid.image(first), tmp_path / "orphan.mhd")
    assert (tmp_path / "orphan.zraw").read_bytes() == b"a user's file"
    (tmp_path / "orphan.zraw").unlink()

    real_replace = os.replace
    armed = []

    def fail_on_header(src, dst):  # the move of the new header fails (once), the data file has already moved
        if str(dst).endswith(".mhd") and armed:
            armed.clear()
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_header)
    for target, overwrite in ((path, True), (tmp_path / "b.mhd", False)):
        armed.append(True)
        with pytest.raises(OSError):
            write_image(grid.image(first), target, overwrite=overwrite)
        assert not armed
    monkeypatch.setattr(os, "replace", real_replace)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mhd", "a.zraw"]
    _assert_same_volume(sitk.ReadImage(str(path)), second, grid)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sitk, "WriteImage", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_image(grid.image(first), tmp_path / "c.mhd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mhd", "a.zraw"]


def test_cli_tumour_edits_write_and_read_mhd(template, tmp_path, capsys):
    """The audit's repro: ``tumour new`` and ``tumour --translate`` to .mhd, the second reading the first; each
    output reads back and --overwrite replaces the pair."""
    from MedSynthLib.cli import main

    labelmap, _ = template
    write_label_map(labelmap, tmp_path / "l0.nii.gz")
    centre = labelmap.grid.index_to_lps(np.array(labelmap.grid.size) / 2.0) * np.array([-1, -1, 1])
    new = ["tumour", "new", tmp_path / "l0.nii.gz", "--centre", *centre, "--radius", "12", "-o", tmp_path / "t.mhd"]
    assert main([str(a) for a in new]) == 0
    moved = ["tumour", tmp_path / "t.mhd", "--translate", "5", "0", "0", "-o", tmp_path / "m.mhd"]
    assert main([str(a) for a in moved]) == 0
    assert main([str(a) for a in moved]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([str(a) for a in moved] + ["--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l0.json", "l0.nii.gz", "m.json", "m.mhd", "m.zraw",
                                                          "t.json", "t.mhd", "t.zraw"]
    for name in ("t.mhd", "m.mhd"):
        read = read_label_map(tmp_path / name)
        assert (read.array >= Label.NCR).any()
        _assert_same_volume(sitk.ReadImage(str(tmp_path / name)), read.array, labelmap.grid)


def test_a_label_map_pair_that_fails_half_way_leaves_the_old_files(oblique_template, tmp_path, monkeypatch):
    """write_label_map moves a .mhd's data file, its header and the sidecar into place as one unit; a move that
    failed half way (the new data file in, the header not) left a header pointing at the new data file of another
    map.  The unit is now undone: the old data file, header and sidecar as they were, no temporary left."""
    import os

    from MedSynthLib.schema.labelmap import read_label_map, write_label_map

    labelmap, _ = oblique_template
    path = tmp_path / "labels.mhd"
    write_label_map(labelmap, path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    changed = labelmap.with_array(np.where(labelmap.array == Label.WM, Label.GM, labelmap.array),
                                  {"name": "manual_segment_edit", "params": {}, "schema_version": 1})
    real_replace = os.replace
    armed = [True]

    def fail_on_header(src, dst):  # the new header's move fails once (a disk error), the data file already moved
        if str(dst) == str(path) and str(src).endswith("labels.mhd") and armed:
            armed.clear()
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_header)
    with pytest.raises(OSError):
        write_label_map(changed, path, overwrite=True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if not p.name.startswith(".")} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") and "lock" not in p.name]
    np.testing.assert_array_equal(read_label_map(path).array, labelmap.array)
