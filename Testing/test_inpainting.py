"""Tumour inpainting into a real case (``network.kind: inpainting``, ``medsynth synthesize --context``).

Phantom cases (Testing/conftest.py) stand in for real ones; one tiny inpainting model is trained once per module
(in-process, a threshold anatomy standing in for the atlas model, which is tested in test_anatomy.py) and shared.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import PHANTOM_BRATS_IDS, REPO, write_volume
from MedSynthLib.cli import main
from MedSynthLib.schema.grid import Grid, LabelMap
from MedSynthLib.schema.labelmap import read_label_map, write_label_map
from MedSynthLib.schema.labels import Label, tumour_mask

CASE_IDS = ("BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002")
MODALITIES = ("t1", "t1ce", "t2", "flair")
SMOKE_CONFIG = REPO / "Resources" / "configs" / "inpaint_smoke.json"


def threshold_labels(t1: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """The phantom's anatomy from its T1 shells (CSF 300, GM 650, WM 900) and its tumour in schema labels."""
    labels = np.zeros(t1.shape, np.uint8)
    brain = t1 > 0
    labels[brain] = np.where(t1[brain] < 475, Label.CSF, np.where(t1[brain] < 775, Label.GM, Label.WM))
    labels[seg == 2] = Label.ED
    labels[seg == 4] = Label.ET
    labels[seg == 1] = Label.NCR
    return labels


def _derive_by_threshold(case, *args, **kwargs) -> LabelMap:
    seg = np.zeros(case.grid.shape, np.uint8) if case.tumour is None else case.tumour
    labels = threshold_labels(case.images["t1"], np.select([seg == Label.NCR, seg == Label.ED, seg == Label.ET],
                                                           [1, 2, 4], 0).astype(np.uint8))
    return LabelMap(labels, case.grid, [{"name": "derive_labels", "params": {}, "schema_version": 1}])


@pytest.fixture(scope="module")
def phantom_cases(phantom_brats) -> Path:
    assert CASE_IDS == PHANTOM_BRATS_IDS
    return phantom_brats


def _train(data: Path, run: Path, config: Path, *extra: str) -> None:
    status = main(["train", "--data", str(data), "-o", str(run), "--config", str(config), "--device", "cpu",
                   "--cache", str(run.parent / "cache"), *extra])
    assert status == 0


@pytest.fixture(scope="module")
def trained(phantom_cases: Path, tmp_path_factory) -> dict[str, Path]:
    """Run A: 4 steps in one go; run B: 2 steps, then resumed to 4 (the same weights are expected)."""
    import MedSynthLib.cases.anatomy as anatomy

    root = tmp_path_factory.mktemp("inpaint_runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(anatomy, "derive_label_map", _derive_by_threshold)
        _train(phantom_cases, root / "A", SMOKE_CONFIG)
        _train(phantom_cases, root / "B", SMOKE_CONFIG, "--steps", "2")
        _train(phantom_cases, root / "B", SMOKE_CONFIG, "--resume", "--steps", "4")
    return {"A": root / "A", "B": root / "B"}


@pytest.fixture(scope="module")
def edited(phantom_cases: Path, tmp_path_factory) -> dict[str, Path]:
    """A real (phantom) case, its label map, and the label map with the tumour moved 6 voxels along i."""
    root = tmp_path_factory.mktemp("inpaint_edit")
    case = phantom_cases / CASE_IDS[0]
    t1 = sitk.ReadImage(str(case / f"{CASE_IDS[0]}_t1.nii.gz"))
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(case / f"{CASE_IDS[0]}_seg.nii.gz")))
    labels = threshold_labels(sitk.GetArrayFromImage(t1), seg)
    grid = Grid.from_image(t1)
    history = [{"name": "derive_labels", "params": {}, "schema_version": 1}]
    write_label_map(LabelMap(labels, grid, history), root / "labels.nii.gz")
    moved = labels.copy()
    tumour = tumour_mask(labels)
    healthy = np.where(tumour, Label.WM, labels)
    moved = healthy.copy()
    shifted = np.roll(np.where(tumour, labels, 0), -6, axis=2)
    moved[shifted > 0] = shifted[shifted > 0]
    moved[labels == Label.BACKGROUND] = Label.BACKGROUND
    write_label_map(LabelMap(moved, grid, history), root / "moved.nii.gz")
    return {"case": case, "labels": root / "labels.nii.gz", "moved": root / "moved.nii.gz", "root": root}


def _inpaint(edited: dict[str, Path], model: Path, out: Path, *extra: str) -> int:
    return main(["synthesize", str(edited["moved"]), "-o", str(out), "--context", str(edited["case"]),
                 "--model", str(model / "model"), "--device", "cpu", *extra])


def test_training_resumes_exactly(trained: dict[str, Path]) -> None:
    import torch
    from safetensors.torch import load_file

    a = load_file(str(trained["A"] / "model" / "weights.safetensors"))
    b = load_file(str(trained["B"] / "model" / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((trained["A"] / "model" / "config.json").read_text())
    assert config["network"]["kind"] == "inpainting" and config["network"]["in_channels"] == 12
    assert config["inpainting"]["normalization"] == "tissue_zscore"


def test_tiny_model_runs_in_the_monai_free_twin(trained: dict[str, Path]) -> None:
    from MedSynthLib.synthesis.models import load_generator, resolve_model

    model = resolve_model(trained["A"] / "model", kind="inpainting")
    generator = load_generator(model, "cpu", backend="torch")
    assert type(generator.net).__name__ == "InferenceSpadeGenerator"
    twin = load_generator(model, "cpu", backend="monai")
    import torch

    condition = torch.rand(1, 12, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(generator(condition), twin(condition), atol=1e-5)


def test_outside_region_bit_for_bit_mask_and_provenance(trained, edited, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert _inpaint(edited, trained["A"], out) == 0
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "synthetic_mask.nii.gz"))).astype(bool)
    labels = read_label_map(edited["labels"]).array
    moved = read_label_map(edited["moved"]).array
    # The region covers the old and the new tumour, and stays inside the brain.
    assert mask[tumour_mask(labels)].all() and mask[tumour_mask(moved)].all()
    assert not mask[moved == Label.BACKGROUND].any()
    changed_somewhere = False
    for modality in MODALITIES:
        real = sitk.ReadImage(str(edited["case"] / f"{CASE_IDS[0]}_{modality}.nii.gz"))
        written = sitk.ReadImage(str(out / f"{modality}.nii.gz"))
        assert written.GetPixelID() == real.GetPixelID() == sitk.sitkInt16  # stored as the input stores it
        assert Grid.from_image(written) == Grid.from_image(real)
        a, b = sitk.GetArrayFromImage(real), sitk.GetArrayFromImage(written)
        assert np.array_equal(a[~mask], b[~mask])
        changed_somewhere |= bool((a[mask] != b[mask]).any())
    assert changed_somewhere
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["privacy"]["images"] == "patient"
    assert provenance["inpainting"]["synthetic_voxels"] == int(mask.sum())
    assert provenance["inpainting"]["old_tumour"] == "case-segmentation"
    assert "synthetic_mask.nii.gz" in provenance["files"]
    assert "NOT anonymous" in capsys.readouterr().out

    # export --anonymous refuses it in one line, exit 2, nothing written; a plain export says it is not anonymous.
    target = tmp_path / "export"
    assert main(["export", str(out), "--format", "nifti", "-o", str(target), "--anonymous"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not anonymous" in err and "patient's own scan" in err
    assert not target.exists()
    assert main(["export", str(out), "--format", "nifti", "-o", str(target)]) == 0
    exported = json.loads(next(target.rglob("provenance.json")).read_text())
    assert exported["privacy"]["anonymous"] is False and "context_sha256" not in exported["inpainting"]
    assert "PARTLY SYNTHETIC DATA OF A REAL PATIENT" in next(target.rglob("README.txt")).read_text()


def test_old_labels_and_unchanged_map(trained, edited, tmp_path: Path) -> None:
    # The same map as before: nothing changed, so nothing is re-rendered and every voxel is the real one.
    out = tmp_path / "same"
    assert main(["synthesize", str(edited["labels"]), "-o", str(out), "--context", str(edited["case"]),
                 "--old-labels", str(edited["labels"]), "--model", str(trained["A"] / "model"),
                 "--device", "cpu"]) == 0
    assert not sitk.GetArrayFromImage(sitk.ReadImage(str(out / "synthetic_mask.nii.gz"))).any()
    real = sitk.GetArrayFromImage(sitk.ReadImage(str(edited["case"] / f"{CASE_IDS[0]}_flair.nii.gz")))
    assert np.array_equal(real, sitk.GetArrayFromImage(sitk.ReadImage(str(out / "flair.nii.gz"))))
    # A larger margin gives a larger region.
    small, large = tmp_path / "small", tmp_path / "large"
    assert _inpaint(edited, trained["A"], small, "--region-margin", "2") == 0
    assert _inpaint(edited, trained["A"], large, "--region-margin", "6") == 0
    sizes = [sitk.GetArrayFromImage(sitk.ReadImage(str(p / "synthetic_mask.nii.gz"))).sum() for p in (small, large)]
    assert 0 < sizes[0] < sizes[1]


def test_bad_input_one_line_exit_2_nothing_written(trained, edited, tmp_path: Path, capsys) -> None:
    import shutil

    # A context case on another grid.
    other = tmp_path / "other" / CASE_IDS[1]
    for modality in (*MODALITIES, "seg"):
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(edited["case"] / f"{CASE_IDS[0]}_{modality}.nii.gz")))
        write_volume(array[:-2], other / f"{CASE_IDS[1]}_{modality}.nii.gz")
    out = tmp_path / "out"
    assert main(["synthesize", str(edited["moved"]), "-o", str(out), "--context", str(other),
                 "--model", str(trained["A"] / "model"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{CASE_IDS[1]}_t1.nii.gz" in err and "grid" in err
    assert not out.exists()
    # A missing modality.
    missing = tmp_path / "missing" / CASE_IDS[0]
    shutil.copytree(edited["case"], missing)
    (missing / f"{CASE_IDS[0]}_t2.nii.gz").unlink()
    assert main(["synthesize", str(edited["moved"]), "-o", str(out), "--context", str(missing),
                 "--model", str(trained["A"] / "model"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err and "t2" in err.lower()
    assert not out.exists()
    # An old label map on another grid names the file.
    old = tmp_path / "old.nii.gz"
    write_volume(read_label_map(edited["labels"]).array[:-2], old)
    assert main(["synthesize", str(edited["moved"]), "-o", str(out), "--context", str(edited["case"]),
                 "--old-labels", str(old), "--model", str(trained["A"] / "model"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "old.nii.gz" in err and not out.exists()
    # A synthesis model given where an inpainting model is needed, and the reverse.
    assert main(["synthesize", str(edited["moved"]), "-o", str(out), "--model", str(trained["A"] / "model"),
                 "--device", "cpu"]) == 2
    assert "--context" in capsys.readouterr().err and not out.exists()


def test_region_and_feather_weight() -> None:
    from MedSynthLib.synthesis.inpainting import changed_region, feather_weight

    labels = np.full((30, 30, 30), Label.WM, np.uint8)
    labels[0], labels[-1] = Label.BACKGROUND, Label.BACKGROUND
    labels[10:14, 10:14, 10:14] = Label.NCR
    moved = np.where(labels == Label.NCR, Label.WM, labels).astype(np.uint8)
    moved[10:14, 16:20, 10:14] = Label.NCR
    old = labels == Label.NCR
    region = changed_region(moved, old, 3.0, (1.0, 1.0, 1.0))
    assert region[old].all() and region[moved == Label.NCR].all()
    assert region[12, 12, 7] and not region[12, 12, 5]  # 3 mm beyond the old tumour's face, not 5 mm
    assert not region[0].any()  # never outside the brain
    # Anisotropic voxels: the margin is in mm.
    assert changed_region(moved, old, 3.0, (3.0, 1.0, 1.0))[9, 12, 12]  # one 3 mm slice beyond the tumour
    assert not changed_region(moved, old, 3.0, (3.0, 1.0, 1.0))[8, 12, 12]
    # With the old label map: nothing changed, nothing re-rendered.
    assert not changed_region(labels, old, 3.0, (1.0, 1.0, 1.0), old_labels=labels).any()
    weight = feather_weight(region, (1.0, 1.0, 1.0), 3.0)
    assert (weight[~region] == 0).all() and (weight[region] > 0).all()
    assert weight[12, 15, 12] == 1.0 and 0 < weight[region & (weight < 1)].min() < 0.5  # between the tumours


def test_inpainting_config_checks() -> None:
    from MedSynthLib.schema.errors import InputError
    from MedSynthLib.training.train import TrainConfig

    config = json.loads(SMOKE_CONFIG.read_text())
    TrainConfig.from_json(config)
    for change, message in (({"network": dict(config["network"], in_channels=7)}, "in_channels 7"),
                            ({"network": dict(config["network"], style_dim=2)}, "style_dim"),
                            ({"normalization": "healthy_zscore"}, "tissue_zscore"),
                            ({"inpaint_margin_range": [5.0, 2.0]}, "inpaint_margin_range")):
        with pytest.raises(InputError, match=message):
            TrainConfig.from_json({**config, **change})
    shipped = json.loads((REPO / "Resources" / "configs" / "inpaint_brats27_cpu_cv.json").read_text())
    assert TrainConfig.from_json(shipped).network.kind == "inpainting"


def test_slicer_worker_inpaints_a_real_case(trained, edited, tmp_path: Path) -> None:
    """The Slicer module's worker: a request naming the real case keeps its images outside the region."""
    import sys

    sys.path.insert(0, str(REPO / "MedSynth"))
    from MedSynthSlicerLib.jobs import labelmap_request
    from MedSynthSlicerLib.parameters import GenerateOptions
    from MedSynthSlicerLib.protocol import Request, put_array, take_array
    from MedSynthSlicerLib.worker import Worker

    events = []
    worker = Worker(tmp_path, events.append)
    params, arrays = labelmap_request(read_label_map(edited["moved"]))
    options = GenerateOptions(device="cpu", inpainting_model=str(trained["A"] / "model"))
    assert options.inpaint  # the default for a real case
    params = dict(params, out=str(tmp_path / "case"), context=str(edited["case"]), **options.worker_params())
    result = worker.generate(Request(1, "generate", params, {k: put_array(tmp_path, v) for k, v in arrays.items()}))
    assert result.data["inpainted"] and result.data["synthetic_voxels"] > 0
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "case" / "synthetic_mask.nii.gz"))).astype(bool)
    real = sitk.GetArrayFromImage(sitk.ReadImage(str(edited["case"] / f"{CASE_IDS[0]}_t1ce.nii.gz")))
    sent = take_array(result.arrays["t1ce"])
    assert sent.dtype == real.dtype and np.array_equal(sent[~mask], real[~mask])


def test_registered_inpainting_model_verifies() -> None:
    """The registered inpainting model loads (hash, schema, shapes) and is not a default of either kind yet."""
    from MedSynthLib.synthesis.models import load_generator, read_registry, resolve_model

    model = resolve_model("medsynth-inpaint-brats27-f0", kind="inpainting")
    assert model.config["network"]["kind"] == "inpainting" and model.config["inpainting"]["blank_value"] == 0.0
    assert type(load_generator(model, "cpu").net).__name__ == "InferenceSpadeGenerator"
    registry = read_registry()
    assert registry["default"] != "medsynth-inpaint-brats27-f0" and "default_inpainting" not in registry
