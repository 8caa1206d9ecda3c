"""``medsynth labels`` refuses a T1 that is plainly no MR image before it writes anything.

``labels --t1 CASE/..._seg.nii.gz`` took the tumour segmentation for the T1 and wrote a label map of its three values
(on BraTS2021_00006: CSF/GM only, WM 0 %) that ``synthesize`` then refused ("holds no white matter").  A contrast
with only a handful of distinct values in the brain is a label map, a mask or a segmentation; and a derivation that
finds no white matter is not a brain's anatomy: both are refused in one line naming the file, exit 2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import phantom, write_phantom_case, write_volume
from MedSynthLib.cli import main
from MedSynthLib.schema.labels import Label


def _refused(capsys, argv: list, named: Path, output: Path, words: tuple[str, ...]) -> str:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == "", captured.err
    err = captured.err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"medsynth: error: {named}: "), err
    assert all(word in err[0] for word in words), err
    assert not output.parent.exists() or list(output.parent.iterdir()) == []
    return err[0]


def test_a_segmentation_given_as_the_t1_is_refused(tmp_path: Path, capsys) -> None:
    case = write_phantom_case(tmp_path / "cases", 0)
    seg = case / f"{case.name}_seg.nii.gz"
    output = tmp_path / "out" / "labels.nii.gz"
    _refused(capsys, ["labels", "--t1", seg, "-o", output], seg, output, ("distinct values", "not an MR image"))


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_a_label_map_given_as_the_t1_or_the_t2_is_refused(tmp_path: Path, capsys, dtype) -> None:
    """A MedSynth label map (stored as integers or as floats) is no T1; nor is it a T2 beside a real T1."""
    images, seg = phantom(seed=1)
    t1 = images["t1"]
    labels = np.select([t1 >= 800, t1 >= 500, t1 > 0], [Label.WM, Label.GM, Label.CSF], 0)
    labels = np.where(seg > 0, Label.ET, labels).astype(dtype)
    as_image = write_volume(labels, tmp_path / "labels_as_image.nii.gz")
    real_t1 = write_volume(t1, tmp_path / "t1.nii.gz")
    output = tmp_path / "out" / "labels.nii.gz"
    _refused(capsys, ["labels", "--t1", as_image, "-o", output], as_image, output, ("distinct values",))
    _refused(capsys, ["labels", "--t1", real_t1, "--t2", as_image, "--flair", real_t1, "-o", output], as_image,
             output, ("distinct values",))


def test_a_t1_whose_anatomy_has_no_white_matter_is_refused(tmp_path: Path, capsys, monkeypatch) -> None:
    """Whatever the image, a derivation without white matter is no brain's anatomy: refused, naming the T1, instead
    of a label map ``synthesize`` refuses later."""
    from MedSynthLib.cases import anatomy

    class NoWhiteMatter:
        name = "no-white-matter"

        def segment(self, t1, brain, exclude, spacing):
            return np.where(t1 > np.median(t1[brain]), Label.GM, Label.CSF).astype(np.uint8) * brain

        def to_json(self):
            return {"name": self.name}

    monkeypatch.setitem(anatomy.ANATOMY_MODELS, "kmeans-t1", NoWhiteMatter())
    case = write_phantom_case(tmp_path / "cases", 0)
    t1 = case / f"{case.name}_t1.nii.gz"
    output = tmp_path / "out" / "labels.nii.gz"
    _refused(capsys, ["labels", "--t1", t1, "--anatomy", "kmeans-t1", "-o", output], t1, output,
             ("no white matter",))


def test_a_real_brats_segmentation_given_as_the_t1_is_refused(brats_cases, tmp_path: Path, capsys) -> None:
    """The auditor's case: BraTS2021_00006's segmentation as the T1 gave a map with WM 0 %, written with exit 0."""
    seg = next(c for c in brats_cases if c.name == "BraTS2021_00006") / "BraTS2021_00006_seg.nii.gz"
    output = tmp_path / "out" / "labels.nii.gz"
    _refused(capsys, ["labels", "--t1", seg, "-o", output], seg, output, ("distinct values", "not an MR image"))
