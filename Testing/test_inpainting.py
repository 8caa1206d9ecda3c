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

from conftest import PHANTOM_BRATS_IDS, REPO, load_benchmark, write_volume
from MedSynthLib.cli import main
from MedSynthLib.schema.grid import Grid, LabelMap
from MedSynthLib.schema.labelmap import read_label_map, write_label_map
from MedSynthLib.schema.labels import MODALITIES, Label, tumour_mask

CASE_IDS = ("BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002")
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
    history = [{"name": "derive_labels", "params": {"tumour_segmentation": True}, "schema_version": 1}]  # from seg
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
    assert provenance["inpainting"]["mirror_average"] is True and provenance["inpainting"]["match_tissue"] is True
    assert "synthetic_mask.nii.gz" in provenance["files"]
    # How the network ran (whole volume or sliding windows after an out-of-memory error), as synthesis records it.
    passes = provenance["inference"]
    assert passes and {p["method"] for p in passes} <= {"whole-volume", "sliding-window"}, passes
    assert all(p["device"] == "cpu" for p in passes), passes
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


def test_region_margin(trained, edited, tmp_path: Path) -> None:
    # (The same map as --old-labels re-renders nothing and is refused: test_an_inpainting_that_re_renders_nothing_...)
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


@pytest.mark.parametrize("name", ["medsynth-inpaint-brats27", "medsynth-inpaint-brats27-f0d"])
def test_registered_inpainting_models_verify(name: str) -> None:
    """Each registered inpainting model loads (hash, schema, shapes) and is never the synthesis default."""
    from MedSynthLib.synthesis.models import load_generator, read_registry, resolve_model

    model = resolve_model(name, kind="inpainting")
    assert model.config["network"]["kind"] == "inpainting" and model.config["inpainting"]["blank_value"] == 0.0
    assert type(load_generator(model, "cpu").net).__name__ == "InferenceSpadeGenerator"
    assert read_registry()["default"] != name


def test_the_inpainting_default_is_the_model_trained_on_all_cases() -> None:
    """The default inpainting model is the one fine-tuned on all 27 shared cases (f0d, which never saw fold 0,
    stays registered for the held-out benchmarks); an inpainting model asked for without a name resolves to it."""
    from MedSynthLib.synthesis.models import read_registry, resolve_model

    assert read_registry()["default_inpainting"] == "medsynth-inpaint-brats27"
    default = resolve_model(None, kind="inpainting")
    assert default.sha256 == resolve_model("medsynth-inpaint-brats27", kind="inpainting").sha256
    assert default.sha256 != resolve_model("medsynth-inpaint-brats27-f0d", kind="inpainting").sha256
    assert default.config["training"]["data"]["cases"] == 27


# --- the interactive preview of a real case (InpaintingRoiRenderer) ------------------------------------------


def write_tiny_inpainting_model(folder: Path) -> Path:
    """A tiny random-weight inpainting model (seeded): the preview's arithmetic, not its quality, is tested."""
    import torch

    from MedSynthLib.synthesis.models import write_model
    from MedSynthLib.synthesis.networks import Generator, NetworkConfig

    torch.manual_seed(0)
    config = NetworkConfig(kind="inpainting", in_channels=12, channels=(4, 8, 8), strides=(2, 2), bottleneck_blocks=1,
                           spade_hidden=4, style_dim=0, upsample="trilinear", disc_channels=4, disc_layers=2)
    return write_model(folder, Generator(config).state_dict(),
                       {"name": "tiny-inpainting", "network": config.to_json(),
                        "intensity": {m: {"low": 0.0, "high": 1000.0} for m in MODALITIES},
                        "inpainting": {"normalization": "tissue_zscore", "blank_value": 0.0}})


@pytest.fixture(scope="module")
def tiny_inpainter(tmp_path_factory):
    from MedSynthLib.synthesis.inpainting import InpaintingEngine
    from MedSynthLib.synthesis.models import resolve_model

    folder = write_tiny_inpainting_model(tmp_path_factory.mktemp("tiny_inpainting") / "model")
    return InpaintingEngine(resolve_model(folder, kind="inpainting"), "cpu", "fp32")


def _send(session, before: np.ndarray, after: np.ndarray) -> None:
    from MedSynthLib.synthesis.preview import box_slices, changed_box

    box = changed_box(before, after)
    assert box is not None
    session.set_labels(box[0], np.ascontiguousarray(after[box_slices(box)]))


def test_inpainting_preview_is_the_real_case_and_equals_inpaint_case_after_each_edit(tiny_inpainter, edited):
    from MedSynthLib.synthesis.inpainting import inpaint_case, read_context
    from MedSynthLib.synthesis.preview import PreviewSession, box_slices, make_renderer

    labels, moved = read_label_map(edited["labels"]), read_label_map(edited["moved"])
    context = read_context(edited["case"], labels)
    session = PreviewSession(make_renderer("inpainting", tiny_inpainter, context=str(edited["case"])), labels)
    first = session.render()
    assert first.full
    for m in MODALITIES:  # the unedited case: the patient's images as stored
        assert np.array_equal(session.images[m], context.images[m].astype(np.float32))

    _send(session, labels.array, moved.array)
    update = session.render()
    expected = inpaint_case(tiny_inpainter, moved, context)
    region = expected.region
    assert not update.full and region.any()
    inside = np.zeros(region.shape, bool)
    inside[box_slices(update.box)] = True
    assert inside[region].all()  # every synthetic voxel came back in the update
    for m in MODALITIES:
        real = context.images[m].astype(np.float32)
        assert np.array_equal(session.images[m][~region], real[~region])  # outside: bit for bit the real images
        # inside: what Generate writes for the same labels (the same function, in the context's stored type)
        assert np.array_equal(session.images[m], expected.images[m].astype(np.float32))
        assert np.array_equal(update.regions[m], session.images[m][box_slices(update.box)])
    assert any(not np.array_equal(session.images[m][region], context.images[m][region]) for m in MODALITIES)

    # A second move: where the first region is no longer re-rendered, the real images come back.
    further = moved.array.copy()
    tumour = tumour_mask(moved.array)
    further[tumour] = Label.WM
    shifted = np.roll(np.where(tumour, moved.array, 0), 5, axis=1)
    further[shifted > 0] = shifted[shifted > 0]
    further[moved.array == Label.BACKGROUND] = Label.BACKGROUND
    _send(session, moved.array, further)
    update = session.render()
    second = inpaint_case(tiny_inpainter, LabelMap(further, moved.grid, moved.history), context)
    assert (region & ~second.region).any()  # some voxels turn back into the real ones
    for m in MODALITIES:
        assert np.array_equal(session.images[m], second.images[m].astype(np.float32))
    restored = region & ~second.region
    assert np.array_equal(session.images["t1"][restored], context.images["t1"][restored].astype(np.float32))


def test_inpainting_preview_edited_before_the_first_render_and_margin(tiny_inpainter, edited):
    from MedSynthLib.synthesis.inpainting import inpaint_case, read_context
    from MedSynthLib.synthesis.preview import PreviewSession, make_renderer

    moved = read_label_map(edited["moved"])
    context = read_context(edited["case"], moved)
    session = PreviewSession(make_renderer("inpainting", tiny_inpainter, context=context, margin_mm=3.0), moved)
    assert session.render().full
    expected = inpaint_case(tiny_inpainter, moved, context, margin_mm=3.0)
    for m in MODALITIES:
        assert np.array_equal(session.images[m], expected.images[m].astype(np.float32))
    assert session.renderer.region.sum() == expected.region.sum()


def test_a_stopped_inpainting_render_is_superseded_by_the_next_edit(tiny_inpainter, edited):
    from MedSynthLib.synthesis.inpainting import inpaint_case, read_context
    from MedSynthLib.synthesis.preview import PreviewCancelled, PreviewSession, make_renderer

    labels, moved = read_label_map(edited["labels"]), read_label_map(edited["moved"])
    context = read_context(edited["case"], labels)
    session = PreviewSession(make_renderer("inpainting", tiny_inpainter, context=context), labels)
    session.render()
    start = {m: image.copy() for m, image in session.images.items()}
    half = labels.array.copy()  # the first edit: half of the move
    tumour = tumour_mask(labels.array)
    half[tumour] = Label.WM
    shifted = np.roll(np.where(tumour, labels.array, 0), -3, axis=2)
    half[shifted > 0] = shifted[shifted > 0]
    half[labels.array == Label.BACKGROUND] = Label.BACKGROUND
    _send(session, labels.array, half)
    layers = []

    def stop_after_three_layers():
        layers.append(1)
        if len(layers) > 3:
            raise PreviewCancelled("a newer edit")

    with pytest.raises(PreviewCancelled):
        session.render(stop_after_three_layers)
    assert len(layers) == 4  # stopped inside the network
    for m in MODALITIES:  # nothing half-written
        assert np.array_equal(session.images[m], start[m])
    assert session.pending is not None
    _send(session, half, moved.array)
    session.render()
    expected = inpaint_case(tiny_inpainter, moved, context)
    for m in MODALITIES:
        assert np.array_equal(session.images[m], expected.images[m].astype(np.float32))
    assert session.version == 2


def test_slicer_worker_previews_a_real_case_by_inpainting(tiny_inpainter, edited, tmp_path: Path) -> None:
    """The worker's preview with a real case named: the inpainting renderer, the real images outside the region."""
    import sys

    sys.path.insert(0, str(REPO / "MedSynth"))
    from MedSynthLib.synthesis.inpainting import read_context
    from MedSynthSlicerLib.jobs import labelmap_request
    from MedSynthSlicerLib.parameters import GenerateOptions
    from MedSynthSlicerLib.protocol import Request, put_array, take_array
    from MedSynthSlicerLib.worker import Worker
    from MedSynthLib.synthesis.preview import box_slices, changed_box

    labels, moved = read_label_map(edited["labels"]), read_label_map(edited["moved"])
    worker = Worker(tmp_path, lambda event: None)
    options = GenerateOptions(device="cpu", precision="fp32", inpainting_model=str(tiny_inpainter.model.path))
    params, arrays = labelmap_request(labels)
    common = dict(options.worker_params(), session="s1", context=str(edited["case"]))
    first = worker.preview(Request(1, "preview", dict(params, **common, reset=True),
                                   {k: put_array(tmp_path, v) for k, v in arrays.items()}))
    assert first.data["full"] and first.data["renderer"] == "inpainting"
    real = read_context(edited["case"], labels).images
    assert np.array_equal(take_array(first.arrays["flair"]), real["flair"].astype(np.float32))
    box = changed_box(labels.array, moved.array)
    region = {"labels": put_array(tmp_path, np.ascontiguousarray(moved.array[box_slices(box)]))}
    second = worker.preview(Request(2, "preview", dict(common, start=list(box[0]), base=0), region))
    assert not second.data["full"]
    rendered = worker._session.renderer
    for m in MODALITIES:
        part = take_array(second.arrays[m])
        assert part.shape == tuple(b - a for a, b in zip(*second.data["box"]))
        image = rendered.images[m]
        assert np.array_equal(image[~rendered.region], real[m][~rendered.region].astype(np.float32))
    assert worker._session_key[2] == "inpainting"


def test_the_padded_channels_last_condition_equals_padding_then_concatenating():
    import torch

    from MedSynthLib.synthesis.inpainting import channels_last_condition, inpainting_condition

    rng = np.random.default_rng(4)
    labels = rng.integers(0, 7, (9, 14, 11)).astype(np.uint8)
    images = rng.uniform(-1, 1, (4, 9, 14, 11)).astype(np.float32)
    region = rng.random((9, 14, 11)) < 0.3
    pads = [(0, (-n) % 8) for n in labels.shape]
    onehot = torch.nn.functional.one_hot(torch.from_numpy(np.pad(labels, pads)).long(), 7).movedim(-1, 0)[None]
    expected = inpainting_condition(onehot.float(), torch.from_numpy(np.pad(images, [(0, 0)] + pads,
                                                                            constant_values=-1.0))[None],
                                    torch.from_numpy(np.pad(region, pads))[None, None].float())
    for dtype in (torch.float32, torch.bfloat16):
        built = channels_last_condition(labels, images, region, dtype, multiple=8)
        assert built.shape == (1, 12, 16, 16, 16) and built.is_contiguous(memory_format=torch.channels_last_3d)
        assert torch.equal(built, expected.to(dtype))


@pytest.mark.parametrize("shape", [(9, 14, 11), (16, 8, 24)])  # padded at the end; already on the multiple
def test_the_mirrored_batch_holds_the_condition_and_the_mirrored_crops_condition(shape):
    import torch

    from MedSynthLib.synthesis.inpainting import channels_last_condition

    rng = np.random.default_rng(5)
    labels = rng.integers(0, 7, shape).astype(np.uint8)
    images = rng.uniform(-1, 1, (4,) + shape).astype(np.float32)
    region = rng.random(shape) < 0.3
    both = channels_last_condition(labels, images, region, torch.float32, multiple=8, mirrored=True)
    assert both.shape[0] == 2 and both.is_contiguous(memory_format=torch.channels_last_3d)
    alone = channels_last_condition(labels, images, region, torch.float32, multiple=8)
    mirrored = channels_last_condition(labels[..., ::-1], images[..., ::-1], region[..., ::-1], torch.float32,
                                       multiple=8)
    assert torch.equal(both[:1], alone) and torch.equal(both[1:], mirrored)
    assert not torch.equal(alone, mirrored)  # the crop is not symmetric: the test can fail


def test_bf16_weights_of_the_inpainting_engine_give_the_autocast_output_bit_for_bit(tiny_inpainter):
    import torch

    from MedSynthLib.synthesis.inference import Synthesizer
    from MedSynthLib.synthesis.inpainting import InpaintingEngine
    from MedSynthLib.synthesis.models import load_generator

    bf16 = InpaintingEngine(tiny_inpainter.model, "cpu", "bf16")
    assert next(bf16.synth.generator.parameters()).dtype == torch.bfloat16
    autocast = Synthesizer(load_generator(tiny_inpainter.model, "cpu"), bf16.network, torch.device("cpu"), "bf16")
    assert next(autocast.generator.parameters()).dtype == torch.float32
    condition = torch.rand(1, 12, 16, 24, 16).to(torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(bf16.synth.predict_condition(condition), autocast.predict_condition(condition))


def test_the_network_box_is_on_the_lattice_with_real_context():
    from MedSynthLib.synthesis.inpainting import INFERENCE_CONTEXT_VOXELS, lattice_box

    region = np.zeros((100, 90, 40), bool)
    region[3:20, 40:61, 10:30] = True
    box = lattice_box(region, 16)
    for s, n, (lo, hi) in zip(box, region.shape, ((3, 20), (40, 61), (10, 30))):
        assert 0 <= s.start and s.stop <= n
        assert (s.stop - s.start) % 16 == 0 or s.stop - s.start == n  # a multiple, or the whole (small) volume
        assert s.start <= max(lo - INFERENCE_CONTEXT_VOXELS, 0) and s.stop >= min(hi + INFERENCE_CONTEXT_VOXELS, n)
    assert [s.stop - s.start for s in box] == [48, 48, 40]  # 17+16 -> 48 (shifted in at the edge); 21+16 -> 48


def _crop(seed: int = 5):
    """A random crop: labels with every class, images in [-1, 1], a box-shaped region in its middle."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(1, 7, (32, 40, 32)).astype(np.uint8)
    images = rng.uniform(-1, 1, (4, 32, 40, 32)).astype(np.float32)
    region = np.zeros(labels.shape, bool)
    region[8:24, 10:30, 8:24] = True
    return labels, images, region


@pytest.mark.parametrize("batch_limit", [2_000_000, 0])  # the crop and its mirror as one batch; as two passes
def test_mirror_average_is_the_mean_of_the_pass_and_the_mirrored_pass(tiny_inpainter, monkeypatch, batch_limit):
    from MedSynthLib.synthesis import inpainting
    from MedSynthLib.synthesis.inpainting import InpaintingEngine

    monkeypatch.setattr(inpainting, "MIRROR_BATCH_MAX_VOXELS", batch_limit)
    engine = InpaintingEngine(tiny_inpainter.model, "cpu", "fp32", mirror_average=True, match_tissue=False)
    labels, images, region = _crop()
    direct = engine.forward_normalized(labels, images, region)
    mirrored = engine.forward_normalized(labels[..., ::-1].copy(), images[..., ::-1].copy(), region[..., ::-1].copy())
    averaged = engine.predict_normalized(labels, images, region)
    assert np.allclose(averaged, 0.5 * (direct + mirrored[..., ::-1]), atol=1e-6)
    assert not np.allclose(averaged, direct, atol=1e-3)  # the mirrored pass is not the same: the test can fail
    # A mirror-symmetric crop gives a mirror-symmetric output.
    symmetric = [np.concatenate([a[..., :16], a[..., :16][..., ::-1]], axis=-1) for a in (labels, images, region)]
    out = engine.predict_normalized(*symmetric)
    assert np.allclose(out, out[..., ::-1], atol=1e-5)


@pytest.mark.parametrize("stored", ["RAS", "PIR", "SAL"])
def test_inpainting_runs_in_the_networks_axis_order_whatever_the_storage(tiny_inpainter, stored):
    """A crop stored RAS or sagittal-first is inpainted as its LPS twin (the training order), where the mirror
    average's last axis is left-right; on the stored order it gave other values."""
    import SimpleITK as sitk

    from MedSynthLib.schema.grid import AxisOrder, Grid

    labels, images, region = _crop()  # in the network's order (LPS)
    direction = sitk.DICOMOrient(sitk.Image(1, 1, 1, sitk.sitkUInt8), stored).GetDirection()
    order = AxisOrder.from_grid(Grid((1, 1, 1), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(direction)))
    assert not order.is_identity
    as_stored = [np.ascontiguousarray(order.to_stored(a)) for a in (labels, images, region)]
    expected = tiny_inpainter.predict_inside(labels, images, region)
    crop = np.zeros((4,) + labels.shape, np.float32)
    crop[:, region] = expected
    expected_stored = order.to_stored(crop)[:, as_stored[2]]
    np.testing.assert_array_equal(tiny_inpainter.predict_inside(*as_stored, order), expected_stored)
    assert not np.allclose(tiny_inpainter.predict_inside(*as_stored), expected_stored, atol=1e-3)


def test_match_tissue_gives_each_healthy_class_the_patients_median_around_the_region():
    from MedSynthLib.synthesis.inpainting import match_tissue_medians

    from scipy import ndimage

    labels, _, region = _crop()
    rng = np.random.default_rng(6)
    # Tissue of one brightness per class and contrast with some noise, as in a real crop; a network output off by
    # a different amount in each class.
    level = rng.uniform(-0.5, 0.5, (4, 7)).astype(np.float32)
    images = level[:, labels] + rng.normal(0, 0.05, (4,) + labels.shape).astype(np.float32)
    predicted = level[:, labels] + rng.uniform(0.2, 0.4, (4, 7)).astype(np.float32)[:, labels] \
        + rng.normal(0, 0.05, images.shape).astype(np.float32)
    matched = match_tissue_medians(predicted, labels, images, region, shell_voxels=3.0)
    shell = ~region & (ndimage.distance_transform_edt(~region) <= 3.0)
    assert shell.sum() < (~region).sum()  # the shell is not the whole crop
    far = ~region & ~shell
    images_far_changed = images.copy()
    images_far_changed[:, far] += 1.0  # tissue beyond the shell is not a reference
    assert np.array_equal(match_tissue_medians(predicted, labels, images_far_changed, region, shell_voxels=3.0),
                          matched)
    for value in (Label.CSF, Label.GM, Label.WM):
        inside, around = region & (labels == value), shell & (labels == value)
        for c in range(4):  # medians from the 2-voxel lattice: close to the full-resolution ones
            assert np.median(predicted[c][inside]) - np.median(images[c][around]) > 0.1  # there is a shift to make
            assert np.median(matched[c][inside]) == pytest.approx(np.median(images[c][around]), abs=0.03)
            # A shift: the texture inside the class is the network's.
            assert np.allclose(np.diff(matched[c][inside]), np.diff(predicted[c][inside]), atol=1e-5)
    tumour = region & np.isin(labels, [Label.NCR, Label.ED, Label.ET])
    assert np.array_equal(matched[:, tumour], predicted[:, tumour])  # no reference for tumour classes
    assert np.array_equal(matched[:, ~region], predicted[:, ~region])
    # The real values inside the region are never read (they are what the model is scored against).
    leaked = images.copy()
    leaked[:, region] = 5.0
    assert np.array_equal(match_tissue_medians(predicted, labels, leaked, region, shell_voxels=3.0), matched)


def test_the_engine_output_never_reads_the_real_values_inside_the_region(tiny_inpainter):
    labels, images, region = _crop()
    assert tiny_inpainter.mirror_average and tiny_inpainter.match_tissue  # the defaults
    before = tiny_inpainter.predict_normalized(labels, images, region)
    changed = images.copy()
    changed[:, region] = np.random.default_rng(7).uniform(-1, 1, (4, int(region.sum())))
    assert np.array_equal(tiny_inpainter.predict_normalized(labels, changed, region), before)
    changed[:, ~region] += 0.1  # ... but does read the context
    assert not np.array_equal(tiny_inpainter.predict_normalized(labels, changed, region), before)


def test_the_held_out_score_is_taken_without_the_real_values_inside_the_region(tiny_inpainter):
    """The product feathers the region's outer band into the real image, so that band mixes in the real values
    inside the region: in a held-out test those are the answer.  ``benchmarks/inpainting_eval.py`` scores each
    method pasted (the engine with no feather, any other fill through ``pasted_and_blended``) and keeps the
    feathered blend for the seam only."""
    from MedSynthLib.synthesis.inpainting import feather_weight

    evaluation = load_benchmark("inpainting_eval")

    labels, normalized, region = _crop()
    real = {m: (normalized[c] + 1.0) * 1000.0 for c, m in enumerate(MODALITIES)}
    answer_changed = {m: np.where(region, v + 150.0, v).astype(np.float32) for m, v in real.items()}
    spacing = (1.0, 1.0, 1.0)
    pasted, pasted_other = (tiny_inpainter.inpaint(labels, images, region, spacing, feather_mm=0.0).images
                            for images in (real, answer_changed))
    feathered, feathered_other = (tiny_inpainter.inpaint(labels, images, region, spacing).images
                                  for images in (real, answer_changed))
    for m in real:
        assert np.array_equal(pasted[m][region], pasted_other[m][region])  # the answer is never read
        assert np.array_equal(pasted[m][~region], real[m][~region])
        assert not np.array_equal(feathered[m][region], feathered_other[m][region])  # the band reads the answer

    weight = feather_weight(region, spacing)
    fill = np.full(region.shape, 7.0, np.float32)
    for m in real:
        scored, shown = evaluation.pasted_and_blended(fill, real[m], region, weight)
        scored_other, shown_other = evaluation.pasted_and_blended(fill, answer_changed[m], region, weight)
        assert np.array_equal(scored[region], scored_other[region]) and np.all(scored[region] == 7.0)
        assert np.array_equal(scored[~region], real[m][~region])
        assert not np.array_equal(shown[region], shown_other[region])
        assert np.array_equal(shown[weight == 1.0], scored[weight == 1.0])


# --- the preview's fast paths give the plain computation's values, bit for bit ---------------------------------


def test_feather_weight_counts_the_erosions_a_voxel_survives() -> None:
    from scipy import ndimage

    from MedSynthLib.synthesis.inpainting import feather_weight

    rng = np.random.default_rng(3)
    region = ndimage.binary_dilation(rng.random((24, 28, 20)) < 0.01, iterations=3)
    region[:, :, 0] |= region[:, :, 1]  # touching the array's edge: the edge counts as outside
    for steps in (0, 1, 3, 5):
        level = region.astype(np.float32)
        eroded = region
        for _ in range(steps):
            eroded = ndimage.binary_erosion(eroded)
            level += eroded
        expected = level / (steps + 1)
        assert np.array_equal(feather_weight(region, (1.0, 1.0, 1.0), float(steps)), expected)
    assert 0 < feather_weight(region, (1.0, 1.0, 1.0), 3.0)[:, :, 0][region[:, :, 0]].max() <= 0.25


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 0.9375, 0.9375), (1.2, 0.5, 1.0)])
def test_changed_region_grows_old_and_new_tumours_apart_exactly(spacing) -> None:
    from scipy import ndimage

    from MedSynthLib.synthesis.inpainting import changed_region, grown_tumour

    rng = np.random.default_rng(4)
    labels = rng.integers(Label.CSF, Label.WM + 1, (30, 36, 34)).astype(np.uint8)
    labels[:2] = Label.BACKGROUND
    old = ndimage.binary_dilation(rng.random(labels.shape) < 0.002, iterations=2)
    new = np.roll(old, (3, -5, 2), axis=(0, 1, 2))
    moved = labels.copy()
    moved[new] = Label.ED
    # The plain definition: Euclidean distance (in mm) to the union of both tumours, on the whole array.
    expected = (ndimage.distance_transform_edt(~(old | new), sampling=spacing) <= 4.0) & (moved > 0)
    region = changed_region(moved, old, 4.0, spacing)
    assert np.array_equal(region, expected)
    kept = grown_tumour(old, old.shape, 4.0, spacing)
    assert np.array_equal(changed_region(moved, old, 4.0, spacing, old_grown=kept), expected)
    assert not np.array_equal(kept & (moved > 0), expected)  # the new tumour's growth is added: the test can fail


def test_tissue_moments_give_the_whole_volume_normalisers_after_edits() -> None:
    from MedSynthLib.synthesis.inpainting import TissueMoments, case_normalizers
    from MedSynthLib.synthesis.normalize import HealthyTissueZScore

    rng = np.random.default_rng(5)
    labels = rng.integers(Label.CSF, Label.WM + 1, (20, 24, 22)).astype(np.uint8)
    images = {m: rng.integers(0, 4000, labels.shape).astype(np.int16) for m in MODALITIES}
    moments = TissueMoments(images, labels)
    edited = labels.copy()
    edited[5:9, 6:12, 4:10] = Label.NCR  # a tumour drawn after the moments were taken
    region = np.zeros(labels.shape, bool)
    region[3:12, 4:14, 2:12] = True
    for label_map, exclude in ((labels, np.zeros(labels.shape, bool)), (edited, region), (labels, region)):
        direct = case_normalizers(images, label_map, exclude)
        assert case_normalizers(images, label_map, exclude, moments) == direct
        reference = (label_map >= Label.GM) & (label_map <= Label.WM) & ~exclude
        for m in MODALITIES:  # the moments' statistics are the float64 pass's to rounding
            fitted = HealthyTissueZScore.fit(images[m], reference, "tissue_zscore")
            assert direct[m].mean == pytest.approx(fitted.mean, rel=1e-12)
            assert direct[m].std == pytest.approx(fitted.std, rel=1e-12)
    floats = {m: image.astype(np.float32) + 0.25 for m, image in images.items()}  # not integers: the float pass
    assert case_normalizers(floats, edited, region, TissueMoments(floats, labels)) == \
        case_normalizers(floats, edited, region)


def test_predict_inside_is_the_whole_crop_prediction_at_the_region(tiny_inpainter) -> None:
    from MedSynthLib.synthesis.inpainting import InpaintingEngine

    labels, images, region = _crop()
    for mirror, match in ((True, True), (True, False), (False, True)):
        engine = InpaintingEngine(tiny_inpainter.model, "cpu", "fp32", mirror_average=mirror, match_tissue=match)
        assert np.array_equal(engine.predict_inside(labels, images, region),
                              engine.predict_normalized(labels, images, region)[:, region])


def test_the_condition_is_the_one_hot_labels_blanked_images_and_region() -> None:
    import torch

    from MedSynthLib.synthesis.inpainting import channels_last_condition, inpainting_condition
    from MedSynthLib.schema.labels import NUM_CLASSES

    labels, images, region = _crop()
    labels = labels[:30, :37, :29]  # padded to the size multiple
    images, region = images[:, :30, :37, :29], region[:30, :37, :29]
    built = channels_last_condition(labels, images, region, torch.float32, 16, mirrored=True)
    assert built.shape == (2, 12, 32, 48, 32)
    pad = [(0, 2), (0, 11), (0, 3)]
    onehot = torch.nn.functional.one_hot(torch.from_numpy(np.pad(labels, pad)).long(), NUM_CLASSES)
    plain = inpainting_condition(onehot.permute(3, 0, 1, 2)[None].float(),
                                 torch.from_numpy(np.pad(images, [(0, 0)] + pad, constant_values=-1.0))[None],
                                 torch.from_numpy(np.pad(region, pad))[None, None])
    assert torch.equal(built[0], plain[0])
    mirrored = [a[..., ::-1].copy() for a in (labels, images, region)]
    onehot = torch.nn.functional.one_hot(torch.from_numpy(np.pad(mirrored[0], pad)).long(), NUM_CLASSES)
    plain = inpainting_condition(onehot.permute(3, 0, 1, 2)[None].float(),
                                 torch.from_numpy(np.pad(mirrored[1], [(0, 0)] + pad, constant_values=-1.0))[None],
                                 torch.from_numpy(np.pad(mirrored[2], pad))[None, None])
    assert torch.equal(built[1], plain[0])


# --- what users give `synthesize --context` that does not fit the case -------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory) -> Path:
    """The random-weight inpainting model as a folder for ``--model`` (no training)."""
    return write_tiny_inpainting_model(tmp_path_factory.mktemp("tiny_inpainting_cli") / "model")


def _context_run(labels: Path, context: Path, out: Path, model: Path, *extra: str) -> int:
    return main(["synthesize", str(labels), "-o", str(out), "--context", str(context), "--model", str(model),
                 "--device", "cpu", "--precision", "fp32", *extra])


def _tracked_move(edited: dict[str, Path], folder: Path) -> tuple[Path, Path]:
    """The phantom's label map and its tumour moved 6 voxels, written with a tracked history (as `medsynth tumour`)."""
    labels = read_label_map(edited["labels"])
    labels = LabelMap(labels.array, labels.grid, labels.history)
    moved = labels.with_array(read_label_map(edited["moved"]).array, {"name": "translate", "params": {},
                                                                     "schema_version": 1})
    write_label_map(labels, folder / "labels.nii.gz")
    write_label_map(moved, folder / "moved.nii.gz")
    return folder / "labels.nii.gz", folder / "moved.nii.gz"


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_a_label_map_of_another_brain_is_refused(edited, tiny_model_folder, tmp_path: Path, capsys) -> None:
    # Another patient's label map on the same atlas grid: its brain does not match the case's images.
    moved = read_label_map(edited["moved"])
    other = tmp_path / "other.nii.gz"
    write_label_map(LabelMap(np.roll(moved.array, 5, axis=2), moved.grid, moved.history), other)
    out = tmp_path / "out"
    assert _context_run(other, edited["case"], out, tiny_model_folder) == 2
    err = _one_line(capsys)
    assert str(edited["case"]) in err and "brain" in err and "another case" in err
    assert not out.exists()


def test_an_inpainted_case_is_refused_as_context(edited, tiny_model_folder, tmp_path: Path, capsys) -> None:
    # A second edit on the output of the first: that folder has no segmentation and its synthetic mask would be lost.
    first = tmp_path / "first"
    assert _context_run(edited["moved"], edited["case"], first, tiny_model_folder) == 0
    capsys.readouterr()
    again = tmp_path / "again"
    assert _context_run(first / "labels.nii.gz", first, again, tiny_model_folder) == 2
    err = _one_line(capsys)
    assert str(first) in err and "MedSynth output" in err and "original case" in err
    assert not again.exists()


def test_a_context_without_segmentation_needs_the_old_labels_after_a_move(edited, tiny_model_folder, tmp_path: Path,
                                                                          capsys) -> None:
    import shutil

    labels, moved = _tracked_move(edited, tmp_path)
    case = tmp_path / "noseg" / CASE_IDS[0]
    shutil.copytree(edited["case"], case)
    (case / f"{CASE_IDS[0]}_seg.nii.gz").unlink()
    out = tmp_path / "out"
    # Without a segmentation nothing says where the patient's tumour was: its place would stay in the images.
    assert _context_run(moved, case, out, tiny_model_folder) == 2
    err = _one_line(capsys)
    assert str(case) in err and "--old-labels" in err and not out.exists()
    # With the label map before the edit the old place is re-rendered as well.
    assert _context_run(moved, case, out, tiny_model_folder, "--old-labels", str(labels)) == 0
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "synthetic_mask.nii.gz"))).astype(bool)
    assert mask[tumour_mask(read_label_map(labels).array)].all()
    # A tumour put into a patient who had none (the map `medsynth labels` derived has no tumour, its history says so)
    # needs no old labels; the record says where that came from.
    plain = read_label_map(labels)
    healthy = LabelMap(np.where(tumour_mask(plain.array), Label.WM, plain.array).astype(np.uint8), plain.grid,
                       plain.history[:1])
    inserted = tmp_path / "inserted.nii.gz"
    write_label_map(healthy.with_array(read_label_map(moved).array, {"name": "parametric_tumour", "params": {},
                                                                     "schema_version": 1}), inserted)
    assert read_label_map(inserted).privacy.tumour_dice_to_source is None
    assert _context_run(inserted, case, tmp_path / "out2", tiny_model_folder) == 0
    provenance = json.loads((tmp_path / "out2" / "provenance.json").read_text())
    assert provenance["inpainting"]["old_tumour"] == "label-history"


def test_the_seed_is_recorded_and_the_same_seed_gives_the_same_files(edited, tiny_model_folder, tmp_path: Path) -> None:
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        assert _context_run(edited["moved"], edited["case"], out, tiny_model_folder, "--seed", "7") == 0
    provenance = json.loads((runs[0] / "provenance.json").read_text())
    assert provenance["seed"] == 7 and provenance["seed_effective"] is False
    for name in (*[f"{m}.nii.gz" for m in MODALITIES], "labels.nii.gz", "synthetic_mask.nii.gz"):
        assert (runs[0] / name).read_bytes() == (runs[1] / name).read_bytes()


def test_the_output_is_on_the_context_grid_exactly(edited, tiny_model_folder, tmp_path: Path) -> None:
    # A label map whose origin differs from the case's by less than the grid tolerance (a round trip through
    # another program): accepted, and every written volume keeps the case's own grid, not the label map's.
    moved = read_label_map(edited["moved"])
    grid = moved.grid
    shifted = Grid(grid.size, grid.spacing, (grid.origin[0] + 4e-4,) + tuple(grid.origin[1:]), grid.direction)
    labels = tmp_path / "shifted.nii.gz"
    write_label_map(LabelMap(moved.array, shifted, moved.history), labels)
    out = tmp_path / "out"
    assert _context_run(labels, edited["case"], out, tiny_model_folder) == 0
    real = Grid.from_image(sitk.ReadImage(str(edited["case"] / f"{CASE_IDS[0]}_t1.nii.gz")))
    for name in (*[f"{m}.nii.gz" for m in MODALITIES], "labels.nii.gz", "synthetic_mask.nii.gz"):
        assert Grid.from_image(sitk.ReadImage(str(out / name))) == real, name


def test_old_labels_of_another_brain_are_refused(edited, tiny_model_folder, tmp_path: Path, capsys) -> None:
    # Another case's map as --old-labels: every anatomy voxel "changed", so the whole brain would be re-rendered.
    labels = read_label_map(edited["labels"])
    old = tmp_path / "old_other.nii.gz"
    write_label_map(LabelMap(np.roll(labels.array, 5, axis=2), labels.grid, labels.history), old)
    out = tmp_path / "out"
    assert _context_run(edited["moved"], edited["case"], out, tiny_model_folder, "--old-labels", str(old)) == 2
    err = _one_line(capsys)
    assert "old_other.nii.gz" in err and "brain" in err and not out.exists()


def _scaled_case(edited: dict[str, Path], case: Path, slope: float, inter: float, raw_of) -> Path:
    """The phantom case with its contrasts as a converter writes them: int16 ``raw_of(real)`` scaled by
    ``scl_slope`` / ``scl_inter``, its own units, qform code and description; the segmentation linked."""
    import nibabel as nib

    case.mkdir()
    for source in edited["case"].iterdir():
        if not source.name.endswith(tuple(f"_{m}.nii.gz" for m in MODALITIES)):
            (case / source.name).symlink_to(source)
            continue
        real = nib.load(str(source))
        raw = raw_of(np.asarray(real.dataobj, np.float64))
        image = nib.Nifti1Image(raw, real.affine)
        image.set_qform(real.affine, code=2)
        image.set_sform(real.affine, code=1)
        image.header["xyzt_units"] = 2
        image.header["descrip"] = b"scanner export"
        image.to_filename(str(case / source.name))
        header = nib.load(str(case / source.name)).header  # nibabel recomputes the scaling of an array on save:
        header.set_slope_inter(slope, inter)  # write the stored header and voxels directly, as a converter does
        with nib.openers.ImageOpener(str(case / source.name), "wb") as handle:
            header.write_to(handle)
            nib.volumeutils.array_to_file(raw, handle, np.int16, offset=header.get_data_offset(), order="F")
    return case


def test_the_written_images_are_copies_of_the_real_files_but_for_the_mask(edited, tiny_model_folder,
                                                                        tmp_path: Path) -> None:
    # A scanner's NIfTI as a converter writes it: int16 scaled by scl_slope / scl_inter, its own units, qform code
    # and description.  Outside the mask the written file must be that file: the same header and stored voxels.
    import nibabel as nib

    case = _scaled_case(edited, tmp_path / "scaled_case", 2.0, 10.0,
                        lambda real: np.rint((real - 10.0) / 2.0).astype(np.int16))
    out = tmp_path / "out"
    assert _context_run(edited["moved"], case, out, tiny_model_folder) == 0
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "synthetic_mask.nii.gz"))).astype(bool)
    assert mask.any()
    outside = ~mask.transpose(2, 1, 0)  # nibabel's axis order
    for m in MODALITIES:
        real = nib.load(str(case / f"{CASE_IDS[0]}_{m}.nii.gz"))
        written = nib.load(str(out / f"{m}.nii.gz"))
        headers = []
        for path in (case / f"{CASE_IDS[0]}_{m}.nii.gz", out / f"{m}.nii.gz"):
            with nib.openers.ImageOpener(str(path)) as handle:  # as stored (nibabel's images move the scaling out)
                headers.append(nib.Nifti1Header.from_fileobj(handle))
        assert headers[1].binaryblock == headers[0].binaryblock, m
        assert headers[1].get_slope_inter() == (2.0, 10.0) and written.get_data_dtype() == np.int16
        assert headers[1]["qform_code"] == 2 and headers[1]["xyzt_units"] == 2
        stored, real_stored = written.dataobj.get_unscaled(), real.dataobj.get_unscaled()
        assert np.array_equal(stored[outside], real_stored[outside]), m
        assert not np.array_equal(stored[~outside], real_stored[~outside]), m
        # SimpleITK, as every MedSynth reader, sees the same values outside the mask.
        values = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{m}.nii.gz")))
        real_values = sitk.GetArrayFromImage(sitk.ReadImage(str(case / f"{CASE_IDS[0]}_{m}.nii.gz")))
        assert np.array_equal(values[~mask], real_values[~mask])


def test_the_export_of_an_inpainted_scan_keeps_the_patients_values(edited, tiny_model_folder, tmp_path: Path) -> None:
    # A converter's int16 scaled by 0.25: the patient's values step by a quarter, their peak in the hundreds.
    # Outside the mask the export must carry them as they are (NIfTI and DICOM stored * slope + intercept),
    # not rounded to whole numbers as a synthetic network output may be.
    import pydicom

    case = _scaled_case(edited, tmp_path / "quarter_case", 0.25, 0.0,
                        lambda real: np.where(real > 0, np.rint(4.0 * real) + 1, 0).astype(np.int16))
    out = tmp_path / "out"
    assert _context_run(edited["moved"], case, out, tiny_model_folder) == 0
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "synthetic_mask.nii.gz"))).astype(bool)
    for fmt in ("nifti", "dicom"):
        assert main(["export", str(out), "--format", fmt, "-o", str(tmp_path / fmt)]) == 0
    nifti, dicom = next((tmp_path / "nifti").iterdir()), next((tmp_path / "dicom").iterdir())
    for m, series in zip(MODALITIES, ("T1", "T1ce", "T2", "FLAIR")):
        real = sitk.GetArrayFromImage(sitk.ReadImage(str(case / f"{CASE_IDS[0]}_{m}.nii.gz"))).astype(np.float64)
        assert real.max() >= 256 and not np.array_equal(real, np.round(real))  # rounding would change them
        exported = sitk.GetArrayFromImage(sitk.ReadImage(str(nifti / f"{nifti.name}_{m}.nii.gz")))
        np.testing.assert_array_equal(exported[~mask], real[~mask], err_msg=f"NIfTI {m}")
        slices = sorted((pydicom.dcmread(path) for path in (dicom / series).glob("*.dcm")),
                        key=lambda ds: int(ds.InstanceNumber))
        values = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices])
        np.testing.assert_array_equal(values[~mask], real[~mask], err_msg=f"DICOM {m}")


def test_a_context_volume_on_another_grid_is_refused_without_an_option_synthesize_lacks(edited, tiny_model_folder,
                                                                                        tmp_path: Path, capsys) -> None:
    # The case reader's hint "(use --resample to resample)" is for `medsynth labels` / `info`; `synthesize` has no
    # --resample (argparse refuses it), so its message must say what to do instead.
    case = tmp_path / "shifted_seg" / CASE_IDS[0]
    case.mkdir(parents=True)
    for source in edited["case"].iterdir():
        if source.name.endswith("_seg.nii.gz"):
            seg = sitk.ReadImage(str(source))
            seg.SetOrigin(tuple(o + 0.5 for o in seg.GetOrigin()))
            sitk.WriteImage(seg, str(case / source.name))
        else:
            (case / source.name).symlink_to(source)
    out = tmp_path / "out"
    assert _context_run(edited["moved"], case, out, tiny_model_folder) == 2
    err = _one_line(capsys)
    assert f"{CASE_IDS[0]}_seg.nii.gz" in err and "grid differs" in err and "resample it onto the T1" in err
    assert "--resample" not in err and not out.exists()
    # `medsynth info` has the option: its message keeps the hint.
    assert main(["info", str(case)]) == 2
    assert "--resample" in _one_line(capsys)


def test_a_normalised_scan_with_negative_values_is_not_floored_at_zero(edited, tiny_model_folder,
                                                                       tmp_path: Path) -> None:
    # A preprocessed float scan (brain z-scored, background 0): about half the brain is below 0. The network's
    # output goes back through the case's own normaliser, an affine map, so the inpainted values must be the raw
    # case's mapped the same way, not clamped at 0 (the brain's mean here) as non-negative scanner units are.
    shift, scale = 650.0, 100.0
    case = tmp_path / "zscored" / CASE_IDS[0]
    case.mkdir(parents=True)
    for source in edited["case"].iterdir():
        if not source.name.endswith(tuple(f"_{m}.nii.gz" for m in MODALITIES)):
            (case / source.name).symlink_to(source)
            continue
        image = sitk.ReadImage(str(source))
        raw = sitk.GetArrayFromImage(image).astype(np.float64)
        normalised = sitk.GetImageFromArray(np.where(raw != 0, (raw - shift) / scale, 0.0).astype(np.float32))
        normalised.CopyInformation(image)
        sitk.WriteImage(normalised, str(case / source.name))
    out_raw, out_z = tmp_path / "raw", tmp_path / "z"
    assert _context_run(edited["moved"], edited["case"], out_raw, tiny_model_folder) == 0
    assert _context_run(edited["moved"], case, out_z, tiny_model_folder) == 0
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out_z / "synthetic_mask.nii.gz"))).astype(bool)
    checked = 0
    for m in MODALITIES:
        raw_in = sitk.GetArrayFromImage(sitk.ReadImage(str(edited["case"] / f"{CASE_IDS[0]}_{m}.nii.gz")))
        z_in = sitk.GetArrayFromImage(sitk.ReadImage(str(case / f"{CASE_IDS[0]}_{m}.nii.gz")))[mask]
        z_out = sitk.GetArrayFromImage(sitk.ReadImage(str(out_z / f"{m}.nii.gz")))[mask]
        # Clamped at 0, the voxels painted darker than the brain's mean pile up at exactly 0.
        piled = int(((z_out == 0) & (z_in != 0)).sum())
        assert piled <= 0.01 * mask.sum(), (m, piled)
        floor = float(raw_in[raw_in != 0].min())  # below it the z-scored case has no values to show either
        raw = sitk.GetArrayFromImage(sitk.ReadImage(str(out_raw / f"{m}.nii.gz"))).astype(np.float64)[mask]
        back = z_out.astype(np.float64) * scale + shift
        kept = (raw >= floor) & (z_in != 0)  # a 0 inside the brain reads as the mean in the z-scored case
        error = np.abs(back[kept] - raw[kept])
        assert np.percentile(error, 90) <= 0.02 * scale, (m, np.percentile(error, 90))
        checked += int((kept & (raw < shift)).sum())  # negative in the z-scored case
    assert checked > 100


# --- a user audit of `synthesize --context`: where the old tumour was, an empty region, the output's place ----------


def _noseg_case(edited: dict[str, Path], folder: Path) -> Path:
    """The phantom case without its segmentation (its contrasts linked): its images still show the tumour."""
    case = folder / "noseg" / CASE_IDS[0]
    case.mkdir(parents=True)
    for source in edited["case"].iterdir():
        if not source.name.endswith("_seg.nii.gz"):
            (case / source.name).symlink_to(source)
    return case


def test_a_context_without_segmentation_refuses_a_map_that_cannot_say_where_the_tumour_was(
        edited, tiny_model_folder, tmp_path: Path, capsys) -> None:
    import shutil

    case = _noseg_case(edited, tmp_path)
    # The moved map copied without its .json sidecar: no history, so nothing says where the patient's tumour was.
    # Accepted, its old place stayed in the images, labelled healthy tissue (old_tumour "none").
    nohist = tmp_path / "nohist_moved.nii.gz"
    shutil.copy(edited["moved"], nohist)
    assert read_label_map(nohist).history == []
    out = tmp_path / "out"
    assert _context_run(nohist, case, out, tiny_model_folder) == 2
    err = _one_line(capsys)
    assert str(case) in err and "no history" in err and "--old-labels" in err and not out.exists()
    # A history that begins with `medsynth labels` and goes on, its privacy not measured (an older sidecar): the
    # tumour Dice it implies is only the bound of an unedited map, which does not say the tumour stayed in place.
    labels, moved = _tracked_move(edited, tmp_path)
    sidecar = moved.with_name("moved.json")
    record = json.loads(sidecar.read_text())
    record.pop("privacy", None)
    sidecar.write_text(json.dumps(record))
    assert getattr(read_label_map(moved), "privacy", None) is None and len(read_label_map(moved).history) == 2
    assert _context_run(moved, case, out, tiny_model_folder) == 2
    err = _one_line(capsys)
    assert str(case) in err and "--old-labels" in err and not out.exists()
    # One measured edit that kept the patient's tumour in place (its sub-labels changed): the history says where it
    # was, exactly; after a second edit the recorded Dice of 1.0 is only a bound (moved there and back reads 1.0).
    plain = read_label_map(labels)
    relabelled = np.where(plain.array == Label.ET, Label.NCR, plain.array).astype(np.uint8)
    record = {"name": "translate", "params": {}, "schema_version": 1}
    once = plain.with_array(relabelled, record)
    assert once.privacy.tumour_dice_to_source == 1.0
    write_label_map(once, tmp_path / "once.nii.gz")
    assert _context_run(tmp_path / "once.nii.gz", case, tmp_path / "once_out", tiny_model_folder) == 0
    provenance = json.loads((tmp_path / "once_out" / "provenance.json").read_text())
    assert provenance["inpainting"]["old_tumour"] == "label-history"
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "once_out" / "synthetic_mask.nii.gz"))).astype(bool)
    assert mask[tumour_mask(plain.array)].all()
    twice = once.with_array(plain.array, record)
    assert twice.privacy.tumour_dice_to_source == 1.0
    write_label_map(twice, tmp_path / "twice.nii.gz")
    assert _context_run(tmp_path / "twice.nii.gz", case, tmp_path / "twice_out", tiny_model_folder) == 2
    err = _one_line(capsys)
    assert "2 edits" in err and "--old-labels" in err and not (tmp_path / "twice_out").exists()
    capsys.readouterr()
    # With --old-labels both are inpainted, the patient's tumour's old place included.
    assert _context_run(nohist, case, out, tiny_model_folder, "--old-labels", str(labels)) == 0
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "synthetic_mask.nii.gz"))).astype(bool)
    assert mask[tumour_mask(read_label_map(labels).array)].all()


def test_labels_of_a_case_without_segmentation_do_not_say_the_patient_had_no_tumour(
        edited, tiny_model_folder, tmp_path: Path, capsys) -> None:
    """`medsynth labels` of a case without a segmentation labels its tumour as tissue and recorded a patient without
    a tumour; a tumour put into that map was inpainted with the real tumour left in the images, labelled healthy.
    The record now says whether the case had a segmentation, and only a case that had one vouches for 'no tumour'."""
    case = _noseg_case(edited, tmp_path)
    derived = tmp_path / "noseg_labels.nii.gz"
    assert main(["labels", str(case), "-o", str(derived)]) == 0
    plain = read_label_map(derived)
    assert plain.history[0]["params"]["tumour_segmentation"] is False and not tumour_mask(plain.array).any()
    assert read_label_map(edited["labels"]).history[0]["params"].get("tumour_segmentation") is not False
    drawn = np.where(tumour_mask(read_label_map(edited["moved"]).array) & (plain.array > 0),
                     read_label_map(edited["moved"]).array, plain.array).astype(np.uint8)
    inserted = tmp_path / "inserted.nii.gz"
    write_label_map(plain.with_array(drawn, {"name": "parametric_tumour", "params": {}, "schema_version": 1}),
                    inserted)
    capsys.readouterr()
    out = tmp_path / "out"
    assert _context_run(inserted, case, out, tiny_model_folder) == 2
    err = _one_line(capsys)
    assert str(case) in err and "segmentation" in err and "--old-labels" in err and not out.exists()
    assert "Whole synthetic case" in err  # what a Slicer user, who gives no --old-labels, can do instead
    assert _context_run(inserted, case, out, tiny_model_folder, "--old-labels", str(derived)) == 0


def test_an_inpainting_that_re_renders_nothing_is_refused(edited, tiny_model_folder, tiny_inpainter, tmp_path: Path,
                                                          capsys) -> None:
    import sys

    from MedSynthLib.schema.errors import MedSynthError
    from MedSynthLib.synthesis.inpainting import inpaint_case, read_context

    # The map before the edit is the map: accepted, it wrote the untouched scan as "one region re-rendered", which
    # export then called PARTLY SYNTHETIC.
    out = tmp_path / "same"
    assert _context_run(edited["labels"], edited["case"], out, tiny_model_folder,
                        "--old-labels", str(edited["labels"])) == 2
    err = _one_line(capsys)
    assert "labels.nii.gz" in err and "nothing to re-render" in err and not out.exists()
    # The library that Slicer's worker calls raises a MedSynthError saying so ...
    labels = read_label_map(edited["labels"])
    context = read_context(edited["case"], labels)
    with pytest.raises(MedSynthError, match="nothing to re-render"):
        inpaint_case(tiny_inpainter, labels, context, old_labelmap=labels)
    # ... also when no old map is given: a case without segmentation whose map never had a tumour, unedited.
    case = _noseg_case(edited, tmp_path)
    healthy = labels.with_array(np.where(tumour_mask(labels.array), Label.WM, labels.array).astype(np.uint8))
    healthy = LabelMap(healthy.array, labels.grid, labels.history[:1])
    with pytest.raises(MedSynthError, match="nothing to re-render"):
        inpaint_case(tiny_inpainter, healthy, read_context(case, healthy))
    # ... and the worker reports it as an error event, nothing written.
    sys.path.insert(0, str(REPO / "MedSynth"))
    from MedSynthSlicerLib.jobs import labelmap_request
    from MedSynthSlicerLib.parameters import GenerateOptions
    from MedSynthSlicerLib.protocol import Request, put_array
    from MedSynthSlicerLib.worker import Worker

    events = []
    worker = Worker(tmp_path, events.append)
    params, arrays = labelmap_request(healthy)
    options = GenerateOptions(device="cpu", precision="fp32", inpainting_model=str(tiny_model_folder))
    params = dict(params, out=str(tmp_path / "worker_case"), context=str(case), **options.worker_params())
    worker.handle(Request(1, "generate", params, {k: put_array(tmp_path, v) for k, v in arrays.items()}))
    assert events[-1].type == "error" and "nothing to re-render" in events[-1].text
    assert not (tmp_path / "worker_case").exists()


def test_an_output_inside_the_context_or_the_label_maps_case_folder_is_refused(edited, tiny_model_folder,
                                                                               tmp_path: Path, capsys) -> None:
    import shutil

    case = tmp_path / "casecopy"
    shutil.copytree(edited["case"], case)
    before = sorted(p.name for p in case.rglob("*"))
    for out in (case / "inp", case / "deeper" / "inp", case, tmp_path):
        assert _context_run(edited["moved"], case, out, tiny_model_folder) == 2
        err = _one_line(capsys)
        assert str(out) in err and not (case / "inp").exists() and not (case / "deeper").exists()
    assert sorted(p.name for p in case.rglob("*")) == before
    # A label map kept in a case folder: the output is not written beside it either.
    holder = tmp_path / "holder" / CASE_IDS[0]
    shutil.copytree(edited["case"], holder)
    for name in ("moved.nii.gz", "moved.json"):
        shutil.copy(edited["moved"].with_name(name), holder / name)
    assert _context_run(holder / "moved.nii.gz", edited["case"], holder / "inp", tiny_model_folder) == 2
    err = _one_line(capsys)
    assert str(holder) in err and "inside" in err and not (holder / "inp").exists()
    # A label map in a plain folder: the output beside it is fine.
    assert _context_run(edited["moved"], edited["case"], tmp_path / "fine", tiny_model_folder) == 0


def test_the_old_labels_hash_is_recorded_typed_and_kept_local(edited, tiny_model_folder, tmp_path: Path) -> None:
    from MedSynthLib.schema.provenance import Redactions, SynthesisRecord, array_sha256

    out = tmp_path / "out"
    assert _context_run(edited["moved"], edited["case"], out, tiny_model_folder, "--old-labels",
                        str(edited["labels"])) == 0
    provenance = json.loads((out / "provenance.json").read_text())
    expected = array_sha256(read_label_map(edited["labels"]).array)
    assert provenance["inpainting"]["old_tumour"] == "old-labels"
    assert provenance["inpainting"]["old_labels_sha256"] == expected
    redacted = Redactions()
    record = SynthesisRecord.from_json(provenance, redacted)
    assert redacted.count == 0 and record.inpainting.old_labels_sha256 == expected
    assert record.to_json()["inpainting"]["old_labels_sha256"] == expected
    # Not exported: a hash of the patient's own label map, as insert_tumour's source_labels_sha256.
    assert "old_labels_sha256" not in record.to_json(for_export=True)["inpainting"]
    assert main(["export", str(out), "--format", "nifti", "-o", str(tmp_path / "export")]) == 0
    exported = json.loads(next((tmp_path / "export").rglob("provenance.json")).read_text())
    assert exported["inpainting"]["old_tumour"] == "old-labels" and "old_labels_sha256" not in exported["inpainting"]
