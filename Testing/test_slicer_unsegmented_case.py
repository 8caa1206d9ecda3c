"""Generate and the preview of a real case loaded without a tumour segmentation, on a real MRML scene.

A case folder with the four contrasts only (a healthy brain, or a patient whose tumour nobody segmented) is loaded
into a ``vtkMRMLScene`` (PyPI ``slicer-core``), prepared (the real anatomy model), edited with MedSynth's tools and
inpainted by the real worker with a tiny random-weight inpainting model.  MedSynthLib cannot tell where such a
patient's tumour was from the label map alone; the module knows the map as it was prepared, before the user's
edits, and sends it as the old labels: the region is what the user changed, the provenance says ``old-labels``, and
the log says once that a tumour nobody segmented stays in the images.  That map is kept with the scene (saved and
opened again here); where it is not known, the preview refuses with Generate's reason, and the panel words these
refusals without command-line options.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MedSynth"))

from test_slicer_logic import _require_slicer_core  # noqa: E402  (skips without slicer-core, as its tests do)

_require_slicer_core()

from conftest import write_phantom_case  # noqa: E402
from MedSynthLib.edits import Translate  # noqa: E402
from MedSynthLib.schema.labels import MODALITIES, tumour_mask  # noqa: E402
from MedSynthLib.schema.provenance import array_sha256  # noqa: E402
from MedSynthLib.synthesis.inpainting import DEFAULT_MARGIN_MM, changed_region  # noqa: E402
from MedSynthSlicerLib import mrml  # noqa: E402
from MedSynthSlicerLib.errors import WorkflowError  # noqa: E402
from MedSynthSlicerLib.logic import WorkflowLogic  # noqa: E402
from MedSynthSlicerLib.parameters import GenerateOptions, TumourParameters  # noqa: E402
from test_inpainting import write_tiny_inpainting_model  # noqa: E402

#: A word of the one log line that says a tumour nobody segmented stays in the patient's images.
UNSEGMENTED = "tumour elsewhere"


class Scene:
    """One scene: a phantom case folder without its segmentation, loaded; the tiny inpainting model."""

    def __init__(self, root: Path) -> None:
        folder = write_phantom_case(root / "cases", 0, "BraTS2021_00000")
        # The expert segmentation moves out of the case folder: a tumour drawn outside MedSynth, given at prepare.
        self.seg_file = Path(shutil.move(str(folder / "BraTS2021_00000_seg.nii.gz"), root / "drawn_tumour.nii.gz"))
        self.folder = folder
        self.model = write_tiny_inpainting_model(root / "tiny-inpainting")
        self.scene, self.logics = mrml.create_headless_scene()
        self.logic = WorkflowLogic(self.scene, work_dir=root / "work")
        self.log: list[str] = []
        self.logic.log.connect(self.log.append)
        self.nodes = self.logic.load_case(folder)
        assert self.nodes["tumour"] is None
        self.others = {m: self.nodes[m] for m in ("t1ce", "t2", "flair")}
        self.healthy = self.logic.prepare(self.nodes["t1"], None, "brats2021", self.others, name="no tumour")
        self.real = {m: mrml.array_from_volume(self.nodes[m]) for m in MODALITIES}

    def options(self) -> GenerateOptions:
        return GenerateOptions(device="cpu", seed=5, inpainting_model=str(self.model))

    def warnings(self) -> list[str]:
        return [line for line in self.log if UNSEGMENTED in line]


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    scene = Scene(tmp_path_factory.mktemp("unsegmented"))
    yield scene
    scene.logic.cleanup()


def _centre_ras(node, kji) -> np.ndarray:
    return (mrml.ijk_to_ras(node) @ np.append(np.asarray(kji, float)[::-1], 1.0))[:3]


def _expected_region(before: np.ndarray, after) -> np.ndarray:
    return changed_region(after.array, tumour_mask(before), DEFAULT_MARGIN_MM, tuple(after.grid.spacing[::-1]), before)


def _generated(state: Scene, segmentation) -> tuple[dict, Path, dict]:
    outputs = state.logic.generate(segmentation, state.options(), timeout_s=300)
    folder = state.logic.case_folder(outputs)
    return outputs, folder, json.loads((folder / "provenance.json").read_text())


def test_a_tumour_added_to_a_case_without_segmentation_is_inpainted(state):
    """Before: refused by the worker ('has no tumour segmentation ... give --old-labels'), though the module
    holds the map before the edit.  Now the region is exactly what changed since the map was prepared."""
    seg = state.logic.copy_labels(state.healthy, "added tumour")
    prepared = state.logic.labelmap(seg).array.copy()
    state.logic.add_parametric_tumour(seg, _centre_ras(state.nodes["t1"], (22, 24, 20)),
                                      TumourParameters(radius_mm=5.0, oedema_mm=3.0))
    edited = state.logic.labelmap(seg)
    del state.log[:]
    outputs, folder, provenance = _generated(state, seg)
    record = provenance["inpainting"]
    assert record["old_tumour"] == "old-labels"
    assert record["old_labels_sha256"] == array_sha256(prepared)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "synthetic_mask.nii.gz"))) > 0
    region = _expected_region(prepared, edited)
    assert region.any() and np.array_equal(mask, region)
    for modality, node in outputs.items():
        assert node.GetAttribute("MedSynth.Images") == "patient"
        image = mrml.array_from_volume(node)
        assert np.array_equal(image[~region], state.real[modality][~region])
        assert (image[region] != state.real[modality][region]).any()
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labels.nii.gz")))
    assert np.array_equal(written, edited.array)  # the patient's unsegmented tissue stays labelled healthy
    assert len(state.warnings()) == 1, state.log

    # The preview of the same edit is what Generate wrote, and says it once too.
    del state.log[:]
    previews = state.logic.preview(seg, state.options(), timeout_s=300)
    for modality, node in previews.items():
        np.testing.assert_array_equal(mrml.array_from_volume(node), mrml.array_from_volume(outputs[modality]))
    assert len(state.warnings()) == 1, state.log
    mrml.remove_nodes(state.scene, *outputs.values(), *previews.values())
    state.logic.close_preview()


def test_a_tumour_given_at_prepare_and_erased_is_re_rendered_in_generate_and_the_preview(state):
    """A tumour drawn outside MedSynth (not in the case folder) given at prepare, then erased with the Segment
    Editor.  Before: Generate was refused, and the preview re-rendered nothing (no tumour left to grow a region
    from): the patient's tumour stayed in the preview, now labelled healthy.  Now its place is re-rendered, in
    Generate and in the preview alike."""
    drawn = mrml.read_volume(state.scene, str(state.seg_file), "drawn tumour", labelmap=True)
    seg = state.logic.prepare(state.nodes["t1"], drawn, "brats2021", state.others, name="drawn tumour")
    prepared = state.logic.labelmap(seg).array.copy()
    opts = state.options()
    state.logic.preview(seg, opts, timeout_s=300)  # the unedited case: the patient's own images
    del state.log[:]
    erased = np.where(tumour_mask(prepared), 0, prepared).astype(np.uint8)  # strokes of the eraser
    mrml.set_segmentation_labels(seg, erased, state.logic.reference_volume(seg))
    healthy = state.logic.labelmap(seg)  # the erased voxels refilled with healthy anatomy
    assert not tumour_mask(healthy.array).any()
    previews = state.logic.preview(seg, opts, timeout_s=300)
    region = _expected_region(prepared, healthy)
    old_place = tumour_mask(prepared)
    assert old_place.any() and region[old_place].all()
    for modality, node in previews.items():
        image = mrml.array_from_volume(node)
        assert np.array_equal(image[~region], state.real[modality][~region].astype(np.float32))
        assert (image[old_place] != state.real[modality][old_place]).any()  # the old place re-rendered
    outputs, folder, provenance = _generated(state, seg)
    assert provenance["inpainting"]["old_tumour"] == "old-labels"
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "synthetic_mask.nii.gz"))) > 0
    assert np.array_equal(mask, region)
    for modality, node in outputs.items():
        np.testing.assert_array_equal(mrml.array_from_volume(previews[modality]), mrml.array_from_volume(node))
    mrml.remove_nodes(state.scene, *outputs.values(), *previews.values())
    state.logic.close_preview()


def test_a_scene_read_again_takes_an_unedited_map_as_the_map_before_the_edits(state):
    """A new session on the scene (a saved scene opened again): a label map with no edit in its history is the map
    as prepared; an edit made in the new session is then inpainted as in the first."""
    seg = state.logic.copy_labels(state.healthy, "read again")
    later = WorkflowLogic(state.scene, work_dir=state.logic.work_dir / "later")
    log: list[str] = []
    later.log.connect(log.append)
    try:
        prepared = later.labelmap(seg).array.copy()
        later.add_parametric_tumour(seg, _centre_ras(state.nodes["t1"], (20, 22, 24)),
                                    TumourParameters(radius_mm=4.0, oedema_mm=2.0))
        outputs = later.generate(seg, state.options(), timeout_s=300)
        provenance = json.loads((later.case_folder(outputs) / "provenance.json").read_text())
        assert provenance["inpainting"]["old_tumour"] == "old-labels"
        assert provenance["inpainting"]["old_labels_sha256"] == array_sha256(prepared)
        assert sum(UNSEGMENTED in line for line in log) == 1, log
        mrml.remove_nodes(state.scene, *outputs.values())
    finally:
        later.cleanup()


def _forget_the_stored_map_before_the_edits(segmentation) -> None:
    """The segmentation as a scene saved before MedSynth kept the map before the edits with it."""
    for name in segmentation.GetAttributeNames() or ():
        if "BeforeEdits" in name:
            segmentation.RemoveAttribute(name)


def test_an_edited_map_read_by_a_new_session_is_still_refused(state):
    """An edited map whose state before the edits this session never saw (a scene saved by a MedSynth that did not
    keep it): the worker's refusal stands (one line, the scene as it was) rather than a guess at the map before the
    edits, and the preview refuses with the same reason.  Before: the preview inpainted around the new tumour only,
    silently, where Generate was refused.  The reason is said in Slicer terms (no --old-labels)."""
    seg = state.logic.copy_labels(state.healthy, "edited before")
    state.logic.add_parametric_tumour(seg, _centre_ras(state.nodes["t1"], (22, 24, 20)),
                                      TumourParameters(radius_mm=4.0, oedema_mm=2.0))
    _forget_the_stored_map_before_the_edits(seg)
    later = WorkflowLogic(state.scene, work_dir=state.logic.work_dir / "later2")
    try:
        before = mrml.node_ids(state.scene)
        with pytest.raises(WorkflowError, match="no tumour segmentation") as generate:
            later.generate(seg, state.options(), timeout_s=300)
        assert mrml.node_ids(state.scene) == before
        with pytest.raises(WorkflowError) as preview:
            later.preview(seg, state.options(), timeout_s=300)
        assert mrml.node_ids(state.scene) == before  # no preview volumes showing a guess
        generate_reason = str(generate.value).removeprefix("synthesis failed: ")
        assert str(preview.value) == f"preview failed: {generate_reason}"
        assert "--" not in generate_reason and "\n" not in generate_reason, generate_reason
        assert "Whole synthetic case" in generate_reason  # what the user can do in Slicer
    finally:
        later.cleanup()


def test_undo_back_to_the_prepared_map_is_refused_in_slicer_terms(state):
    """An edit undone: the map equals the map before the edits.  Before: Generate was refused with the library's
    '... equals the label map before the edit (--old-labels) ...', meaningless in Slicer (the filter took out the
    option, leaving 'the label map before the edit' unexplained).  Now the panel says nothing was edited."""
    seg = state.logic.copy_labels(state.healthy, "undone")
    state.logic.add_parametric_tumour(seg, _centre_ras(state.nodes["t1"], (22, 24, 20)),
                                      TumourParameters(radius_mm=4.0, oedema_mm=2.0))
    state.logic.undo(seg)
    before = mrml.node_ids(state.scene)
    with pytest.raises(WorkflowError) as refused:
        state.logic.generate(seg, state.options(), timeout_s=300)
    message = str(refused.value)
    assert "nothing was edited" in message and "draw, move or erase a tumour first" in message, message
    assert "--" not in message and "old-labels" not in message, message
    assert mrml.node_ids(state.scene) == before


def _save_scene(scene, folder: Path) -> Path:
    """Save a scene as Slicer's Save dialog does: every volume and segmentation through a storage node into
    ``folder`` (never over the case's own files), then the .mrml."""
    folder.mkdir()
    for node in mrml.nodes_by_class(scene, "vtkMRMLStorableNode"):
        if not (node.IsA("vtkMRMLVolumeNode") or node.IsA("vtkMRMLSegmentationNode")):
            continue
        if node.GetStorageNode() is None:
            node.AddDefaultStorageNode()
        storage = node.GetStorageNode()
        storage.SetFileName(str(folder / f"{node.GetID()}{'.seg' if node.IsA('vtkMRMLSegmentationNode') else ''}.nrrd"))
        assert storage.WriteData(node), node.GetName()
    scene.SetURL(str(folder / "scene.mrml"))
    assert scene.Commit()
    return folder / "scene.mrml"


def test_a_scene_saved_after_an_edit_and_opened_again_is_still_inpainted(state, tmp_path):
    """Before: the map before the edits lived in the session only, so a scene saved after an edit and opened again
    could not be inpainted (Generate refused, the preview guessed).  Now it is kept with the scene (a hidden label
    map volume the label segmentation references), and the reopened scene is inpainted around every edit made
    since the map was prepared, in Generate and the preview alike."""
    seg = state.logic.copy_labels(state.healthy, "saved after an edit")
    prepared = state.logic.labelmap(seg).array.copy()
    state.logic.add_parametric_tumour(seg, _centre_ras(state.nodes["t1"], (22, 24, 20)),
                                      TumourParameters(radius_mm=5.0, oedema_mm=3.0))
    edited = state.logic.labelmap(seg).array.copy()
    url = _save_scene(state.scene, tmp_path / "saved")

    scene, _logics = mrml.create_headless_scene()
    scene.SetURL(str(url))
    assert scene.Import()
    reopened = next(n for n in mrml.nodes_by_class(scene, "vtkMRMLSegmentationNode") if n.GetName() == seg.GetName())
    logic = WorkflowLogic(scene, work_dir=tmp_path / "work")
    log: list[str] = []
    logic.log.connect(log.append)
    try:
        after = logic.labelmap(reopened)
        assert np.array_equal(after.array, edited)
        outputs = logic.generate(reopened, state.options(), timeout_s=300)
        folder = logic.case_folder(outputs)
        provenance = json.loads((folder / "provenance.json").read_text())
        assert provenance["inpainting"]["old_tumour"] == "old-labels"
        assert provenance["inpainting"]["old_labels_sha256"] == array_sha256(prepared)
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "synthetic_mask.nii.gz"))) > 0
        assert np.array_equal(mask, _expected_region(prepared, after))
        previews = logic.preview(reopened, state.options(), timeout_s=300)
        for modality, node in previews.items():
            np.testing.assert_array_equal(mrml.array_from_volume(node), mrml.array_from_volume(outputs[modality]))
    finally:
        logic.cleanup()
        scene.Clear(1)

    # The saved map changed outside MedSynth (it no longer is the map its hash names): no guess, refused.
    scene, _logics = mrml.create_headless_scene()
    scene.SetURL(str(url))
    assert scene.Import()
    reopened = next(n for n in mrml.nodes_by_class(scene, "vtkMRMLSegmentationNode") if n.GetName() == seg.GetName())
    reopened.SetAttribute(mrml.BEFORE_EDITS_SHA256_ATTRIBUTE, array_sha256(edited))
    logic = WorkflowLogic(scene, work_dir=tmp_path / "work2")
    try:
        with pytest.raises(WorkflowError, match="no tumour segmentation"):
            logic.generate(reopened, state.options(), timeout_s=300)
    finally:
        logic.cleanup()
        scene.Clear(1)


def test_a_copy_keeps_the_map_before_the_edits_of_its_source(state):
    """A copy made after an edit continues its source's history: its map before the edits is the source's, not the
    edited map it was copied from (else the first edit would drop out of the region)."""
    seg = state.logic.copy_labels(state.healthy, "source")
    prepared = state.logic.labelmap(seg).array.copy()
    state.logic.add_parametric_tumour(seg, _centre_ras(state.nodes["t1"], (22, 24, 20)),
                                      TumourParameters(radius_mm=4.0, oedema_mm=2.0))
    copy = state.logic.copy_labels(seg, "copy of the edited")
    state.logic.apply_edit(copy, Translate((0.0, 3.0, 0.0)))
    outputs, folder, provenance = _generated(state, copy)
    assert provenance["inpainting"]["old_labels_sha256"] == array_sha256(prepared)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "synthetic_mask.nii.gz"))) > 0
    assert np.array_equal(mask, _expected_region(prepared, state.logic.labelmap(copy)))
    mrml.remove_nodes(state.scene, *outputs.values())


def test_a_case_with_its_segmentation_keeps_it_as_the_old_tumour(tmp_path):
    """The rule is for a case without a segmentation only: a case folder holding one is inpainted around it, as
    before, and nothing is said about unsegmented tumours."""
    folder = write_phantom_case(tmp_path / "cases", 1, "BraTS2021_00001")
    model = write_tiny_inpainting_model(tmp_path / "tiny-inpainting")
    scene, _logics = mrml.create_headless_scene()
    logic = WorkflowLogic(scene, work_dir=tmp_path / "work")
    log: list[str] = []
    logic.log.connect(log.append)
    try:
        nodes = logic.load_case(folder)
        seg = logic.prepare(nodes["t1"], nodes["tumour"], "brats2021", {m: nodes[m] for m in ("t1ce", "t2", "flair")})
        logic.apply_edit(seg, Translate((0.0, 4.0, 0.0)))
        outputs = logic.generate(seg, GenerateOptions(device="cpu", inpainting_model=str(model)), timeout_s=300)
        provenance = json.loads((logic.case_folder(outputs) / "provenance.json").read_text())
        assert provenance["inpainting"]["old_tumour"] == "case-segmentation"
        assert provenance["inpainting"].get("old_labels_sha256") is None
        assert not [line for line in log if UNSEGMENTED in line], log
    finally:
        logic.cleanup()
