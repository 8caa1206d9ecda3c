"""MRML <-> MedSynthLib glue: volumes, grids, label maps and segmentations on a real scene.

Everything takes the scene (or nodes) explicitly and uses only MRML/VTK classes
and the ``slicer.util`` helpers that work on a bare scene (array <-> volume and
array <-> matrix conversions), so it runs in the Slicer application and on the
PyPI ``slicer-core`` libraries alike.  Files are read and written through
storage nodes (``vtkMRMLVolumeArchetypeStorageNode``); the ``slicer.util``
helpers that use the application's global scene or its modules
(``addVolumeFromArray``, ``loadVolume``, ``arrayFromSegmentBinaryLabelmap``)
are not used.

Conventions: numpy arrays are ``array[k, j, i]`` (SimpleITK's order, and the
order of ``vtkImageData`` scalars); MRML geometry is the 4x4 IJK-to-RAS
matrix; MedSynthLib's :class:`~MedSynthLib.schema.grid.Grid` is LPS.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np

import slicer
import slicer.util
import vtk
from vtkmodules.util import numpy_support

if TYPE_CHECKING:  # pragma: no cover
    from MedSynthLib.schema.grid import Grid

_LPS_RAS = np.diag([-1.0, -1.0, 1.0])

#: Tags/attributes the module writes (documented in the README).
LABEL_VALUE_TAG = "MedSynth.LabelValue"
FULL_NAME_TAG = "MedSynth.FullName"
LOCKED_TAG = "MedSynth.Locked"
HISTORY_ATTRIBUTE = "MedSynth.History"
#: The label map's privacy record as measured step by step (JSON), and the sha256 of the labels it describes.
PRIVACY_ATTRIBUTE = "MedSynth.Privacy"
LABELS_SHA256_ATTRIBUTE = "MedSynth.LabelsSHA256"
#: The label map before the user's edits (zlib-compressed uint8 voxels, base64) and its sha256: an attribute of
#: the label segmentation, so it is saved with it in every scene format (a node hidden from editors is not).
BEFORE_EDITS_ATTRIBUTE = "MedSynth.LabelsBeforeEdits"
BEFORE_EDITS_SHA256_ATTRIBUTE = "MedSynth.LabelsBeforeEditsSHA256"
ROLE_ATTRIBUTE = "MedSynth.Role"
#: Values of ROLE_ATTRIBUTE: what a node is to MedSynth.
ROLE = ROLE_ATTRIBUTE
ROLE_TEMPLATE = "template"
ROLE_LABELS = "labels"
ROLE_SYNTHETIC = "synthetic"
ROLE_PREVIEW = "preview"
ROLE_MOVING = "moving-tumour"
#: + modality: node reference role from the label segmentation to the volumes it was prepared from.
ORIGINAL_REFERENCE = "MedSynthOriginal_"
CONVENTION_ATTRIBUTE = "MedSynth.LabelConvention"
#: On the volumes of a loaded real case: its folder (Generate then inpaints into it by default).
SOURCE_CASE_ATTRIBUTE = "MedSynth.SourceCase"


class MRMLError(RuntimeError):
    """A scene operation failed (unreadable file, missing image data, ...)."""


def is_label_segmentation(node: Any) -> bool:
    """Whether ``node`` is a MedSynth label map: a segmentation node whose ``MedSynth.Role`` is ``labels``.

    The rule of the panel's label-segmentation selector (its ``addAttribute`` filter tests the same
    attribute): the handles' moving copy, a tumour input or any other segmentation is not offered.
    """
    return bool(node is not None and node.IsA("vtkMRMLSegmentationNode")
                and node.GetAttribute(ROLE_ATTRIBUTE) == ROLE_LABELS)


# --- matrices and grids ------------------------------------------------------------------------


def ijk_to_ras(node: Any) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix of a volume node."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def set_ijk_to_ras(node: Any, matrix: np.ndarray) -> None:
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(np.asarray(matrix, float)))


def grid_to_ijk_to_ras(grid: "Grid") -> np.ndarray:
    """MedSynthLib grid (LPS) -> MRML IJK-to-RAS matrix."""
    matrix = np.eye(4)
    matrix[:3, :3] = _LPS_RAS @ grid.direction_matrix @ np.diag(grid.spacing)
    matrix[:3, 3] = _LPS_RAS @ np.asarray(grid.origin, float)
    return matrix


def grid_from_matrix(matrix: np.ndarray, dimensions: Sequence[int]) -> "Grid":
    """MRML IJK-to-RAS matrix + (i, j, k) dimensions -> MedSynthLib grid (LPS)."""
    from MedSynthLib.schema.grid import Grid

    linear = np.asarray(matrix, float)[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0):
        raise MRMLError("degenerate IJK-to-RAS matrix (a zero spacing)")
    direction_lps = _LPS_RAS @ (linear / spacing)
    origin_lps = _LPS_RAS @ np.asarray(matrix, float)[:3, 3]
    return Grid(tuple(int(d) for d in dimensions), tuple(float(s) for s in spacing),  # type: ignore[arg-type]
                tuple(float(o) for o in origin_lps), tuple(float(v) for v in direction_lps.ravel()))


def grid_from_volume(node: Any) -> "Grid":
    image = node.GetImageData()
    if image is None:
        raise MRMLError(f"volume {node.GetName()!r} has no image data")
    return grid_from_matrix(ijk_to_ras(node), image.GetDimensions())


def geometry_difference(matrix_a: np.ndarray, dims_a: Sequence[int], matrix_b: np.ndarray,
                        dims_b: Sequence[int], atol_mm: float = 1e-3, atol_dir: float = 1e-4) -> str | None:
    """How two voxel grids differ (``None`` when they are the same grid)."""
    if tuple(dims_a) != tuple(dims_b):
        return f"size {tuple(dims_b)} differs from {tuple(dims_a)}"
    a, b = np.asarray(matrix_a, float), np.asarray(matrix_b, float)
    spacing_a, spacing_b = np.linalg.norm(a[:3, :3], axis=0), np.linalg.norm(b[:3, :3], axis=0)
    if not np.allclose(spacing_a, spacing_b, rtol=1e-4, atol=0):
        return f"spacing {_fmt(spacing_b)} differs from {_fmt(spacing_a)} mm"
    if not np.allclose(a[:3, 3], b[:3, 3], rtol=0, atol=max(atol_mm, 1e-4 * float(spacing_a.min()))):
        return f"origin {_fmt(b[:3, 3])} differs from {_fmt(a[:3, 3])} (RAS mm)"
    if not np.allclose(a[:3, :3] / spacing_a, b[:3, :3] / spacing_b, rtol=0, atol=atol_dir):
        return "axis directions differ"
    return None


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


# --- volumes -----------------------------------------------------------------------------------


def _scalar_voxels(node: Any) -> np.ndarray:
    """``slicer.util.arrayFromVolume`` of a scalar volume (a view of its memory), checked first."""
    image = node.GetImageData() if node is not None else None
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        name = node.GetName() if node is not None else "None"
        raise MRMLError(f"volume {name!r} has no voxel data")
    if image.GetNumberOfScalarComponents() != 1:
        raise MRMLError(f"volume {node.GetName()!r} has {image.GetNumberOfScalarComponents()} components; "
                        "a scalar volume is needed")
    return slicer.util.arrayFromVolume(node)


def array_from_volume(node: Any) -> np.ndarray:
    """A copy of a scalar volume's voxels as ``array[k, j, i]``."""
    return _scalar_voxels(node).copy()


def update_volume_region(node: Any, start: Sequence[int], region: np.ndarray) -> None:
    """Write ``region`` into a volume's voxels at ``start`` (k, j, i) in place, then mark the volume modified.

    Only the box is copied (a preview re-render changes a small part of the volume).
    """
    voxels = _scalar_voxels(node)
    stop = [int(a) + int(n) for a, n in zip(start, region.shape)]
    if region.ndim != 3 or any(int(a) < 0 for a in start) or any(b > d for b, d in zip(stop, voxels.shape)):
        raise MRMLError(f"region {tuple(region.shape)} at {tuple(start)} does not fit volume {node.GetName()!r}")
    voxels[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]] = region
    slicer.util.arrayFromVolumeModified(node)


def add_volume_from_array(scene: Any, array: np.ndarray, matrix: np.ndarray, name: str,
                          class_name: str = "vtkMRMLScalarVolumeNode") -> Any:
    """A new volume node in ``scene`` with ``array`` (``[k, j, i]``, copied) and the given IJK-to-RAS matrix.

    ``slicer.util.addVolumeFromArray`` adds to the application's global scene; this takes the scene.
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise MRMLError(f"expected a 3D array, got shape {array.shape}")
    if array.dtype == np.int64:  # slicer.util refuses VTK's long long (not rendered correctly)
        raise MRMLError(f"volume {name!r}: 64-bit integer voxels are not supported; convert to int32 or float32")
    node = scene.AddNewNodeByClass(class_name, name)
    set_ijk_to_ras(node, matrix)
    slicer.util.updateVolumeFromArray(node, array)
    node.CreateDefaultDisplayNodes()
    return node


def read_volume(scene: Any, path: str, name: str | None = None, labelmap: bool = False) -> Any:
    """Load an image file into a new volume node through a storage node.

    Raises:
        MRMLError: the file cannot be read (nothing is left in the scene).
    """
    import os

    class_name = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node_name = name or os.path.basename(str(path)).split(".")[0]
    node = scene.AddNewNodeByClass(class_name, node_name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    storage.SetSingleFile(1)
    if labelmap:
        storage.SetCenterImage(0)
    ok = bool(os.path.isfile(str(path))) and storage.ReadData(node)
    if not ok or node.GetImageData() is None:
        scene.RemoveNode(node)
        scene.RemoveNode(storage)
        raise MRMLError(f"{path}: cannot read this image file")
    node.SetAndObserveStorageNodeID(storage.GetID())
    node.CreateDefaultDisplayNodes()
    return node


def write_volume(scene: Any, node: Any, path: str) -> None:
    """Write a volume through a temporary storage node (the node's own storage node is untouched)."""
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    try:
        storage.SetFileName(str(path))
        storage.SetUseCompression(1)
        if not storage.WriteData(node):
            raise MRMLError(f"{path}: cannot write volume {node.GetName()!r}")
    finally:
        scene.RemoveNode(storage)


# --- segmentations -----------------------------------------------------------------------------


def _labelmap_name() -> str:
    return slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()


def segmentation_from_labels(scene: Any, labels: np.ndarray, reference: Any, name: str,
                             lock_anatomy: bool = True) -> Any:
    """A segmentation node with one segment per schema class (CSF, GM, WM, NCR, ED, ET).

    The segments share one labelmap layer (value = schema label) on the
    reference volume's grid, named and coloured from
    :data:`MedSynthLib.schema.labels.LABEL_INFO`.
    """
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    set_segmentation_labels(node, labels, reference, lock_anatomy=lock_anatomy)
    return node


def set_segmentation_labels(node: Any, labels: np.ndarray, reference: Any, lock_anatomy: bool = True) -> None:
    """Replace the segments of a MedSynth segmentation node with ``labels`` (schema values 0-6)."""
    from MedSynthLib.schema.labels import ANATOMY_LABELS, LABEL_INFO, Label

    labels = np.ascontiguousarray(labels, dtype=np.uint8)
    dims = reference.GetImageData().GetDimensions()
    if labels.shape != tuple(dims[::-1]):
        raise MRMLError(f"label array shape {labels.shape} does not fit the reference volume {dims[::-1]}")
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(dims)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    image.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras(reference)))
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = labels.ravel()
    segmentation = node.GetSegmentation()
    if _write_shared_labelmap(segmentation, labels, image):
        node.Modified()
        return
    was = node.StartModify()
    try:
        old = {}
        for segment_id in list(segmentation.GetSegmentIDs()):
            segment = segmentation.GetSegment(segment_id)
            old[segment.GetName()] = get_tag(segment, LOCKED_TAG)
            segmentation.RemoveSegment(segment_id)
        for label in Label:
            if label == Label.BACKGROUND:
                continue
            info = LABEL_INFO[label]
            segment = slicer.vtkSegment()
            segment.SetName(info.short_name)
            segment.SetColor(*info.color)
            segment.SetLabelValue(int(label))
            segment.AddRepresentation(_labelmap_name(), image)
            segment.SetTag(LABEL_VALUE_TAG, str(int(label)))
            segment.SetTag(FULL_NAME_TAG, info.name)
            locked = lock_anatomy and label in ANATOMY_LABELS
            previous = old.get(info.short_name)
            if previous is not None:
                locked = previous == "1"
            segment.SetTag(LOCKED_TAG, "1" if locked else "0")
            if locked:
                slicer.vtkSlicerSegmentationsModuleLogic.SetSegmentStatus(
                    segment, slicer.vtkSlicerSegmentationsModuleLogic.Completed)
            segmentation.AddSegment(segment, info.short_name)
    finally:
        node.EndModify(was)
    node.Modified()


def _write_shared_labelmap(segmentation: Any, labels: np.ndarray, image: Any) -> bool:
    """Write ``labels`` into the one labelmap the six MedSynth segments share, in place; ``False`` (nothing
    written) unless the segmentation still has exactly those segments on one layer with ``image``'s geometry.

    Removing and adding the segments again costs about 15 ms a segment on a 240 x 240 x 155 grid (each
    removal clears its label from the shared labelmap); an edit in the preview commits its labels every
    time.  The segments keep their IDs, tags and display; the labelmap's Modified event makes the
    segmentation drop its derived representations (the 3D surfaces), as an edit in the Segment Editor does.
    """
    from MedSynthLib.schema.labels import LABEL_INFO, Label

    expected = {LABEL_INFO[label].short_name: int(label) for label in Label if label != Label.BACKGROUND}
    ids = list(segmentation.GetSegmentIDs())
    if len(ids) != len(expected) or segmentation.GetNumberOfLayers() != 1:
        return False
    if any(expected.get(segmentation.GetSegment(i).GetName()) != segmentation.GetSegment(i).GetLabelValue()
           for i in ids):
        return False
    layer = segmentation.GetSegment(ids[0]).GetRepresentation(_labelmap_name())
    if (layer is None or layer.GetScalarType() != vtk.VTK_UNSIGNED_CHAR or layer.GetNumberOfScalarComponents() != 1
            or tuple(layer.GetExtent()) != tuple(image.GetExtent())):
        return False
    here, there = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    layer.GetImageToWorldMatrix(here)
    image.GetImageToWorldMatrix(there)
    if not np.allclose(slicer.util.arrayFromVTKMatrix(here), slicer.util.arrayFromVTKMatrix(there)):
        return False
    numpy_support.vtk_to_numpy(layer.GetPointData().GetScalars())[:] = labels.ravel()
    layer.Modified()
    return True


def get_tag(segment: Any, tag: str) -> str | None:
    """A segment tag's value, or ``None`` when the segment has no such tag."""
    value = vtk.reference("")
    return str(value) if segment.GetTag(tag, value) else None


def segment_names(node: Any) -> list[str]:
    segmentation = node.GetSegmentation()
    return [segmentation.GetSegment(sid).GetName() for sid in segmentation.GetSegmentIDs()]


def segment_binary_masks(node: Any, reference: Any) -> dict[str, np.ndarray]:
    """Every segment as a boolean ``array[k, j, i]`` on the reference volume's grid (by segment ID)."""
    masks: dict[str, np.ndarray] = {}
    scene = node.GetScene()
    segmentation = node.GetSegmentation()
    for segment_id in segmentation.GetSegmentIDs():
        before = set(node_ids(scene))
        temp = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__medsynth_temp__")
        try:
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(segment_id)
            ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(node, ids, temp, reference)
            if not ok:
                raise MRMLError(f"segment {segmentation.GetSegment(segment_id).GetName()!r} of "
                                f"{node.GetName()!r} cannot be resampled onto the reference volume")
            if temp.GetImageData() is None:
                masks[segment_id] = np.zeros(reference.GetImageData().GetDimensions()[::-1], bool)
            else:
                masks[segment_id] = array_from_volume(temp) > 0
        finally:
            # the export adds the labelmap's display node and a colour table: remove all it added
            for added_id in reversed([i for i in node_ids(scene) if i not in before]):
                added = scene.GetNodeByID(added_id)
                if added is not None:
                    scene.RemoveNode(added)
    return masks


def segmentation_stamp(node: Any) -> tuple[int, ...]:
    """Modification times of a segmentation node, its segments and their binary labelmaps.

    Any change made through VTK or Slicer (a Segment Editor stroke, ``slicer.util`` array
    updates, a segment added or removed) raises one of them, so an equal stamp means
    the voxels are those read last time.
    """
    segmentation = node.GetSegmentation()
    stamp = [int(node.GetMTime()), int(segmentation.GetMTime()), segmentation.GetNumberOfSegments()]
    for segment_id in segmentation.GetSegmentIDs():
        segment = segmentation.GetSegment(segment_id)
        image = segment.GetRepresentation(_labelmap_name())
        stamp += [int(segment.GetMTime()), int(image.GetMTime()) if image is not None else -1]
    return tuple(stamp)


def segmentation_geometry(node: Any) -> tuple[np.ndarray, tuple[int, int, int, int, int, int]] | None:
    """(image-to-world matrix, extent) of a segmentation's first binary labelmap, if it has one."""
    segmentation = node.GetSegmentation()
    for segment_id in segmentation.GetSegmentIDs():
        image = segmentation.GetSegment(segment_id).GetRepresentation(_labelmap_name())
        if image is None:
            continue
        extent = image.GetExtent()
        if extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]:
            continue  # an empty segment carries no geometry
        matrix = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(matrix)
        return slicer.util.arrayFromVTKMatrix(matrix), tuple(image.GetExtent())  # type: ignore[return-value]
    return None


# --- scene helpers -----------------------------------------------------------------------------


@contextlib.contextmanager
def scene_guard(scene: Any) -> Iterator[list[str]]:
    """Remove every node added inside the block when it raises (the scene is left as it was)."""
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    added: list[str] = []
    try:
        yield added
    except BaseException:
        now = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in reversed(now):
            if node is not None and node.GetID() not in before:
                scene.RemoveNode(node)
        raise


def remove_nodes(scene: Any, *nodes: Any) -> None:
    """Remove nodes with their display and storage nodes (a bare scene does not do that itself)."""
    for node in nodes:
        if node is None or not scene.IsNodePresent(node):
            continue
        helpers = []
        for getter in ("GetNumberOfDisplayNodes", "GetNumberOfStorageNodes"):
            if hasattr(node, getter):
                nth = node.GetNthDisplayNode if "Display" in getter else node.GetNthStorageNode
                helpers += [nth(i) for i in range(getattr(node, getter)())]
        scene.RemoveNode(node)
        for helper in helpers:
            if helper is not None and scene.IsNodePresent(helper):
                scene.RemoveNode(helper)


def node_ids(scene: Any) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def nodes_by_class(scene: Any, class_name: str) -> list[Any]:
    collection = scene.GetNodesByClass(class_name)
    return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]


def create_headless_scene() -> tuple[Any, Mapping[str, Any]]:
    """A scene with the logics Slicer sets up (application, colours, volumes, segmentations).

    For tests and offscreen rendering without the application; returns the
    scene and the logics (kept alive by the caller).
    """
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    app_logic.GetColorLogic().SetMRMLScene(scene)
    app_logic.GetColorLogic().AddDefaultColorNodes()
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLScene(scene)
    volumes.SetMRMLApplicationLogic(app_logic)
    app_logic.SetModuleLogic("Volumes", volumes)
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLScene(scene)
    segmentations.SetMRMLApplicationLogic(app_logic)
    app_logic.SetModuleLogic("Segmentations", segmentations)
    crosshair = slicer.vtkMRMLCrosshairNode()
    crosshair.SetCrosshairName("default")
    scene.AddNode(crosshair)
    return scene, {"app": app_logic, "volumes": volumes, "segmentations": segmentations}
