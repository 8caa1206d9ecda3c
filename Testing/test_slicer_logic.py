"""The Slicer module's Logic on real MRML (PyPI ``slicer-core``), without Qt.

A real BraTS 2021 case is loaded into a ``vtkMRMLScene`` through storage nodes,
then prepare -> edit -> generate (the real ``medsynth synthesize`` in a real
subprocess, with a tiny random-weight model) -> review -> export run as in the
module.  Asserted: geometry (IJK-to-RAS matrices equal), segment names and
colours, outputs on the input grid, inputs unchanged, cancel ends the process
tree, and every bad input leaves the scene as it was.

Real data: ``../shared/data`` (or ``$MEDSYNTH_DATA``); skipped with a reason
when absent, a failure under CI (``CI=true``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MedSynth"))


def _require_slicer_core():
    try:
        import slicer

        slicer.vtkMRMLScene  # noqa: B018
    except (ImportError, AttributeError) as exc:
        message = f"slicer-core is not installed ({exc}); pip install -e '.[test]'"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


_require_slicer_core()

from MedSynthLib.edits import Translate, euler_xyz_from_rotation, rotation_ras  # noqa: E402
from MedSynthLib.schema.grid import Grid, lps_to_ras  # noqa: E402
from MedSynthLib.schema.labels import LABEL_INFO, Label, tumour_to_schema  # noqa: E402
from MedSynthSlicerLib import mrml  # noqa: E402
from MedSynthSlicerLib.errors import CancelledError, WorkflowError  # noqa: E402
from MedSynthSlicerLib.logic import (MANUAL_EDIT, REVIEW_VIEWS, WorkflowLogic,  # noqa: E402
                                     linear_edits_for_matrix, segment_label)
from MedSynthSlicerLib.parameters import GenerateOptions, TumourParameters  # noqa: E402
from MedSynthSlicerLib.process import group_pids, pid_alive  # noqa: E402

import slicer  # noqa: E402
import vtk  # noqa: E402

SEGMENTS = ["CSF", "GM", "WM", "NCR", "ED", "ET"]


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from MedSynthLib.synthesis.models import write_model
    from MedSynthLib.synthesis.networks import Generator, NetworkConfig

    config = NetworkConfig(channels=(4, 8), strides=(2,), disc_channels=4, disc_layers=2)
    folder = tmp_path_factory.mktemp("model") / "tiny"
    write_model(folder, Generator(config).state_dict(),
                {"name": "tiny", "network": config.to_json(),
                 "intensity": {m: {"low": 0.0, "high": 1000.0} for m in ("t1", "t1ce", "t2", "flair")}})
    return folder


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Case:
    """The module-wide state: a scene holding one real case and its prepared label segmentation."""

    def __init__(self, folder: Path, work: Path):
        self.folder = folder
        self.scene, self.logics = mrml.create_headless_scene()
        self.logic = WorkflowLogic(self.scene, work_dir=work)
        self.log: list[str] = []
        self.logic.log.connect(self.log.append)
        self.nodes = self.logic.load_case(folder)
        self.files = {p: _sha(p) for p in sorted(folder.iterdir())}
        self.inputs = {m: self.nodes[m] for m in ("t1", "t1ce", "t2", "flair")}
        self.inputs["tumour"] = self.nodes["tumour"]
        self.before = {m: (mrml.array_from_volume(n), mrml.ijk_to_ras(n)) for m, n in self.inputs.items()}
        self.seg = self.logic.prepare(self.nodes["t1"], self.nodes["tumour"], "brats2021",
                                      {m: self.nodes[m] for m in ("t1ce", "t2", "flair")})
        self.outputs: dict = {}

    def assert_inputs_unchanged(self):
        for modality, node in self.inputs.items():
            assert self.scene.IsNodePresent(node)
            array, matrix = self.before[modality]
            np.testing.assert_array_equal(mrml.array_from_volume(node), array)
            np.testing.assert_array_equal(mrml.ijk_to_ras(node), matrix)
        assert {p: _sha(p) for p in sorted(self.folder.iterdir())} == self.files


@pytest.fixture(scope="module")
def case(brats_cases, tmp_path_factory) -> Case:
    state = Case(brats_cases[0], tmp_path_factory.mktemp("work"))
    yield state
    state.logic.cleanup()


@pytest.fixture()
def outputs(case, tiny_model) -> dict:
    """The synthetic case of the module's label map: made once, by whichever test needs it first."""
    if not case.outputs or not all(case.scene.IsNodePresent(n) for n in case.outputs.values()):
        # A whole synthetic case (for a loaded real case the default is inpainting).
        options = GenerateOptions(model=str(tiny_model), device="cpu", inpaint=False, seed=7)
        case.outputs = case.logic.generate(case.seg, options)
    return case.outputs


def _ids(scene) -> list[str]:
    return mrml.node_ids(scene)


def _tumour_centre_ras(labels: np.ndarray, matrix: np.ndarray, classes=(4, 5, 6)) -> np.ndarray:
    kji = np.argwhere(np.isin(labels, classes)).mean(axis=0)
    return (matrix @ np.append(kji[::-1], 1.0))[:3]


# --- 1. input ------------------------------------------------------------------------------------


@pytest.mark.realdata
def test_case_is_loaded_through_storage_nodes_on_the_files_grid(case):
    for modality in ("t1", "t1ce", "t2", "flair"):
        node = case.nodes[modality]
        storage = node.GetStorageNode()
        assert storage is not None and storage.IsA("vtkMRMLVolumeArchetypeStorageNode")
        path = Path(storage.GetFileName())
        assert path.parent == case.folder and f"_{modality}." in path.name
        image = sitk.ReadImage(str(path))
        assert Grid.from_image(image).difference(mrml.grid_from_volume(node)) is None
        np.testing.assert_array_equal(mrml.array_from_volume(node), sitk.GetArrayFromImage(image))
    tumour = case.nodes["tumour"]
    assert tumour.IsA("vtkMRMLLabelMapVolumeNode")
    assert tumour.GetAttribute("MedSynth.LabelConvention") == "brats2021"
    np.testing.assert_array_equal(mrml.ijk_to_ras(tumour), mrml.ijk_to_ras(case.nodes["t1"]))


@pytest.mark.realdata
def test_template_brain_in_one_click(case):
    from MedSynthLib.cases.template import template_label_map

    ids = _ids(case.scene)
    t1 = case.logic.load_template()
    seg = case.logic.prepare(t1)
    labels = case.logic.labelmap(seg)
    template = template_label_map()
    np.testing.assert_array_equal(labels.array, template.array)
    assert template.grid.difference(labels.grid) is None
    assert labels.history[0]["name"] == "template_labels"
    mrml.remove_nodes(case.scene, seg, t1)
    assert _ids(case.scene) == ids


# --- 2. prepare ----------------------------------------------------------------------------------


@pytest.mark.realdata
def test_prepared_segments_have_the_schema_names_colours_and_locks(case):
    seg = case.seg
    assert mrml.segment_names(seg) == SEGMENTS
    for label in Label:
        if label == Label.BACKGROUND:
            continue
        info = LABEL_INFO[label]
        segment = seg.GetSegmentation().GetSegment(info.short_name)
        assert segment.GetName() == info.short_name
        np.testing.assert_allclose(segment.GetColor(), info.color, atol=1e-6)
        assert mrml.get_tag(segment, mrml.FULL_NAME_TAG) == info.name
        assert mrml.get_tag(segment, mrml.LABEL_VALUE_TAG) == str(int(label))
        locked = label in (Label.CSF, Label.GM, Label.WM)
        assert mrml.get_tag(segment, mrml.LOCKED_TAG) == ("1" if locked else "0")
    assert sorted(case.logic.locked_labels(seg)) == [1, 2, 3]
    # the segmentation lives on the T1's grid, exactly
    matrix, extent = mrml.segmentation_geometry(seg)
    np.testing.assert_array_equal(matrix, mrml.ijk_to_ras(case.nodes["t1"]))
    dims = case.nodes["t1"].GetImageData().GetDimensions()
    assert extent == (0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
    assert case.logic.reference_volume(seg) is case.nodes["t1"]


@pytest.mark.realdata
def test_only_medsynth_label_maps_are_label_segmentations(case):
    """The panel's label selector offered every segmentation: the handles' moving copy, a tumour input, any
    segmentation in the scene.  The rule now: role ``labels`` (what the selector's attribute filter shows);
    every label map MedSynth makes has it, and a segmentation drawn by hand can be adopted."""
    from MedSynthLib.cases.template import template_label_map

    ids = _ids(case.scene)
    assert mrml.is_label_segmentation(case.seg)  # a loaded case, prepared
    t1 = case.logic.load_template()
    template_seg = case.logic.prepare(t1)  # the healthy template, prepared
    copy = case.logic.copy_labels(case.seg, "variant")
    assert mrml.is_label_segmentation(template_seg) and mrml.is_label_segmentation(copy)
    transform = case.logic.begin_tumour_transform(copy)
    moving = case.scene.GetNodeByID(copy.GetAttribute("MedSynth.MovingNodeID"))
    assert moving.IsA("vtkMRMLSegmentationNode") and not mrml.is_label_segmentation(moving)
    case.logic.cancel_tumour_transform(copy)
    assert not mrml.is_label_segmentation(case.nodes["tumour"]) and not mrml.is_label_segmentation(None)
    assert not mrml.is_label_segmentation(t1)
    offered = [n for n in mrml.nodes_by_class(case.scene, "vtkMRMLSegmentationNode") if mrml.is_label_segmentation(n)]
    assert offered == [case.seg, template_seg, copy]
    assert transform is not None

    # drawn by hand (Segment Editor: a new segmentation on the template, segments named as MedSynth's)
    by_hand = mrml.segmentation_from_labels(case.scene, template_label_map().array, t1, "drawn by hand")
    seg = by_hand.GetSegmentation()
    for sid in [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]:
        # the Segment Editor's IDs, not MedSynth's: only the names say what a segment is
        segment = seg.GetSegment(sid)
        seg.RemoveSegment(sid)
        seg.AddSegment(segment, f"Segment_{sid}")
    assert not mrml.is_label_segmentation(by_hand)
    attributes = {a: by_hand.GetAttribute(a) for a in by_hand.GetAttributeNames()}
    adopted = case.logic.adopt_labels(by_hand)
    assert adopted is not by_hand and mrml.is_label_segmentation(adopted)
    assert adopted.GetAttribute(mrml.CONVENTION_ATTRIBUTE) == "brats2021"
    np.testing.assert_array_equal(case.logic.labelmap(adopted).array, template_label_map().array)
    # the user's node is read only: no attribute added, segments as drawn
    assert {a: by_hand.GetAttribute(a) for a in by_hand.GetAttributeNames()} == attributes
    assert not mrml.is_label_segmentation(by_hand) and seg.GetSegment("Segment_CSF") is not None
    # MedSynth's segments, so the anatomy lock finds them
    case.logic.set_anatomy_locked(adopted, False)
    assert case.logic.locked_labels(adopted) == []
    case.logic.set_anatomy_locked(adopted, True)
    assert sorted(case.logic.locked_labels(adopted)) == [1, 2, 3]
    # one it cannot read is refused, and not marked
    unknown = mrml.segmentation_from_labels(case.scene, template_label_map().array, t1, "with a liver")
    unknown.GetSegmentation().AddEmptySegment("Liver", "Liver")
    before = _ids(case.scene)
    with pytest.raises(WorkflowError, match="'Liver'"):
        case.logic.adopt_labels(unknown)
    assert not mrml.is_label_segmentation(unknown) and unknown.GetAttribute(mrml.CONVENTION_ATTRIBUTE) is None
    with pytest.raises(WorkflowError):
        case.logic.adopt_labels(case.nodes["tumour"])  # not a segmentation
    assert _ids(case.scene) == before  # nothing added by a refusal
    mrml.remove_nodes(case.scene, unknown, adopted, by_hand, copy, template_seg, t1)
    assert _ids(case.scene) == ids


@pytest.mark.realdata
def test_prepared_label_map_keeps_the_expert_tumour_exactly(case):
    labels = case.logic.labelmap(case.seg)
    seg_file = next(p for p in case.folder.iterdir() if p.name.endswith("_seg.nii.gz"))
    expert = tumour_to_schema(sitk.GetArrayFromImage(sitk.ReadImage(str(seg_file))), "brats2021")
    tumour = labels.array >= Label.NCR
    np.testing.assert_array_equal(tumour, expert > 0)
    np.testing.assert_array_equal(labels.array[tumour], expert[tumour])
    brain = labels.array > 0
    assert set(np.unique(labels.array[brain & ~tumour])) <= {1, 2, 3}
    assert labels.history[0]["name"] == "derive_labels"
    assert labels.grid.difference(mrml.grid_from_volume(case.nodes["t1"])) is None
    case.assert_inputs_unchanged()


def test_segment_names_map_to_the_schema():
    assert segment_label("NCR") == 4 and segment_label("necrosis") == 4
    assert segment_label("Peritumoural oedema") == 5 and segment_label("edema") == 5
    assert segment_label("Enhancing tumor") == 6 and segment_label("grey_matter") == 2
    assert segment_label("Segment_4", "brats2021") == 6 and segment_label("Segment_3", "brats2023") == 6
    assert segment_label("Segment_3", "brats2021") is None
    assert segment_label("Liver") is None


# --- 3. tumour tools -------------------------------------------------------------------------------


@pytest.mark.realdata
def test_tumour_handles_are_applied_as_recorded_edits(case):
    from MedSynthLib.edits import replay

    seg = case.logic.copy_labels(case.seg, "handles")
    start = case.logic.labelmap(seg)
    ids = _ids(case.scene)
    transform = case.logic.begin_tumour_transform(seg)
    display = transform.GetDisplayNode()
    assert display.GetEditorVisibility() and display.GetEditorRotationEnabled() and display.GetEditorScalingEnabled()
    moving = case.scene.GetNodeByID(seg.GetAttribute("MedSynth.MovingNodeID"))
    assert mrml.segment_names(moving) == ["NCR", "ED", "ET"]
    assert moving.GetTransformNodeID() == transform.GetID()
    centre = np.array(transform.GetCenterOfTransformation())
    np.testing.assert_allclose(centre, lps_to_ras(__import__("MedSynthLib.edits", fromlist=["x"]).tumour_centre(start)))
    for name in ("NCR", "ED", "ET"):
        assert not seg.GetDisplayNode().GetSegmentVisibility(name)

    # what the interaction handles produce: rotate + scale about the centre, then drag
    linear = rotation_ras((0.0, 0.0, 15.0)) @ np.diag([1.1, 1.1, 1.1])
    brain_centre = _tumour_centre_ras(start.array, mrml.ijk_to_ras(case.nodes["t1"]), (1, 2, 3, 4, 5, 6))
    drag = 6.0 * (brain_centre - centre) / np.linalg.norm(brain_centre - centre)
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = centre - linear @ centre + drag
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    edited = case.logic.apply_tumour_transform(seg)

    new = edited.history[len(start.history):]
    assert [r["name"] for r in new] == ["scale", "rotate", "translate"]
    assert new[0]["params"]["factors"] == [1.1, 1.1, 1.1]
    assert new[1]["params"]["angles_deg"] == pytest.approx([0.0, 0.0, 15.0])
    assert _ids(case.scene) == ids  # handles and the moving copy are gone
    assert seg.GetDisplayNode().GetSegmentVisibility("ET")
    # the tumour went where the handles put it, 1.1^3 times as large
    matrix_t1 = mrml.ijk_to_ras(case.nodes["t1"])
    target = linear @ centre + matrix[:3, 3]
    np.testing.assert_allclose(_tumour_centre_ras(edited.array, matrix_t1), target, atol=2.0)
    core = lambda a: np.count_nonzero(np.isin(a, (4, 6)))  # noqa: E731
    assert core(edited.array) / core(start.array) == pytest.approx(1.1 ** 3, rel=0.15)
    # provenance replays bit-identically, and the segmentation shows the result
    np.testing.assert_array_equal(replay(start, new).array, edited.array)
    np.testing.assert_array_equal(case.logic.labelmap(seg).array, edited.array)
    assert case.logic.history(seg) == edited.history
    # one undo step restores everything
    restored = case.logic.undo(seg)
    np.testing.assert_array_equal(restored.array, start.array)
    assert case.logic.history(seg) == start.history
    mrml.remove_nodes(case.scene, seg)


@pytest.mark.realdata
def test_edits_that_change_no_voxel_are_not_recorded(case):
    """A rotation too small for the grid's voxels changed nothing but was recorded (history 'rotate'), so the case's
    provenance claimed a rotation no voxel shows; the command line refuses such an edit, the panel did not."""
    from MedSynthLib.edits import Rotate, Scale

    seg = case.logic.copy_labels(case.seg, "no-op edits")
    start = case.logic.labelmap(seg)
    for edit in (Rotate((0.0, 0.0, 0.01)), Scale((1.0001, 1.0, 1.0))):
        with pytest.raises(WorkflowError, match="changes no voxel"):
            case.logic.apply_edit(seg, edit)
        assert case.logic.history(seg) == start.history
    # the handles: a rotation of a hundredth of a degree and a 6 mm drag record the drag alone
    transform = case.logic.begin_tumour_transform(seg)
    centre = np.array(transform.GetCenterOfTransformation())
    linear = rotation_ras((0.0, 0.0, 0.01))
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = centre - linear @ centre + np.array([6.0, 0.0, 0.0])
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    edited = case.logic.apply_tumour_transform(seg)
    assert [r["name"] for r in edited.history[len(start.history):]] == ["translate"]
    case.logic.undo(seg)
    mrml.remove_nodes(case.scene, seg)


@pytest.mark.realdata
def test_cancelled_handles_leave_the_label_map(case):
    seg = case.logic.copy_labels(case.seg, "cancel handles")
    before = case.logic.labelmap(seg).array.copy()
    ids = _ids(case.scene)
    transform = case.logic.begin_tumour_transform(seg)
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(np.diag([2.0, 2.0, 2.0, 1.0])))
    case.logic.cancel_tumour_transform(seg)
    assert _ids(case.scene) == ids
    np.testing.assert_array_equal(case.logic.labelmap(seg).array, before)
    with pytest.raises(WorkflowError, match="no tumour transform"):
        case.logic.apply_tumour_transform(seg)
    mrml.remove_nodes(case.scene, seg)


@pytest.mark.realdata
def test_a_drag_that_pushes_tumour_out_of_the_brain_says_how_much_was_clipped(case):
    """Dragging the tumour with the handles until oedema leaves the brain: the label map keeps what stays inside,
    and the panel's log says how many voxels of each class were clipped (it used to say only 'translate')."""
    from MedSynthLib.edits.base import MAX_OUTSIDE_FRACTION

    seg = case.logic.copy_labels(case.seg, "clipped drag")
    start = case.logic.labelmap(seg)
    brain = np.argwhere(start.array > 0)
    centre_kji = np.argwhere(np.isin(start.array, (4, 5, 6))).mean(axis=0)
    # Towards the nearest brain edge along one axis, in whole voxels, until something is clipped (and not refused).
    axis = int(np.argmin(np.minimum(centre_kji - brain.min(axis=0), brain.max(axis=0) - centre_kji)))
    sign = 1.0 if brain.max(axis=0)[axis] - centre_kji[axis] < centre_kji[axis] - brain.min(axis=0)[axis] else -1.0
    matrix_kji = mrml.ijk_to_ras(case.nodes["t1"])
    step_ras = matrix_kji[:3, :3] @ np.roll(np.eye(3)[2 - axis], 0) * sign  # one voxel along numpy axis `axis`
    found = None
    for voxels in range(2, 60, 2):
        try:
            moved = Translate(tuple(float(v) for v in voxels * step_ras))(start)
        except Exception:  # pushed too far: more than the allowed core outside
            break
        if "clipped_tumour_voxels" in moved.history[-1]["params"]:
            found = voxels
            break
    assert found is not None, "no drag clips this case's tumour without being refused: pick another case"
    case.log.clear()
    transform = case.logic.begin_tumour_transform(seg)
    matrix = np.eye(4)
    matrix[:3, 3] = found * step_ras
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    edited = case.logic.apply_tumour_transform(seg)
    recorded = edited.history[-1]["params"]["clipped_tumour_voxels"]
    said = [line for line in case.log if "clipped" in line]
    assert len(said) == 1 and f"{sum(recorded.values())} tumour voxels" in said[0], case.log
    assert all(f"{name} {count}" in said[0] for name, count in recorded.items())
    assert f"{MAX_OUTSIDE_FRACTION:.0%}" in said[0]
    case.logic.undo(seg)
    mrml.remove_nodes(case.scene, seg)


@pytest.mark.parametrize("angles, factors", [((10.0, -20.0, 35.0), (1.0, 1.0, 1.0)),
                                             ((0.0, 0.0, 30.0), (1.3, 0.8, 1.0)),
                                             ((0.0, 90.0, 0.0), (1.0, 1.0, 1.0))])
def test_linear_part_of_a_transform_becomes_rotate_and_scale_edits(angles, factors):
    from MedSynthLib.edits import Rotate, Scale

    rotation = rotation_ras(angles)
    np.testing.assert_allclose(rotation_ras(euler_xyz_from_rotation(rotation)), rotation, atol=1e-9)
    # scale along the rotated axes: A = R S (Slicer's handles scale in the transform's own frame)
    linear = rotation @ np.diag(factors)
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    composed = np.eye(3)
    for edit in linear_edits_for_matrix(matrix):
        step = rotation_ras(edit.angles_deg) if isinstance(edit, Rotate) else np.diag(edit.factors)
        assert isinstance(edit, (Rotate, Scale))
        composed = step @ composed
    np.testing.assert_allclose(composed, linear, atol=1e-5)


def test_mirroring_transforms_are_refused():
    with pytest.raises(WorkflowError, match="mirrors"):
        linear_edits_for_matrix(np.diag([-1.0, 1.0, 1.0, 1.0]))


# --- the slicer.util array/matrix helpers mrml uses, against VTK's element accessors ---------------


def _oblique_ijk_to_ras() -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = rotation_ras((10.0, -20.0, 35.0)) @ np.diag([0.9, 1.2, 2.5])
    matrix[:3, 3] = (-91.5, 12.25, 40.0)
    return matrix


def test_matrix_helpers_equal_vtks_elements():
    matrix = _oblique_ijk_to_ras()
    vtk_matrix = slicer.util.vtkMatrixFromArray(matrix)
    assert isinstance(vtk_matrix, vtk.vtkMatrix4x4)
    assert [[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)] == matrix.tolist()
    by_element = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            by_element.SetElement(r, c, matrix[r, c])
    np.testing.assert_array_equal(slicer.util.arrayFromVTKMatrix(by_element), matrix)

    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "oblique")
    mrml.set_ijk_to_ras(node, matrix)
    read = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(read)
    np.testing.assert_allclose([[read.GetElement(r, c) for c in range(4)] for r in range(4)], matrix, atol=1e-12)
    np.testing.assert_allclose(mrml.ijk_to_ras(node), matrix, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32, np.float64])
def test_volume_array_helpers_equal_vtks_voxels(dtype):
    scene = slicer.vtkMRMLScene()
    rng = np.random.default_rng(3)
    array = (rng.random((5, 6, 7)) * 200).astype(dtype)  # (k, j, i): three different extents
    node = mrml.add_volume_from_array(scene, array, _oblique_ijk_to_ras(), "voxels")
    image = node.GetImageData()
    assert image.GetDimensions() == (7, 6, 5) and image.GetNumberOfScalarComponents() == 1
    assert image.GetPointData().GetScalars().GetDataTypeSize() == np.dtype(dtype).itemsize
    for k, j, i in [(0, 0, 0), (4, 5, 6), (1, 2, 3), (4, 0, 6)]:
        assert image.GetScalarComponentAsDouble(i, j, k, 0) == float(array[k, j, i])
    np.testing.assert_allclose(mrml.ijk_to_ras(node), _oblique_ijk_to_ras(), atol=1e-12)
    copy = mrml.array_from_volume(node)
    assert copy.dtype == dtype
    np.testing.assert_array_equal(copy, array)
    copy[:] = 0  # a copy: the volume keeps its voxels
    assert image.GetScalarComponentAsDouble(6, 5, 4, 0) == float(array[4, 5, 6])

    region = np.full((2, 3, 4), 7, dtype)
    modified = []
    node.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda *_: modified.append(1))
    stamp = image.GetMTime()
    mrml.update_volume_region(node, (3, 1, 2), region)
    expected = array.copy()
    expected[3:5, 1:4, 2:6] = 7
    np.testing.assert_array_equal(mrml.array_from_volume(node), expected)
    assert image.GetScalarComponentAsDouble(2, 1, 3, 0) == 7.0 and image.GetScalarComponentAsDouble(1, 1, 3, 0) \
        == float(array[3, 1, 1])
    assert node.GetImageData() is image and image.GetMTime() > stamp and modified  # the views see the change
    with pytest.raises(mrml.MRMLError, match="does not fit"):
        mrml.update_volume_region(node, (4, 0, 0), region)
    with pytest.raises(mrml.MRMLError, match="3D array"):
        mrml.add_volume_from_array(scene, array[0], np.eye(4), "flat")


@pytest.mark.realdata
def test_parametric_random_insert_and_undo(case, brats_cases):
    from MedSynthLib.edits import replay

    seg = case.logic.copy_labels(case.seg, "tools")
    start = case.logic.labelmap(seg)
    matrix = mrml.ijk_to_ras(case.nodes["t1"])
    # a parametric tumour at a clicked RAS point (the opposite hemisphere's white matter)
    wm = np.argwhere(start.array == Label.WM)
    point_kji = wm[np.argmin(np.abs(wm - wm.mean(axis=0)).sum(axis=1))]
    point = (matrix @ np.append(point_kji[::-1], 1.0))[:3]
    new = case.logic.add_parametric_tumour(seg, point, TumourParameters(radius_mm=10.0, oedema_mm=6.0, seed=2))
    assert new.history[-1]["name"] == "parametric_tumour"
    np.testing.assert_allclose(new.history[-1]["params"]["centre_ras_mm"], point)
    np.testing.assert_allclose(_tumour_centre_ras(new.array, matrix, (4, 6)), point, atol=3.0)
    # random (seeded): the same seed draws the same edit, recorded and replayable
    case.logic.undo(seg)
    first = case.logic.random_tumour(seg, seed=5)
    records = first.history[len(start.history):]
    case.logic.undo(seg)
    second = case.logic.random_tumour(seg, seed=5)
    np.testing.assert_array_equal(first.array, second.array)
    np.testing.assert_array_equal(replay(start, records).array, first.array)
    case.logic.undo(seg)
    # insert the tumour of another case folder
    inserted = case.logic.insert_tumour(seg, brats_cases[1])
    assert inserted.history[-1]["name"] == "insert_tumour"
    assert inserted.history[-1]["params"]["source"].endswith("_seg.nii.gz")  # the case's tumour file
    assert str(brats_cases[1]) not in json.dumps(inserted.history)  # no paths in provenance
    assert np.count_nonzero(inserted.array >= Label.NCR) > 100
    case.logic.undo(seg)
    # a plain expert segmentation file (no images, no sidecar): on the same grid, placed where it was drawn
    seg_file = next(p for p in brats_cases[1].iterdir() if p.name.endswith("_seg.nii.gz"))
    expert = sitk.GetArrayFromImage(sitk.ReadImage(str(seg_file)))
    from_file = case.logic.insert_tumour(seg, seg_file)
    assert from_file.history[-1]["name"] == "insert_tumour"
    tumour = from_file.array >= Label.NCR
    assert np.count_nonzero(tumour & (expert > 0)) > 0.9 * np.count_nonzero(expert > 0)
    restored = case.logic.undo(seg)
    np.testing.assert_array_equal(restored.array, start.array)
    with pytest.raises(WorkflowError, match="nothing to undo"):
        case.logic.undo(seg)
    # edits that cannot be done are refused with a clear message, the label map untouched
    ids = _ids(case.scene)
    with pytest.raises(WorkflowError, match="outside the brain"):
        case.logic.add_parametric_tumour(seg, (500.0, 500.0, 500.0))
    seg_file = next(p for p in brats_cases[1].iterdir() if p.name.endswith("_seg.nii.gz"))
    with pytest.raises(WorkflowError, match=r"not defined by the brats2023 convention.*'Its tumour labels'"):
        case.logic.insert_tumour(seg, seg_file, label_convention="brats2023")  # values 1/2/4: 4 is not 2023's
    np.testing.assert_array_equal(case.logic.labelmap(seg).array, start.array)
    assert _ids(case.scene) == ids
    mrml.remove_nodes(case.scene, seg)


@pytest.mark.realdata
def test_an_insert_made_in_slicer_replays_on_the_command_line(case, brats_cases, tmp_path, capsys):
    """An insert was recorded as 'labels-<hash>' without the source's content hash, and from a case folder its
    source was a map no one has as a file (the case's brain filled with white matter): `medsynth tumour replay`
    could not redo it.  It is now recorded as `medsynth tumour insert` records it (the source file's name and
    content hash); a case folder's tumour is its segmentation file, so `--source` that file replays it."""
    from MedSynthLib.cli import main
    from MedSynthLib.edits import InsertTumour
    from MedSynthLib.schema.labelmap import read_tumour_source, write_label_map
    from MedSynthLib.schema.provenance import array_sha256

    seg = case.logic.copy_labels(case.seg, "insert-replay")
    start = case.logic.labelmap(seg)
    write_label_map(start, tmp_path / "start.nii.gz")
    seg_file = next(p for p in brats_cases[1].iterdir() if p.name.endswith("_seg.nii.gz"))
    for n, source in enumerate((brats_cases[1], seg_file)):
        inserted = case.logic.insert_tumour(seg, source)
        record = inserted.history[-1]["params"]
        assert record["source"] == seg_file.name
        assert record["source_labels_sha256"] == array_sha256(read_tumour_source(seg_file).array)
        if n == 0:  # a case folder's tumour is still placed where it lies in its own brain
            brain_map = case.logic.read_tumour_source(brats_cases[1])
            np.testing.assert_array_equal(inserted.array, InsertTumour()(start, source=brain_map).array)
        edited = tmp_path / f"edited{n}.nii.gz"
        write_label_map(inserted, edited)
        for m, given in enumerate((seg_file, brats_cases[1])):  # the file, or the case folder standing for it
            capsys.readouterr()
            code = main(["tumour", "replay", str(tmp_path / "start.nii.gz"), "--edits", str(edited),
                         "--source", str(given), "--check", "-o", str(tmp_path / f"replayed{n}{m}.nii.gz")])
            said = capsys.readouterr()
            assert code == 0, said.err
            assert "identical to it voxel for voxel" in said.out
        case.logic.undo(seg)
    np.testing.assert_array_equal(case.logic.labelmap(seg).array, start.array)
    mrml.remove_nodes(case.scene, seg)


@pytest.mark.realdata
@pytest.mark.parametrize("convention, values", [("brats2023", {1: 1, 2: 2, 4: 3}), ("msd", {1: 2, 2: 1, 4: 3})])
def test_insert_reads_an_expert_files_own_tumour_convention(case, brats_cases, tmp_path, convention, values):
    from MedSynthLib.schema.labelmap import write_label_map

    """'Tumour from' a BraTS 2023 or MSD segmentation while the loaded case is BraTS 2021: the file's convention is
    read from the file (oedema = the label facing the healthy brain), not taken from the case's 'Tumour labels'."""
    seg = case.logic.copy_labels(case.seg, "expert-insert")
    start = case.logic.labelmap(seg)
    original = next(p for p in brats_cases[1].iterdir() if p.name.endswith("_seg.nii.gz"))
    image = sitk.ReadImage(str(original))
    expert = sitk.GetArrayFromImage(image)
    written = np.zeros_like(expert)
    for brats2021, value in values.items():
        written[expert == brats2021] = value
    out = sitk.GetImageFromArray(written)
    out.CopyInformation(image)
    path = tmp_path / f"{convention}_seg.nii.gz"
    sitk.WriteImage(out, str(path))
    inserted = case.logic.insert_tumour(seg, path)  # no convention given: detected
    inside = start.array > 0
    for brats2021, label in ((1, Label.NCR), (2, Label.ED), (4, Label.ET)):
        drawn = (expert == brats2021) & inside
        assert np.count_nonzero(inserted.array[drawn] == label) > 0.9 * np.count_nonzero(drawn), (convention, label)
    case.logic.undo(seg)
    # one tumour value alone reads differently as BraTS (2 = oedema) and MSD (2 = core): the user must say which
    only = np.where(expert == 2, 2, 0).astype(expert.dtype)
    out = sitk.GetImageFromArray(only)
    out.CopyInformation(image)
    sitk.WriteImage(out, str(tmp_path / "one_value_seg.nii.gz"))
    with pytest.raises(WorkflowError, match="'Its tumour labels'") as caught:
        case.logic.insert_tumour(seg, tmp_path / "one_value_seg.nii.gz")
    assert "--" not in str(caught.value) and "\n" not in str(caught.value)
    as_msd = case.logic.insert_tumour(seg, tmp_path / "one_value_seg.nii.gz", label_convention="msd")
    assert np.count_nonzero(as_msd.array == Label.NCR) > 0.9 * np.count_nonzero((only == 2) & inside)
    np.testing.assert_array_equal(case.logic.undo(seg).array, start.array)
    # a MedSynth label map (its sidecar beside it) reads as one whatever 'Its tumour labels' says
    write_label_map(start, tmp_path / "labels.nii.gz")
    from_map = case.logic.insert_tumour(seg, tmp_path / "labels.nii.gz", label_convention="msd")
    np.testing.assert_array_equal(from_map.array >= Label.NCR, start.array >= Label.NCR)
    np.testing.assert_array_equal(case.logic.undo(seg).array, start.array)
    mrml.remove_nodes(case.scene, seg)


def _paint(seg, segment_id: str, mask: np.ndarray, reference) -> None:
    """What a Segment Editor stroke does: replace one segment's binary labelmap."""
    dims = reference.GetImageData().GetDimensions()
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(dims)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    image.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(mrml.ijk_to_ras(reference)))
    from vtkmodules.util import numpy_support

    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = mask.astype(np.uint8).ravel()
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image, seg, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)


def _template_with_strokes(case, classes=("ED", "NCR")):
    """The template prepared, then a small tumour painted into its white matter with Segment Editor strokes."""
    t1 = case.logic.load_template()
    seg = case.logic.prepare(t1)
    start = case.logic.labelmap(seg)
    wm = np.argwhere(start.array == Label.WM)
    k, j, i = wm[len(wm) // 2]
    ball = np.zeros(start.array.shape, bool)
    ball[k - 6:k + 6, j - 6:j + 6, i - 6:i + 6] = True
    core = np.zeros_like(ball)
    core[k - 3:k + 3, j - 3:j + 3, i - 3:i + 3] = True
    masks = {"ED": ball & ~core & (start.array > 0), "NCR": core & (start.array > 0)}
    for name in classes:
        _paint(seg, name, masks[name], t1)
    return t1, seg, start


@pytest.mark.realdata
def test_a_tumour_drawn_by_hand_on_the_template_is_not_anonymous(case, tiny_model, tmp_path):
    """A tumour painted with Segment Editor strokes may be traced from a patient's expert segmentation: it was
    recorded as 'no tumour' and passed the anonymous export.  Its origin is now 'segmentation', as for the same
    tumour given to Prepare, in the label map, the synthetic case and the export's refusal."""
    from MedSynthLib.export import export_cases
    from MedSynthLib.schema.errors import MedSynthError
    from MedSynthLib.schema.provenance import privacy_of

    t1, seg, start = _template_with_strokes(case)
    edited = case.logic.labelmap(seg)
    assert edited.history[-1]["name"] == MANUAL_EDIT and edited.history[-1]["params"]["tumour_drawn_voxels"] > 0
    privacy = privacy_of(edited)
    assert privacy.tumour_origin == "segmentation" and not privacy.anonymous()[0]
    outputs = case.logic.generate(seg, GenerateOptions(model=str(tiny_model), device="cpu", inpaint=False, seed=1))
    folder = case.logic.case_folder(outputs)
    assert json.loads((folder / "provenance.json").read_text())["privacy"]["tumour_origin"] == "segmentation"
    with pytest.raises(MedSynthError, match="segmentation loaded or drawn"):
        export_cases([str(folder)], str(tmp_path / "shared"), "nifti", anonymous=True)
    assert not (tmp_path / "shared").exists()
    mrml.remove_nodes(case.scene, *outputs.values(), seg, t1)


@pytest.mark.realdata
def test_strokes_over_a_parametric_tumour_make_it_mixed_and_erasing_keeps_it(case):
    from MedSynthLib.schema.provenance import privacy_of

    t1 = case.logic.load_template()
    seg = case.logic.prepare(t1)
    start = case.logic.labelmap(seg)
    wm = np.argwhere(start.array == Label.WM)
    centre = lps_to_ras(start.grid.index_to_lps(wm[len(wm) // 2][::-1].astype(float)))
    drawn = case.logic.add_parametric_tumour(seg, centre)
    assert privacy_of(drawn).tumour_origin == "parametric" and privacy_of(drawn).anonymous()[0]
    kept = drawn.array == Label.ED
    kept[: int(np.median(np.argwhere(kept)[:, 0]))] = False  # the lower half of the oedema erased
    _paint(seg, "ED", kept, t1)
    after_erasing = case.logic.labelmap(seg)
    assert after_erasing.history[-1]["name"] == MANUAL_EDIT
    assert privacy_of(after_erasing).tumour_origin == "parametric"  # erasing adds nothing of anyone
    grown = (after_erasing.array == Label.ED) | ndimage_dilation(after_erasing.array >= Label.NCR)
    _paint(seg, "ED", grown & (after_erasing.array > 0) & ~np.isin(after_erasing.array, (4, 6)), t1)
    after_drawing = case.logic.labelmap(seg)
    assert privacy_of(after_drawing).tumour_origin == "mixed" and not privacy_of(after_drawing).anonymous()[0]
    mrml.remove_nodes(case.scene, seg, t1)


def ndimage_dilation(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=2)


@pytest.mark.realdata
def test_the_privacy_measured_by_an_edit_reaches_the_synthetic_case(case, tiny_model):
    """A 15 mm move of the patient's tumour measures its own tumour Dice; the case folder said Dice 1.00, origin
    'unknown' (the worker rebuilt the record from the history).  The measured record now travels with the map."""
    from MedSynthLib.schema.provenance import privacy_of

    seg = case.logic.copy_labels(case.seg, "privacy travels")
    moved = case.logic.apply_edit(seg, Translate((15.0, 0.0, 0.0)))
    measured = privacy_of(moved)
    assert measured.tumour_origin == "patient" and measured.tumour_dice_to_source < 0.9
    assert privacy_of(case.logic.labelmap(seg)) == measured  # read back from the segmentation
    outputs = case.logic.generate(seg, GenerateOptions(model=str(tiny_model), device="cpu", inpaint=False, seed=1))
    recorded = json.loads((case.logic.case_folder(outputs) / "provenance.json").read_text())["privacy"]
    assert recorded["tumour_dice_to_source"] == measured.tumour_dice_to_source
    assert recorded["tumour_origin"] == "patient"
    case.logic.undo(seg)
    assert privacy_of(case.logic.labelmap(seg)).tumour_dice_to_source == 1.0
    mrml.remove_nodes(case.scene, *outputs.values(), seg)


@pytest.mark.realdata
def test_strokes_made_before_a_session_reads_the_map_make_its_tumour_origin_unknown(case, tmp_path):
    """A reloaded scene (a new session) whose map was painted before MedSynth read it: the strokes were taken in
    without a record.  The stored hash tells the map changed unseen: a record says so, the origin becomes unknown
    (not anonymous); a map that did not change keeps its measured record."""
    from MedSynthLib.schema.provenance import privacy_of

    t1 = case.logic.load_template()
    seg = case.logic.prepare(t1)
    untouched = case.logic.copy_labels(seg, "untouched")
    start = case.logic.labelmap(seg)
    later = WorkflowLogic(case.scene, work_dir=tmp_path)  # the next session, on the same scene
    assert privacy_of(later.labelmap(untouched)) == privacy_of(start)
    wm = np.argwhere(start.array == Label.WM)
    k, j, i = wm[len(wm) // 2]
    stroke = np.zeros(start.array.shape, bool)
    stroke[k - 3:k + 3, j - 3:j + 3, i - 3:i + 3] = True
    _paint(seg, "NCR", stroke, t1)
    seen = later.labelmap(seg)
    assert seen.history[-1]["name"] == MANUAL_EDIT and seen.history[-1]["params"] == {}
    assert privacy_of(seen).tumour_origin == "unknown" and not privacy_of(seen).anonymous()[0]
    assert privacy_of(later.labelmap(seg)).tumour_origin == "unknown"  # kept, not found again each read
    later.cleanup()
    mrml.remove_nodes(case.scene, seg, untouched, t1)


@pytest.mark.realdata
def test_strokes_outside_the_brain_are_removed_and_said(case):
    """A stroke of oedema in the air (the user changed the editor's mask mode) was taken into the map and
    synthesised there; tumour lies inside the brain only, so those voxels are removed, and the log says how many."""
    t1 = case.logic.load_template()
    seg = case.logic.prepare(t1)
    start = case.logic.labelmap(seg)
    air = np.zeros(start.array.shape, bool)
    air[:6, :6, :6] = True
    assert not (start.array[air] > 0).any()
    inside = np.zeros_like(air)
    wm = np.argwhere(start.array == Label.WM)
    k, j, i = wm[len(wm) // 2]
    inside[k - 2:k + 2, j - 2:j + 2, i - 2:i + 2] = True
    case.log.clear()
    _paint(seg, "ED", air | inside, t1)
    edited = case.logic.labelmap(seg)
    assert not (edited.array[air] > 0).any()
    assert np.count_nonzero(edited.array == Label.ED) == np.count_nonzero(inside)
    said = [line for line in case.log if "outside the brain" in line]
    assert len(said) == 1 and str(int(air.sum())) in said[0], case.log
    np.testing.assert_array_equal(case.logic.labelmap(seg).array, edited.array)  # the segmentation shows it
    mrml.remove_nodes(case.scene, seg, t1)


@pytest.mark.realdata
def test_a_tumour_input_beyond_the_templates_brain_is_clipped_or_refused(case):
    """Prepare pasted a tumour input into the template wherever it lay, in the air too.  As for every edit: oedema
    outside the brain is clipped (and said), a core more than 2 % outside is refused, the scene unchanged."""
    from MedSynthLib.cases.template import template_label_map

    t1 = case.logic.load_template()
    brain = template_label_map().array > 0
    wm = np.argwhere(template_label_map().array == Label.WM)
    k, j, i = wm[len(wm) // 2]
    tumour = np.zeros(brain.shape, np.uint8)
    tumour[k - 3:k + 3, j - 3:j + 3, i - 3:i + 3] = 1  # NCR (brats2021 value 1) inside
    tumour[:6, :6, :6] = 2  # oedema in the air
    node = mrml.add_volume_from_array(case.scene, tumour, mrml.ijk_to_ras(t1), "tumour partly in the air",
                                      "vtkMRMLLabelMapVolumeNode")
    case.log.clear()
    seg = case.logic.prepare(t1, node, "brats2021")
    labels = case.logic.labelmap(seg).array
    assert not ((labels >= Label.NCR) & ~brain).any()
    assert np.count_nonzero(labels == Label.NCR) == 6 ** 3
    assert any("outside the template's brain" in line and str(6 ** 3) in line for line in case.log), case.log
    mrml.remove_nodes(case.scene, seg)
    core_in_air = np.zeros(brain.shape, np.uint8)
    core_in_air[:6, :6, :6] = 1
    slicer.util.updateVolumeFromArray(node, core_in_air)
    ids = _ids(case.scene)
    with pytest.raises(WorkflowError, match="outside the brain"):
        case.logic.prepare(t1, node, "brats2021")
    assert _ids(case.scene) == ids
    mrml.remove_nodes(case.scene, node, t1)


@pytest.mark.realdata
def test_a_tumour_input_without_tumour_voxels_is_refused(case):
    """An all-zero labelmap, a segmentation with empty tumour segments or with anatomy only, given as the tumour:
    each became a map with no tumour, with no word.  Each is refused in one message; the scene is unchanged."""
    from MedSynthLib.cases.template import template_label_map

    t1 = case.logic.load_template()
    shape = mrml.array_from_volume(t1).shape
    zero = mrml.add_volume_from_array(case.scene, np.zeros(shape, np.uint8), mrml.ijk_to_ras(t1), "empty tumour",
                                      "vtkMRMLLabelMapVolumeNode")
    empty = case.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty tumour segments")
    empty.CreateDefaultDisplayNodes()
    empty.GetSegmentation().AddEmptySegment("NCR", "NCR")
    empty.GetSegmentation().AddEmptySegment("ED", "ED")
    wm_only = mrml.segmentation_from_labels(case.scene, np.where(template_label_map().array == 3, 3, 0).astype(
        np.uint8), t1, "WM only")
    for node in (zero, empty, wm_only):
        ids = _ids(case.scene)
        with pytest.raises(WorkflowError, match="no tumour voxels") as raised:
            case.logic.prepare(t1, node, "brats2021")
        assert node.GetName() in str(raised.value) and "\n" not in str(raised.value)
        assert _ids(case.scene) == ids
    mrml.remove_nodes(case.scene, zero, empty, wm_only, t1)


@pytest.mark.realdata
def test_segment_editor_strokes_are_recorded_and_locked_anatomy_is_kept(case):
    seg = case.logic.copy_labels(case.seg, "editor")
    reference = case.nodes["t1"]
    editor = case.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    case.logic.configure_segment_editor(editor, seg)
    assert editor.GetSegmentationNode() is seg and editor.GetSourceVolumeNode() is reference
    assert editor.GetSelectedSegmentID() == "ED"
    assert editor.GetMaskMode() == seg.EditAllowedInsideAllSegments
    assert editor.GetOverwriteMode() == editor.OverwriteNone
    case.scene.RemoveNode(editor)

    start = case.logic.labelmap(seg)
    wm = np.argwhere(start.array == Label.WM)
    k, j, i = wm[len(wm) // 3]
    cube = np.zeros(start.array.shape, bool)
    cube[k - 2:k + 3, j - 2:j + 3, i - 2:i + 3] = True
    cube &= start.array > 0
    gm = start.array == Label.GM
    erased_gm = gm.copy()
    erased_gm[: gm.shape[0] // 2] = False
    _paint(seg, "GM", erased_gm, reference)                                  # erase half of a locked segment
    with pytest.raises(WorkflowError, match=r"locked anatomy segments \(GM\); that edit was refused"):
        case.logic.labelmap(seg)
    assert any("refused" in line for line in case.log)
    # refused, not silently half-taken: the segmentation is back as it was, no record, nothing to undo
    np.testing.assert_array_equal(case.logic.labelmap(seg).array, start.array)
    assert case.logic.history(seg) == start.history and not case.logic.can_undo(seg)
    _paint(seg, "ED", (start.array == Label.ED) | cube, reference)       # paint oedema (over anatomy: allowed)
    after = case.logic.labelmap(seg)
    assert np.all(after.array[cube] == Label.ED)
    np.testing.assert_array_equal(after.array[gm & ~cube], Label.GM)
    record = after.history[-1]
    assert record["name"] == MANUAL_EDIT and record["params"]["changed_voxels"] == int(np.count_nonzero(
        start.array != after.array))
    np.testing.assert_array_equal(case.logic.labelmap(seg).array, after.array)
    assert case.logic.history(seg)[-1]["name"] == MANUAL_EDIT
    # erasing a tumour down to nothing refills the healthy anatomy (no holes in the brain)
    _paint(seg, "ED", np.zeros_like(cube), reference)
    refilled = case.logic.labelmap(seg)
    assert not np.any(refilled.array[cube] == 0) and not np.any(refilled.array[cube] >= Label.NCR)
    # unlocked, the same erase is taken; each sync was one undo step
    case.logic.set_anatomy_locked(seg, False)
    current = refilled.array
    gm_now = current == Label.GM
    keep = gm_now.copy()
    keep[: gm_now.shape[0] // 2] = False
    _paint(seg, "GM", keep, reference)
    assert not np.any(case.logic.labelmap(seg).array[: gm_now.shape[0] // 2] == Label.GM)
    for _ in range(3):
        case.logic.undo(seg)
    np.testing.assert_array_equal(case.logic.labelmap(seg).array, start.array)
    mrml.remove_nodes(case.scene, seg)


# --- 4. generate ---------------------------------------------------------------------------------


@pytest.mark.realdata
def test_device_detection_runs_torch_in_a_separate_process(case):
    info = case.logic.detect_devices()
    assert info.torch is not None, info.error
    assert "auto" in info.available and "cpu" in info.available
    assert info.describe().startswith("GPU") == (info.cuda or info.mps)
    assert info.describe().startswith("CPU only") == (not info.cuda and not info.mps)
    assert ("cuda" in info.available) == info.cuda


@pytest.mark.realdata
def test_an_inpainted_case_is_named_and_tagged_as_the_patients_scan(case):
    """Generate on a loaded real case (inpainting, the default) put volumes named 'MedSynth synthetic ...' into the
    scene, though outside the edited region they are the patient's own scan bit for bit: they are named
    'MedSynth inpainted ...' and tagged MedSynth.Images = patient."""
    seg = case.logic.copy_labels(case.seg, "inpainted names")
    case.logic.apply_edit(seg, Translate((4.0, 0.0, 0.0)))
    outputs = case.logic.generate(seg, GenerateOptions(device="cpu", seed=3))
    folder = case.logic.case_folder(outputs)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "synthetic_mask.nii.gz"))) > 0
    for modality, node in outputs.items():
        assert node.GetName() == f"MedSynth inpainted {'T1ce' if modality == 't1ce' else modality.upper()}"
        assert node.GetAttribute("MedSynth.Images") == "patient"
        assert node.GetAttribute("MedSynth.Role") == "synthetic"  # found by review and export as before
        real = mrml.array_from_volume(case.nodes[modality])
        assert np.array_equal(mrml.array_from_volume(node)[~mask], real[~mask])
    mrml.remove_nodes(case.scene, *outputs.values(), seg)


@pytest.mark.realdata
def test_generate_runs_the_backend_in_a_subprocess_on_the_input_grid(case, tiny_model):
    progress, ids = [], _ids(case.scene)
    case.logic.progress.connect(lambda f, t: progress.append((f, t)))
    # inpaint=False: a whole synthetic case (the default for a loaded real case is inpainting, tested in
    # Testing/test_inpainting.py through the worker)
    job = case.logic.start_generate(case.seg, GenerateOptions(model=str(tiny_model), device="cpu", seed=7,
                                                              inpaint=False))
    assert job.task.pid != os.getpid() and pid_alive(job.task.pid)
    assert _ids(case.scene) == ids  # nothing is added while it runs
    while job.poll():
        time.sleep(0.05)
    outputs = case.logic.finish_generate(job)
    case.logic.progress.disconnect()
    case.outputs = outputs
    assert sorted(outputs) == ["flair", "t1", "t1ce", "t2"]
    assert progress[-1][0] == 1.0 and [f for f, _ in progress] == sorted(f for f, _ in progress)
    assert any(t == "model loaded" for _, t in progress)
    # the images came through memory and equal the case folder written for review and export
    case_dir = Path(outputs["t1"].GetAttribute("MedSynth.CaseFolder"))
    for modality, node in outputs.items():
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(case_dir / f"{modality}.nii.gz")))
        np.testing.assert_array_equal(mrml.array_from_volume(node), written)
    t1 = case.nodes["t1"]
    labels = case.logic.labelmap(case.seg)
    for modality, node in outputs.items():
        assert node.GetName() == f"MedSynth synthetic {'T1ce' if modality == 't1ce' else modality.upper()}"
        np.testing.assert_array_equal(mrml.ijk_to_ras(node), mrml.ijk_to_ras(t1))
        assert node.GetImageData().GetDimensions() == t1.GetImageData().GetDimensions()
        array = mrml.array_from_volume(node)
        assert np.all(np.isfinite(array)) and np.all(array[labels.array == 0] == 0)
        assert node.GetAttribute("MedSynth.Role") == "synthetic"
        assert node.GetAttribute("MedSynth.Images") == "synthetic"
        assert node.GetAttribute("MedSynth.Seed") == "7"
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(case_dir / "labels.nii.gz")))
    np.testing.assert_array_equal(written, labels.array)
    provenance = json.loads((case_dir / "provenance.json").read_text())
    assert [r["name"] for r in provenance["edits"]] == [r["name"] for r in labels.history]
    assert provenance["seed"] == 7 and provenance["device"] == "cpu"
    case.assert_inputs_unchanged()


@pytest.mark.realdata
def test_cancel_leaves_the_scene_and_the_worker_usable(case, tiny_model):
    ids = _ids(case.scene)
    options = GenerateOptions(model=str(tiny_model), device="cpu", inpaint=False)
    job = case.logic.start_generate(case.seg, options)
    pid = job.task.pid
    while job.poll() and job.task.text != "model loaded":  # cancel in the middle of the network pass
        time.sleep(0.01)
    assert case.logic.cancel_generate(job) is True
    # How fast (target 0.5 s) is measured by benchmarks/bench_preview.py, not under a test's load.
    if not pid_alive(pid):  # the worker was killed (the pass did not stop in time): its whole group is gone
        assert group_pids(pid) == []
    with pytest.raises(CancelledError):
        case.logic.finish_generate(job)
    assert not job.run_dir.exists()
    assert _ids(case.scene) == ids
    case.assert_inputs_unchanged()
    # the next request is served (by the same worker, or a new one)
    again = case.logic.start_generate(case.seg, options)
    assert again.task.wait(300) == "done"
    mrml.remove_nodes(case.scene, *case.logic.finish_generate(again).values())


@pytest.mark.realdata
def test_cancelling_a_synthesis_never_loses_an_export_queued_behind_it(case, outputs, tiny_model, tmp_path,
                                                                       monkeypatch):
    """Cancel kills the worker when the network pass does not stop within its grace time, and an export the
    panel had started behind the synthesis ended 'cancelled' with it, its files never written."""
    from MedSynthSlicerLib import jobs

    monkeypatch.setattr(jobs, "CANCEL_GRACE_S", 0.0)  # the kill path every time, not only under load
    ids = _ids(case.scene)
    job = case.logic.start_generate(case.seg, GenerateOptions(model=str(tiny_model), device="cpu", inpaint=False))
    while job.poll() and job.task.text != "model loaded":
        time.sleep(0.01)
    export = case.logic.start_export(outputs, "nifti", tmp_path / "export")  # Export pressed while it runs
    pid = job.task.pid
    assert case.logic.cancel_generate(job) is True
    assert not pid_alive(pid)
    with pytest.raises(CancelledError):
        case.logic.finish_generate(job)
    [target] = case.logic.finish_export(export)
    assert target.parent == tmp_path / "export" and (target / "provenance.json").is_file()
    assert _ids(case.scene) == ids
    case.assert_inputs_unchanged()


@pytest.mark.realdata
@pytest.mark.parametrize("options", [
    # The case is a loaded real case: whole synthesis is the choice away from inpainting (the default).
    {"model": "no-such-model", "inpaint": False},
    {"inpainting_model": "no-such-model", "inpaint": True},
], ids=["synthesis", "inpainting"])
def test_failed_synthesis_is_reported_and_leaves_the_scene(case, tmp_path, options):
    ids = _ids(case.scene)
    options = {k: str(tmp_path / v) if k.endswith("model") else v for k, v in options.items()}
    job = case.logic.start_generate(case.seg, GenerateOptions(device="cpu", **options))
    job.task.wait(timeout=300)
    with pytest.raises(WorkflowError, match="synthesis failed: .*no-such-model") as error:
        case.logic.finish_generate(job)
    assert "\n" not in str(error.value) and "Traceback" not in str(error.value)  # the backend's one line
    assert _ids(case.scene) == ids


def _max_error(after: np.ndarray, reference: np.ndarray, where: np.ndarray) -> float:
    return float(np.abs(after - reference)[where].max())


def _rerender_tolerance(reference: np.ndarray) -> float:
    """How far a rerendered region may be from a full synthesis of the same map.

    The full synthesis is stored rounded to int16 (half a unit), and the CPU's convolution kernels
    may sum in another order for the whole volume than for the crop: float32 rounding, seen up to
    0.1 of a range of ~700 (1.4e-4) on one CI machine, so 1e-3 of the range is allowed. A rerender
    given the wrong context is off by tens of units.
    """
    return 0.5 + 1e-3 * float(np.ptp(reference))


@pytest.mark.realdata
def test_preview_rerenders_only_the_edited_region(case, tiny_model):
    seg = case.logic.copy_labels(case.seg, "preview")
    options = GenerateOptions(model=str(tiny_model), device="cpu", inpaint=False)
    ids = _ids(case.scene)
    job = case.logic.start_preview(seg, options)
    assert _ids(case.scene) == ids  # in the background: nothing changes until it is finished
    while job.poll():
        time.sleep(0.01)
    first = case.logic.finish_preview(job)
    before = {m: mrml.array_from_volume(n) for m, n in first.items()}
    assert case.logic.last_preview["full"] is True
    labels_before = case.logic.labelmap(seg).array
    from MedSynthLib.edits import Translate

    case.logic.apply_edit(seg, Translate((4.0, 0.0, 0.0)))
    second = case.logic.preview(seg, options)
    assert case.logic.last_preview["full"] is False
    assert all(second[m] is first[m] for m in first)  # the same nodes, updated in place
    changed_labels = np.argwhere(case.logic.labelmap(seg).array != labels_before)
    grow = 24 + 2  # SynthesisEngine.rerender's margin, plus the tiny network's size multiple (2)
    lo, hi = changed_labels.min(axis=0) - grow, changed_labels.max(axis=0) + 1 + grow
    box = case.logic.last_preview["box"]  # only this box came back from the worker
    assert all(max(lo[a], 0) <= box[0][a] and box[1][a] <= hi[a] for a in range(3)), (box, lo, hi)
    after = mrml.array_from_volume(second["t1"])
    outside = np.ones(after.shape, bool)
    outside[tuple(slice(max(a, 0), b) for a, b in zip(lo, hi))] = False
    np.testing.assert_array_equal(after[outside], before["t1"][outside])
    assert not np.array_equal(after, before["t1"])
    # where the labels changed the preview is a full synthesis of the edited map
    full = case.logic.generate(seg, options)
    reference = mrml.array_from_volume(full["t1"]).astype(np.float32)
    changed = case.logic.labelmap(seg).array != labels_before
    assert _max_error(after, reference, changed) <= _rerender_tolerance(reference)
    mrml.remove_nodes(case.scene, *full.values())
    for node in second.values():
        np.testing.assert_array_equal(mrml.ijk_to_ras(node), mrml.ijk_to_ras(case.nodes["t1"]))
    case.logic.close_preview()
    mrml.remove_nodes(case.scene, seg)


@pytest.mark.realdata
def test_a_preview_with_other_options_replaces_the_preview_volumes(case, tiny_model):
    """Each new seed (or model, device, segmentation) made four more preview volumes and kept the old ones."""
    seg = case.logic.copy_labels(case.seg, "preview seeds")
    ids = _ids(case.scene)
    for seed in (1, 2, 3):
        nodes = case.logic.preview(seg, GenerateOptions(model=str(tiny_model), device="cpu", inpaint=False, seed=seed))
    added = [case.scene.GetNodeByID(i) for i in set(_ids(case.scene)) - set(ids)]
    volumes = sorted(n.GetID() for n in added if n.IsA("vtkMRMLScalarVolumeNode"))
    assert volumes == sorted(n.GetID() for n in nodes.values())
    case.logic.close_preview()
    mrml.remove_nodes(case.scene, seg, *nodes.values())


@pytest.mark.parametrize("spread", [-0.5, 2.5, float("nan"), True])
def test_generate_options_refuse_an_appearance_spread_out_of_range(spread):
    with pytest.raises(WorkflowError, match="the appearance spread must be a number from 0 to 2"):
        GenerateOptions(appearance_spread=spread).validate()
    assert GenerateOptions(appearance_spread=0.5).worker_params()["appearance_spread"] == 0.5


@pytest.mark.realdata
def test_the_appearance_spread_reaches_the_case_and_a_new_spread_makes_new_previews(case, tmp_path):
    from test_synthesis_seed import STYLED, _model

    styled = str(_model(tmp_path / "styled", STYLED))
    seg = case.logic.copy_labels(case.seg, "spread")
    options = GenerateOptions(model=styled, device="cpu", inpaint=False, seed=3, appearance_spread=0.5)
    job = case.logic.start_generate(seg, options)
    while job.poll():
        time.sleep(0.05)
    outputs = case.logic.finish_generate(job)
    provenance = json.loads((job.out_dir / "provenance.json").read_text())
    assert provenance["appearance_spread"] == 0.5 and provenance["seed"] == 3 and provenance["seed_effective"]
    assert all(node.GetAttribute("MedSynth.AppearanceSpread") == "0.5" for node in outputs.values())
    first = case.logic.preview(seg, options)
    wider = case.logic.preview(seg, GenerateOptions(model=styled, device="cpu", inpaint=False, seed=3,
                                                    appearance_spread=1.0))
    assert {n.GetID() for n in first.values()}.isdisjoint(n.GetID() for n in wider.values())
    assert not np.array_equal(mrml.array_from_volume(first["t1"]), mrml.array_from_volume(wider["t1"]))
    case.logic.close_preview()
    # Past the model's own limit (this one declares none: 1) the worker refuses in one line and adds nothing.
    ids = _ids(case.scene)
    job = case.logic.start_generate(seg, GenerateOptions(model=styled, device="cpu", inpaint=False, seed=3,
                                                         appearance_spread=1.5))
    job.task.wait(timeout=300)
    with pytest.raises(WorkflowError, match=r"synthesis failed: .*appearance spread 1.5 is wider than model .* "
                                            r"accepts \(up to 1:") as error:
        case.logic.finish_generate(job)
    assert "\n" not in str(error.value) and "Traceback" not in str(error.value)
    assert _ids(case.scene) == ids
    mrml.remove_nodes(case.scene, seg, *outputs.values(), *first.values(), *wider.values())


@pytest.mark.realdata
def test_the_label_map_is_read_again_whenever_the_segmentation_changed(case):
    """The module keeps the label map it read or wrote last; any change to the segmentation is seen."""
    seg = case.logic.copy_labels(case.seg, "stamp")
    start = case.logic.labelmap(seg)
    assert not start.array.flags.writeable  # shared with later reads: nobody may write into it
    again = case.logic.labelmap(seg)
    np.testing.assert_array_equal(again.array, start.array)
    # a tool writing into the shared labelmap layer in place (then Modified, as VTK requires)
    layer = seg.GetSegmentation().GetSegment("ED").GetRepresentation(
        slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    from vtkmodules.util import numpy_support

    voxels = numpy_support.vtk_to_numpy(layer.GetPointData().GetScalars()).reshape(start.array.shape)
    k, j, i = np.argwhere(start.array == Label.WM)[0]
    voxels[k, j, i] = int(Label.ED)
    layer.GetPointData().GetScalars().Modified()
    seen = case.logic.labelmap(seg)
    assert seen.array[k, j, i] == Label.ED and seen.history[-1]["name"] == MANUAL_EDIT
    # an edit writes the segmentation, and the next read returns exactly what was written
    edited = case.logic.apply_edit(seg, Translate((3.0, 0.0, 0.0)))
    np.testing.assert_array_equal(case.logic.labelmap(seg).array, edited.array)
    np.testing.assert_array_equal(case.logic.labelmap(seg).array,
                                  case.logic._labels_from_segmentation(seg, case.nodes["t1"], "brats2021", "x"))
    mrml.remove_nodes(case.scene, seg)


@pytest.mark.realdata
def test_a_newer_preview_supersedes_the_running_one_on_the_scene(case, tiny_model):
    seg = case.logic.copy_labels(case.seg, "supersede")
    options = GenerateOptions(model=str(tiny_model), device="cpu", inpaint=False)
    first = case.logic.preview(seg, options)
    before = {m: mrml.array_from_volume(n) for m, n in first.items()}
    labels_start = case.logic.labelmap(seg).array.copy()
    case.logic.apply_edit(seg, Translate((5.0, 0.0, 0.0)))
    older = case.logic.start_preview(seg, options)
    case.logic.apply_edit(seg, Translate((0.0, 4.0, 0.0)))
    newer = case.logic.start_preview(seg, options)  # at once, as an edit during a running preview does
    older.task.wait(300)
    newer.task.wait(300)
    assert newer.task.status == "done", newer.task.error
    if older.task.status == "cancelled":
        with pytest.raises(CancelledError, match="superseded"):
            case.logic.finish_preview(older)
    # else the older one finished first: finishing the newer one puts the older region in before its own
    nodes = case.logic.finish_preview(newer)
    assert all(nodes[m] is first[m] for m in first)
    labels = case.logic.labelmap(seg).array
    changed = labels != labels_start
    full = case.logic.generate(seg, options)
    for modality in ("t1", "flair"):
        after = mrml.array_from_volume(nodes[modality])
        reference = mrml.array_from_volume(full[modality]).astype(np.float32)
        # where either edit changed the labels: a full synthesis of the final map
        assert _max_error(after, reference, changed) <= _rerender_tolerance(reference), modality
        # far from both edits nothing moved
        far = np.ones(changed.shape, bool)
        idx = np.argwhere(changed)
        far[tuple(slice(max(int(a) - 40, 0), int(b) + 41) for a, b in zip(idx.min(0), idx.max(0)))] = False
        np.testing.assert_array_equal(after[far], before[modality][far])
    mrml.remove_nodes(case.scene, *full.values())
    case.logic.close_preview()
    mrml.remove_nodes(case.scene, seg, *nodes.values())


@pytest.mark.realdata
@pytest.mark.skipif(os.name == "nt", reason="SIGKILL")
def test_a_preview_whose_worker_died_fails_in_one_line_and_the_next_starts_over(case, tiny_model):
    import signal

    seg = case.logic.copy_labels(case.seg, "died")
    options = GenerateOptions(model=str(tiny_model), device="cpu", inpaint=False)
    first = case.logic.preview(seg, options)
    case.logic.apply_edit(seg, Translate((4.0, 0.0, 0.0)))
    job = case.logic.start_preview(seg, options)
    os.kill(job.task.pid, signal.SIGKILL)
    job.task.wait(60)  # a bound against a hang, not a speed limit
    with pytest.raises(WorkflowError, match="preview failed: the MedSynth worker process was stopped by signal 9") \
            as error:
        case.logic.finish_preview(job)
    assert "\n" not in str(error.value) and "Traceback" not in str(error.value)
    again = case.logic.preview(seg, options)  # a new worker: the whole case again, into the same volumes
    assert case.logic.last_preview["full"] is True and all(again[m] is first[m] for m in first)
    case.logic.close_preview()
    mrml.remove_nodes(case.scene, seg, *again.values())


# --- 5. review -----------------------------------------------------------------------------------


@pytest.mark.realdata
def test_review_layout_linked_views_original_and_rating(case, outputs):
    layout = case.scene.AddNewNodeByClass("vtkMRMLLayoutNode")
    layout_id = case.logic.register_review_layout(layout)
    assert layout.IsLayoutDescription(layout_id)
    import xml.etree.ElementTree as ET

    views = [v.get("singletontag") for v in ET.fromstring(layout.GetLayoutDescription(layout_id)).iter("view")]
    assert views == list(REVIEW_VIEWS.values())
    # the layout manager of the application creates these views; here they are made as it would
    composites, slice_nodes = {}, {}
    for modality, view in REVIEW_VIEWS.items():
        slice_node = case.scene.AddNewNodeByClass("vtkMRMLSliceNode")
        slice_node.SetLayoutName(view)
        slice_node.SetDimensions(400, 300, 1)  # a view's size in pixels, as the application sets it
        slice_nodes[modality] = slice_node
        composite = case.scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        composite.SetLayoutName(view)
        composites[modality] = composite
    # a new view looks at RAS z = 0 with a 250 mm field: the bottom edge of a BraTS volume (black)
    assert slice_nodes["t1"].GetSliceOffset() == 0.0
    ids = _ids(case.scene)
    assert len(case.logic.show_in_review_views(outputs, case.seg)) == 4
    assert _ids(case.scene) == ids  # fitting the views adds nothing to the scene
    for modality, composite in composites.items():
        assert composite.GetBackgroundVolumeID() == outputs[modality].GetID()
        assert composite.GetLinkedControl() and composite.GetHotLinkedControl()
    # every view fitted to its volume: the slice through the volume's centre, the whole volume in view
    for modality, slice_node in slice_nodes.items():
        bounds = [0.0] * 6
        outputs[modality].GetRASBounds(bounds)
        centre = [(bounds[2 * a] + bounds[2 * a + 1]) / 2 for a in range(3)]
        assert slice_node.GetSliceOffset() == pytest.approx(centre[2], abs=1.0)
        slice_to_ras = slicer.util.arrayFromVTKMatrix(slice_node.GetSliceToRAS())
        np.testing.assert_allclose(slice_to_ras[:2, 3], centre[:2], atol=1.0)
        fov = slice_node.GetFieldOfView()
        width, height = bounds[1] - bounds[0], bounds[3] - bounds[2]
        assert fov[0] >= width - 1.0 and fov[1] >= height - 1.0
        assert min(fov[0] - width, fov[1] - height) < 1.0  # tight in one direction
        assert fov[0] / fov[1] == pytest.approx(400 / 300)  # the view's aspect kept
    crosshair = mrml.nodes_by_class(case.scene, "vtkMRMLCrosshairNode")[0]
    assert crosshair.GetCrosshairMode() == crosshair.ShowSmallBasic
    # the overlay: tumour classes as outlines, anatomy hidden
    display = case.seg.GetDisplayNode()
    assert display.GetVisibility() and display.GetVisibility2DOutline()
    for name in ("CSF", "GM", "WM"):
        assert not display.GetSegmentVisibility(name), name
    for name in ("NCR", "ED", "ET"):
        assert display.GetSegmentVisibility(name), name
        assert display.GetSegmentVisibility2DOutline(name) and not display.GetSegmentVisibility2DFill(name), name
    originals = case.logic.original_volumes(case.seg)
    assert sorted(originals) == ["flair", "t1", "t1ce", "t2"]
    for slice_node in slice_nodes.values():
        slice_node.SetSliceOffset(0.0)
    case.logic.show_in_review_views(originals, case.seg)
    for modality, composite in composites.items():
        assert composite.GetBackgroundVolumeID() == case.nodes[modality].GetID()
        assert slice_nodes[modality].GetSliceOffset() > 50.0  # fitted again

    review = case.logic.set_review(outputs, 4, "plausible oedema\nrim a bit thin")
    for node in outputs.values():
        assert node.GetAttribute("MedSynth.Rating") == "4"
        assert node.GetAttribute("MedSynth.ReviewNote") == "plausible oedema\nrim a bit thin"
    provenance = json.loads((case.logic.case_folder(outputs) / "provenance.json").read_text())
    assert provenance["review"] == review
    for bad in (6, -1, 2.5, True):
        with pytest.raises(WorkflowError, match="rating"):
            case.logic.set_review(outputs, bad)
    with pytest.raises(WorkflowError, match="note"):
        case.logic.set_review(outputs, 3, "x" * 1000)


# --- 6. export -----------------------------------------------------------------------------------


@pytest.mark.realdata
def test_export_nifti_and_dicom_through_medsynthlib_never_overwriting(case, outputs, tmp_path):
    if not outputs["t1"].GetAttribute("MedSynth.Rating"):
        case.logic.set_review(outputs, 3, "")
    ids = _ids(case.scene)
    targets = case.logic.export(outputs, "nifti", tmp_path / "nifti")
    assert len(targets) == 1 and targets[0].parent == tmp_path / "nifti"
    case_id = targets[0].name
    for suffix in ("_t1", "_t1ce", "_t2", "_flair", "_seg"):
        assert (targets[0] / f"{case_id}{suffix}.nii.gz").is_file()
    exported = sitk.ReadImage(str(targets[0] / f"{case_id}_t1.nii.gz"))
    assert Grid.from_image(exported).difference(mrml.grid_from_volume(case.nodes["t1"])) is None
    provenance = json.loads((targets[0] / "provenance.json").read_text())
    assert provenance["synthetic"] is True and provenance["review"]["rating"] == int(
        outputs["t1"].GetAttribute("MedSynth.Rating"))
    # never overwrite: the same case into the same folder is refused
    mtime = (targets[0] / "provenance.json").stat().st_mtime_ns
    with pytest.raises(WorkflowError, match="already exists"):
        case.logic.export(outputs, "nifti", tmp_path / "nifti")
    assert (targets[0] / "provenance.json").stat().st_mtime_ns == mtime
    dicom = case.logic.export(outputs, "dicom", tmp_path / "dicom")
    for series in ("T1", "T1ce", "T2", "FLAIR", "SEG"):
        assert any((dicom[0] / series).iterdir())
    assert _ids(case.scene) == ids
    case.assert_inputs_unchanged()


@pytest.mark.realdata
def test_export_sends_the_review_through_medsynthlibs_sanitiser(case, outputs, tmp_path):
    """The export used to write the raw review back after the sanitiser (a patient_mrn survived)."""
    record = case.logic.case_folder(outputs) / "provenance.json"
    kept = record.read_text()
    names = ("MedSynth.Rating", "MedSynth.ReviewNote", "MedSynth.ReviewedAt")
    attributes = {m: {a: node.GetAttribute(a) for a in names} for m, node in outputs.items()}
    try:
        case.logic.set_review(outputs, 0, "seen with Dr Doe")  # 0 = not rated, as the module stores it
        provenance = json.loads(record.read_text())
        provenance["review"]["patient_mrn"] = "MRN12345"
        record.write_text(json.dumps(provenance))
        targets = case.logic.export(outputs, "nifti", tmp_path / "nifti")
    finally:  # the module's shared case is left as this test found it, whichever test runs next
        record.write_text(kept)
        for modality, node in outputs.items():
            for name, value in attributes[modality].items():
                node.RemoveAttribute(name) if value is None else node.SetAttribute(name, value)
    text = (targets[0] / "provenance.json").read_text()
    assert "MRN12345" not in text and "patient_mrn" not in text and "Dr Doe" not in text
    assert json.loads(text)["review"]["rating"] == 0
    assert json.loads(text)["privacy"]["anatomy"] == "patient"  # a BraTS case's own anatomy: not anonymous


def _not_writable_folder(tmp_path: Path) -> Path | None:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    if not os.access(folder, os.W_OK):
        return folder / "export"
    for candidate in (Path("/proc/sys/medsynth-export"),):  # root ignores modes; a kernel folder does not
        if candidate.parent.exists() and not os.access(candidate.parent, os.W_OK):
            return candidate
    return None


@pytest.mark.realdata
def test_export_to_a_folder_that_is_not_writable_is_refused(case, outputs, tmp_path):
    target = _not_writable_folder(tmp_path)
    if target is None:
        pytest.skip("no non-writable folder available to this user")
    ids = _ids(case.scene)
    with pytest.raises(WorkflowError, match="not writable"):
        case.logic.export(outputs, "nifti", target)
    with pytest.raises(WorkflowError, match="format"):
        case.logic.export(outputs, "png", tmp_path)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(WorkflowError, match="not a folder"):
        case.logic.export(outputs, "nifti", a_file)
    assert _ids(case.scene) == ids


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.realdata
def test_no_brain_selected(case):
    ids = _ids(case.scene)
    with pytest.raises(WorkflowError, match="no brain selected"):
        case.logic.prepare(None)
    empty = mrml.add_volume_from_array(case.scene, np.zeros((8, 9, 10), np.int16), np.eye(4), "empty")
    ids_with_empty = _ids(case.scene)
    with pytest.raises(WorkflowError, match="empty"):
        case.logic.prepare(empty)
    assert _ids(case.scene) == ids_with_empty
    case.scene.RemoveNode(empty)
    with pytest.raises(WorkflowError, match="no MedSynth label segmentation"):
        case.logic.start_generate(None)
    with pytest.raises(WorkflowError, match="case folder not found|not found"):
        case.logic.load_case(case.folder / "missing")
    assert [i for i in _ids(case.scene) if i in ids] == ids


@pytest.mark.realdata
def test_segmentation_or_labelmap_on_another_grid(case):
    t1 = case.nodes["t1"]
    ids = _ids(case.scene)
    tumour = mrml.array_from_volume(case.nodes["tumour"])
    shifted = mrml.ijk_to_ras(t1)
    shifted[:3, 3] += [2.5, 0.0, 0.0]
    other = mrml.add_volume_from_array(case.scene, tumour, shifted, "shifted tumour", "vtkMRMLLabelMapVolumeNode")
    seg_other = mrml.segmentation_from_labels(case.scene, tumour_to_schema(tumour, "brats2021"), other, "other grid")
    ids_before = _ids(case.scene)
    for bad in (other, seg_other):
        with pytest.raises(WorkflowError, match="another grid"):
            case.logic.prepare(t1, bad)
        assert _ids(case.scene) == ids_before
    half = mrml.add_volume_from_array(case.scene, tumour[::2, ::2, ::2].copy(), mrml.ijk_to_ras(t1), "coarse",
                                      "vtkMRMLLabelMapVolumeNode")
    with pytest.raises(WorkflowError, match="another grid"):
        case.logic.prepare(t1, half)
    for node in (other, seg_other, half):
        case.scene.RemoveNode(node)
    assert [i for i in _ids(case.scene) if i in ids] == ids


@pytest.mark.realdata
def test_label_maps_with_unknown_segments_or_values(case, tiny_model):
    t1 = case.nodes["t1"]
    # a tumour labelmap with a value the convention does not define
    tumour = mrml.array_from_volume(case.nodes["tumour"]).copy()
    tumour[tumour == 4] = 3
    bad = mrml.add_volume_from_array(case.scene, tumour, mrml.ijk_to_ras(t1), "bad values", "vtkMRMLLabelMapVolumeNode")
    ids = _ids(case.scene)
    with pytest.raises(WorkflowError, match=r"\[3\].*convention"):
        case.logic.prepare(t1, bad, "brats2021")
    assert _ids(case.scene) == ids
    case.scene.RemoveNode(bad)
    # a tumour segmentation with a segment MedSynth does not know
    seg_in = mrml.segmentation_from_labels(case.scene, case.logic.labelmap(case.seg).array, t1, "input")
    seg_in.GetSegmentation().AddEmptySegment("Liver", "Liver")
    ids = _ids(case.scene)
    with pytest.raises(WorkflowError, match="'Liver'"):
        case.logic.prepare(t1, seg_in)
    assert _ids(case.scene) == ids
    case.scene.RemoveNode(seg_in)
    # the working segmentation gets an unknown segment in the Segment Editor: generate refuses
    seg = case.logic.copy_labels(case.seg, "unknown")
    seg.GetSegmentation().AddEmptySegment("Segment_7", "Segment_7")
    ids = _ids(case.scene)
    with pytest.raises(WorkflowError, match="'Segment_7'"):
        case.logic.start_generate(seg, GenerateOptions(model=str(tiny_model), device="cpu", inpaint=False))
    assert _ids(case.scene) == ids
    mrml.remove_nodes(case.scene, seg)


@pytest.mark.realdata
def test_bad_generate_options_are_refused(case):
    for options in (GenerateOptions(device="tpu"), GenerateOptions(precision="fp8"), GenerateOptions(seed=-1)):
        with pytest.raises(WorkflowError):
            case.logic.start_generate(case.seg, options)


def test_an_edit_writes_the_shared_labelmap_in_place_and_the_3d_surface_follows(case):
    """A committed edit rewrites the six segments' one labelmap in place: the segments keep their IDs and tags,
    the labels read back are the edit's, and a derived representation (the 3D surface) is made again."""
    seg = case.logic.copy_labels(case.seg, "in place")
    segmentation = seg.GetSegmentation()
    ids = list(segmentation.GetSegmentIDs())
    locks = {i: mrml.get_tag(segmentation.GetSegment(i), mrml.LOCKED_TAG) for i in ids}
    layer = segmentation.GetSegment(ids[0]).GetRepresentation(mrml._labelmap_name())
    assert segmentation.GetNumberOfLayers() == 1
    closed = slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()
    segmentation.CreateRepresentation(closed)
    et_id = next(i for i in ids if segmentation.GetSegment(i).GetName() == "ET")
    before_z = segmentation.GetSegment(et_id).GetRepresentation(closed).GetBounds()[4:6]
    edited = case.logic.apply_edit(seg, Translate((0.0, 0.0, 6.0)))
    assert list(segmentation.GetSegmentIDs()) == ids  # not removed and added again
    assert segmentation.GetSegment(ids[0]).GetRepresentation(mrml._labelmap_name()) is layer
    assert {i: mrml.get_tag(segmentation.GetSegment(i), mrml.LOCKED_TAG) for i in ids} == locks
    masks = mrml.segment_binary_masks(seg, case.logic.reference_volume(seg))
    read_back = np.zeros(edited.array.shape, np.uint8)
    for segment_id, mask in masks.items():
        read_back[mask] = segmentation.GetSegment(segment_id).GetLabelValue()
    assert np.array_equal(read_back, edited.array)
    surface = segmentation.GetSegment(et_id).GetRepresentation(closed)
    if surface is None or surface.GetNumberOfPoints() == 0:  # dropped on the edit; made again on request
        segmentation.CreateRepresentation(closed)
        surface = segmentation.GetSegment(et_id).GetRepresentation(closed)
    after_z = surface.GetBounds()[4:6]
    assert 4.0 < after_z[1] - before_z[1] < 8.0  # the surface is the moved tumour's: 6 mm up
    case.scene.RemoveNode(seg)


def test_a_parameter_node_from_another_platform_is_repaired_after_an_import(tmp_path):
    """A scene saved on another platform holds a device this one lacks (CUDA in a scene opened on a Mac): only
    getParameterNode() repaired it, not a scene imported into the open session.  repair_parameter_nodes()
    (what the widget calls on EndImportEvent) sets MedSynth's back to auto, and leaves other modules' nodes."""
    from MedSynthSlicerLib.logic import repair_parameter_nodes
    from MedSynthSlicerLib.parameters import device_parameter, platform_devices, repaired_device

    foreign = device_parameter("mps" if "mps" not in platform_devices() else "cuda")
    assert repaired_device(foreign) == device_parameter("auto")
    assert all(repaired_device(device_parameter(d)) is None for d in platform_devices())
    assert repaired_device("") is None  # never set: the wrapper writes its default
    assert repaired_device("CUDA", system="Darwin") == "AUTO" and repaired_device("MPS", system="Linux") == "AUTO"

    saved = slicer.vtkMRMLScene()
    for module_name, device in (("MedSynth", foreign), ("OtherModule", foreign)):
        node = slicer.vtkMRMLScriptedModuleNode()
        node.SetSingletonTag(module_name)
        node.SetName(module_name)
        node.SetAttribute("ModuleName", module_name)
        node.SetParameter("device", device)
        node.SetParameter("rating", "3")
        saved.AddNode(node)
    saved.SetURL(str(tmp_path / "saved.mrml"))
    assert saved.Commit()

    scene, _ = mrml.create_headless_scene()
    mine = slicer.vtkMRMLScriptedModuleNode()  # this session's parameter node
    mine.SetSingletonTag("MedSynth")
    mine.SetName("MedSynth")
    mine.SetParameter("device", device_parameter("cpu"))
    mine = scene.AddNode(mine)
    scene.SetURL(str(tmp_path / "saved.mrml"))
    assert scene.Import()
    nodes = {n.GetSingletonTag(): n for n in mrml.nodes_by_class(scene, "vtkMRMLScriptedModuleNode")}
    assert sorted(nodes) == ["MedSynth", "OtherModule"] and nodes["MedSynth"] is mine
    assert mine.GetParameter("device") == foreign and mine.GetParameter("rating") == "3"  # imported as saved
    assert repair_parameter_nodes(scene) == [mine]
    assert mine.GetParameter("device") == "AUTO" and mine.GetParameter("rating") == "3"
    assert nodes["OtherModule"].GetParameter("device") == foreign  # not MedSynth's: left alone
    assert repair_parameter_nodes(scene) == []  # nothing left to repair
    scene.Clear(1)


def test_a_closed_scenes_undo_steps_do_not_reach_the_next_scenes_segmentation(tmp_path):
    """slicer-core hands out the closed scene's node IDs again: without scene_closed() a tumour-free label
    segmentation loaded into the next scene could be undone into the closed scene's tumour."""
    from MedSynthLib.cases.template import template_label_map

    scene, _ = mrml.create_headless_scene()
    logic = WorkflowLogic(scene, work_dir=tmp_path)
    try:
        t1 = logic.load_template()
        seg = logic.prepare(t1)
        centre = np.argwhere(logic.labelmap(seg).array == Label.WM).mean(axis=0)[::-1]
        logic.add_parametric_tumour(seg, (mrml.ijk_to_ras(t1) @ np.append(centre, 1.0))[:3],
                                    TumourParameters(radius_mm=12.0, seed=1))
        assert logic.can_undo(seg)
        old_id = seg.GetID()
        scene.Clear(0)
        logic.scene_closed()
        # The next scene: a saved, tumour-free MedSynth label segmentation, loaded.
        t1 = logic.load_template()
        loaded = mrml.segmentation_from_labels(scene, template_label_map().array, t1, "loaded labels")
        loaded.SetAttribute("MedSynth.Role", "labels")
        loaded.SetAttribute("MedSynth.History", "[]")
        loaded.SetReferenceImageGeometryParameterFromVolumeNode(t1)
        assert loaded.GetID() == old_id  # the reused ID this guards against
        assert not logic.can_undo(loaded)
        assert logic.labelmap(loaded).history == []  # reading it records nothing
        assert not (logic.labelmap(loaded).array >= Label.NCR).any()
    finally:
        logic.cleanup()
        scene.Clear(0)


def test_load_case_refuses_a_medsynth_output_folder(tmp_path):
    """*Load case* reads a patient's scans.  A synthesize/Generate output folder read that way came in as a patient
    case without a segmentation (its tumour lost, and marked as a real case for inpainting): it is refused, the
    scene unchanged, with where its label map is."""
    from conftest import phantom, write_volume

    images, _ = phantom()
    folder = tmp_path / "synthetic_case"
    for modality, array in images.items():
        write_volume(array, folder / f"{modality}.nii.gz")
    (folder / "provenance.json").write_text(json.dumps({"kind": "medsynth-synthetic-case", "synthetic": True}))
    scene, _ = mrml.create_headless_scene()
    logic = WorkflowLogic(scene, work_dir=tmp_path / "work")
    before = _ids(scene)
    with pytest.raises(WorkflowError, match="MedSynth output.*labels.nii.gz"):
        logic.load_case(folder)
    assert _ids(scene) == before
