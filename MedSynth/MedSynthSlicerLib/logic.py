"""The MedSynth workflow on an MRML scene, without Qt: input, prepare, edit, generate, review, export.

:class:`WorkflowLogic` holds no science: every label-map operation is a
MedSynthLib call (``derive_label_map``, the edits of :mod:`MedSynthLib.edits`),
synthesis and export run the ``medsynth`` command line in a separate process
(:class:`~MedSynthSlicerLib.process.ProcessRunner`).  The Logic only moves data
between MRML nodes and MedSynthLib objects, and keeps the rules of the module:

* inputs are never modified (their voxels and IJK-to-RAS matrices are read,
  never written);
* outputs keep the input's IJK-to-RAS matrix exactly;
* every problem raises :class:`~MedSynthSlicerLib.errors.WorkflowError` with one
  clear sentence, and leaves the scene as it was (nodes added by the failing
  call are removed, existing nodes are changed only after all checks passed).

The label map being edited lives in a segmentation node (segments CSF, GM,
WM, NCR, ED, ET); its provenance history is kept in the node attribute
``MedSynth.History`` (JSON), so it survives saving the scene.  Changes made with
the Segment Editor are detected when the label map is read back and recorded
as a ``manual_segment_edit`` record.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from . import mrml
from .environment import backend_env, ensure_medsynthlib_importable
from .errors import CancelledError, WorkflowError
from .parameters import (EXPORT_FORMATS, EXPORT_NAMINGS, LABEL_CONVENTIONS, NOTE_MAX_CHARS, RATINGS,
                         GenerateOptions, TumourParameters)
from .process import ProcessRunner, Progress, parse_tqdm_progress, python_executable
from .signals import Signal

if TYPE_CHECKING:  # pragma: no cover
    from MedSynthLib.schema.grid import LabelMap

ensure_medsynthlib_importable()  # the schema's labels module needs numpy only
from MedSynthLib.schema.labels import MODALITIES, MODALITY_TITLES  # noqa: E402
SCRIPTS_DIR = Path(__file__).resolve().parent
RUN_CLI = SCRIPTS_DIR / "run_cli.py"
PREVIEW_WORKER = SCRIPTS_DIR / "preview_worker.py"

ROLE = mrml.ROLE_ATTRIBUTE
ROLE_TEMPLATE = "template"
ROLE_LABELS = "labels"
ROLE_SYNTHETIC = "synthetic"
ROLE_PREVIEW = "preview"
ROLE_MOVING = "moving-tumour"
ORIGINAL_REFERENCE = "MedSynthOriginal_"  # + modality: node reference role on the label segmentation
CONVENTION_ATTRIBUTE = "MedSynth.LabelConvention"
REVIEW_LAYOUT_ID = 260601
REVIEW_VIEWS = {m: f"MedSynth{MODALITY_TITLES[m]}" for m in MODALITIES}
MANUAL_EDIT = "manual_segment_edit"

#: Progress of ``medsynth synthesize`` by the step its counter names.
_SYNTH_STEPS = {"model loaded": 0.35, "synthesised": 0.85, "written": 1.0}
_EXPORT_STEPS: dict[str, float] = {}


def _lib():
    """Import MedSynthLib lazily (the module loads before its dependencies are installed)."""
    ensure_medsynthlib_importable()
    import MedSynthLib.schema.labels as labels

    return labels


# --- segment names ---------------------------------------------------------------------------


def _normalise(name: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[_\-/]+", " ", name.strip().lower()))


def segment_label(name: str, convention: str = "brats2021") -> int | None:
    """The schema label a segment name stands for, or ``None`` when it is unknown.

    Accepted: the schema short names (CSF, GM, WM, NCR, ED, ET) and full names,
    common synonyms (necrosis, oedema/edema, enhancing tumour, white matter ...),
    and ``Segment_N`` / ``Label_N`` / ``N`` holding a tumour value of ``convention``.
    """
    labels = _lib()
    text = _normalise(name)
    table: dict[str, int] = {}
    for label, info in labels.LABEL_INFO.items():
        if label == labels.Label.BACKGROUND:
            continue
        table[_normalise(info.short_name)] = int(label)
        table[_normalise(info.name)] = int(label)
    synonyms = {
        labels.Label.CSF: ("cerebrospinal fluid", "csf"),
        labels.Label.GM: ("grey matter", "gray matter", "cortical grey matter", "cortical gray matter"),
        labels.Label.WM: ("white matter", "cerebral white matter"),
        labels.Label.NCR: ("necrosis", "necrotic", "necrotic core", "ncr net", "net", "non enhancing",
                           "non enhancing tumour core", "non enhancing tumor core", "necrotic tumor core",
                           "necrotic tumour core"),
        labels.Label.ED: ("edema", "oedema", "peritumoral edema", "peritumoural oedema", "peritumoral oedema",
                          "snfh", "surrounding non enhancing flair hyperintensity"),
        labels.Label.ET: ("enhancing", "enhancing tumor", "enhancing tumour", "enhancing tumor core"),
    }
    for label, words in synonyms.items():
        for word in words:
            table[_normalise(word)] = int(label)
    if text in table:
        return table[text]
    match = re.fullmatch(r"(?:segment|label)?\s*(\d+)", text)
    if match:
        value = int(match.group(1))
        conv = labels.CONVENTIONS[convention]
        if value in conv.to_schema:
            return int(conv.to_schema[value])
    return None


def _check_convention(convention: str) -> str:
    if convention not in LABEL_CONVENTIONS:
        raise WorkflowError(f"unknown tumour-label convention {convention!r} "
                            f"(choose from {', '.join(LABEL_CONVENTIONS)})")
    return convention


# --- the affine of the tumour handles as MedSynthLib edits -------------------------------------


def _tidy(values: Sequence[float], digits: int = 6) -> tuple[float, ...]:
    """Round to ``digits`` decimals (and drop negative zeros) for readable provenance."""
    return tuple(float(round(float(v), digits)) + 0.0 for v in values)


def linear_edits_for_matrix(matrix_ras: np.ndarray) -> list[Any]:
    """Rotate/Scale edits whose composition is the linear part of a RAS transform.

    ``A = R P`` (polar decomposition); ``P = V S V^T``.  A scale along the RAS
    axes (``V = I``) is one :class:`Scale`; a scale along other axes becomes
    ``Rotate(V^T), Scale(S), Rotate(R V)``; a rotation is one :class:`Rotate`.
    Each edit acts about the tumour's centre, so the translation is added
    afterwards (see :meth:`WorkflowLogic.transform_tumour`).

    Raises:
        WorkflowError: a mirroring or collapsing transform.
    """
    ensure_medsynthlib_importable()
    from MedSynthLib.edits import Rotate, Scale, euler_xyz_from_rotation

    a = np.asarray(matrix_ras, float)[:3, :3]
    if not np.all(np.isfinite(a)):
        raise WorkflowError("the tumour transform holds non-finite numbers")
    det = float(np.linalg.det(a))
    if det <= 1e-6:
        raise WorkflowError("the tumour transform mirrors or collapses the tumour; use a positive scale")
    u, s, vt = np.linalg.svd(a)
    rotation = u @ vt
    v = vt.T.copy()
    if np.linalg.det(v) < 0:
        v[:, 0] *= -1.0
    edits: list[Any] = []
    if not np.allclose(s, 1.0, atol=1e-4):
        p = v @ np.diag(s) @ v.T
        if np.allclose(p - np.diag(np.diag(p)), 0.0, atol=1e-6 * float(s.max())):
            edits.append(Scale(_tidy(np.diag(p))))
        else:
            edits.append(Rotate(_tidy(euler_xyz_from_rotation(v.T))))
            edits.append(Scale(_tidy(s)))
            rotation = rotation @ v
    if not np.allclose(rotation, np.eye(3), atol=1e-6):
        edits.append(Rotate(_tidy(euler_xyz_from_rotation(rotation))))
    return edits


# --- jobs --------------------------------------------------------------------------------------


@dataclass
class GenerationJob:
    """A running ``medsynth synthesize`` (or preview) for one label segmentation."""

    runner: ProcessRunner
    run_dir: Path
    out_dir: Path
    segmentation_id: str
    reference_id: str
    labels_sha256: str
    options: GenerateOptions
    kind: str = "synthesize"
    status: str = "running"  # running, done, failed, cancelled
    started: float = field(default_factory=time.monotonic)
    outputs: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def poll(self) -> bool:
        """Forward output/progress; True while the process runs."""
        return self.runner.poll()


@dataclass
class ExportJob:
    runner: ProcessRunner
    case_dir: Path
    folder: Path
    fmt: str
    status: str = "running"
    targets: list[Path] = field(default_factory=list)

    def poll(self) -> bool:
        return self.runner.poll()


class _StepProgress:
    """tqdm counter -> monotone progress, with the step names of a command mapped to fractions."""

    def __init__(self, steps: Mapping[str, float]) -> None:
        self.steps = steps
        self.best = 0.0

    def __call__(self, line: str) -> Progress | None:
        report = parse_tqdm_progress(line)
        if report is None:
            return None
        fraction = max(report.fraction, self.steps.get(report.text, 0.0))
        self.best = max(self.best, fraction)
        return Progress(self.best, report.text)


# --- the workflow --------------------------------------------------------------------------------


class WorkflowLogic:
    """MedSynth's module logic on one MRML scene (no Qt; tested on slicer-core).

    Args:
        scene: the ``vtkMRMLScene``.
        python: the Python that runs the backend (default: ``PythonSlicer`` in
            Slicer, this interpreter elsewhere).
        work_dir: where label maps and synthetic cases of this session go
            (default: a new temporary folder).

    Signals:
        log(str): one line for the module's log box (backend output included).
        progress(float, str): progress of the running job.
    """

    def __init__(self, scene: Any, python: str | None = None, work_dir: str | os.PathLike[str] | None = None) -> None:
        self.scene = scene
        self.python = python or python_executable()
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="medsynth-slicer-"))
        self.log = Signal("str")
        self.progress = Signal("float", "str")
        self._committed: dict[str, np.ndarray] = {}
        self._undo: dict[str, list[tuple[np.ndarray, list[dict[str, Any]]]]] = {}
        self._run_counter = 0
        self._preview: "PreviewSession | None" = None
        self.device_info = None

    # =========================================================================================
    # 1. input
    # =========================================================================================

    def load_case(self, folder: str | os.PathLike[str], convention: str | None = None,
                  label_convention: str | None = None) -> dict[str, Any]:
        """Load a case folder (BraTS 2021/2023, MSD, BRATS 2015 naming) into the scene.

        Volumes are read through storage nodes (MSD 4D images are split from
        MedSynthLib's reader); the tumour segmentation, if any, becomes a
        labelmap volume node holding the dataset's own values, with its
        convention in the ``MedSynth.LabelConvention`` attribute.

        Returns:
            ``{"t1": node, "t1ce": node, "t2": node, "flair": node, "tumour": node or None}``
        """
        ensure_medsynthlib_importable()
        from MedSynthLib.cases.readers import read_case
        from MedSynthLib.schema.errors import MedSynthError

        folder = Path(folder)
        try:
            case = read_case(folder, convention=convention, label_convention=label_convention)
        except MedSynthError as exc:
            raise WorkflowError(str(exc)) from None
        nodes: dict[str, Any] = {}
        with mrml.scene_guard(self.scene):
            matrix = mrml.grid_to_ijk_to_ras(case.grid)
            for modality in MODALITIES:
                name = f"{case.case_id} {MODALITY_TITLES[modality]}"
                path = case.files[modality]
                if case.convention == "msd":
                    nodes[modality] = mrml.add_volume_from_array(self.scene, case.images[modality], matrix, name)
                else:
                    try:
                        nodes[modality] = mrml.read_volume(self.scene, str(path), name)
                    except mrml.MRMLError as exc:
                        raise WorkflowError(str(exc)) from None
                nodes[modality].SetAttribute("MedSynth.Modality", modality)
            nodes["tumour"] = None
            if "seg" in case.files:
                try:
                    tumour = mrml.read_volume(self.scene, str(case.files["seg"]), f"{case.case_id} tumour",
                                              labelmap=True)
                except mrml.MRMLError as exc:
                    raise WorkflowError(str(exc)) from None
                tumour.SetAttribute(CONVENTION_ATTRIBUTE, case.label_convention)
                nodes["tumour"] = tumour
        self.log.emit(f"loaded case {case.case_id} ({case.convention} naming)")
        return nodes

    def load_template(self) -> Any:
        """The healthy ICBM152 2009a template T1 as a volume node (one click, no download)."""
        ensure_medsynthlib_importable()
        import SimpleITK as sitk
        from MedSynthLib.cases.template import TEMPLATE_NAME, template_t1
        from MedSynthLib.schema.grid import Grid

        image = template_t1()
        grid = Grid.from_image(image)
        with mrml.scene_guard(self.scene):
            node = mrml.add_volume_from_array(self.scene, sitk.GetArrayFromImage(image).astype(np.float32),
                                              mrml.grid_to_ijk_to_ras(grid), f"MedSynth template T1 ({TEMPLATE_NAME})")
            node.SetAttribute(ROLE, ROLE_TEMPLATE)
            node.SetAttribute("MedSynth.Modality", "t1")
        return node

    # =========================================================================================
    # 2. prepare
    # =========================================================================================

    def _check_brain_volume(self, node: Any, what: str = "T1") -> np.ndarray:
        if node is None:
            raise WorkflowError(f"no brain selected: choose a {what} volume, load a case folder or use the "
                                "healthy template")
        if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
            raise WorkflowError(f"{node.GetName()!r} is not a scalar volume; choose the {what} image")
        try:
            array = mrml.array_from_volume(node)
        except mrml.MRMLError as exc:
            raise WorkflowError(f"no brain selected: {exc}") from None
        if min(array.shape) < 2:
            raise WorkflowError(f"{node.GetName()!r} is not a 3D volume (shape {array.shape[::-1]})")
        if not np.all(np.isfinite(array)):
            raise WorkflowError(f"{node.GetName()!r} holds NaN or infinite voxels")
        if not np.any(array != 0):
            raise WorkflowError(f"{node.GetName()!r} is empty (every voxel is 0): no brain to work on")
        return array

    def _same_grid(self, reference: Any, node: Any, what: str) -> None:
        dims_ref = reference.GetImageData().GetDimensions()
        dims = node.GetImageData().GetDimensions() if node.GetImageData() is not None else (0, 0, 0)
        difference = mrml.geometry_difference(mrml.ijk_to_ras(reference), dims_ref, mrml.ijk_to_ras(node), dims)
        if difference is not None:
            raise WorkflowError(f"{what} {node.GetName()!r} is on another grid than {reference.GetName()!r}: "
                                f"{difference}; resample it onto the T1 first (Resample Scalar/Vector/DWI "
                                "Volume or the Segmentations module)")

    def tumour_from_node(self, tumour: Any, reference: Any, convention: str = "brats2021") -> np.ndarray:
        """A tumour segmentation or labelmap volume as schema labels {0, 4, 5, 6} on the reference grid.

        Raises:
            WorkflowError: another grid, a segment name or label value the
                convention does not define, or anatomy-only content.
        """
        labels = _lib()
        convention = tumour.GetAttribute(CONVENTION_ATTRIBUTE) or convention if tumour is not None else convention
        _check_convention(convention)
        if tumour.IsA("vtkMRMLLabelMapVolumeNode") or tumour.IsA("vtkMRMLScalarVolumeNode"):
            self._same_grid(reference, tumour, "tumour labelmap")
            values = mrml.array_from_volume(tumour)
            try:
                return labels.tumour_to_schema(values, convention)
            except labels.LabelValueError as exc:
                raise WorkflowError(f"tumour labelmap {tumour.GetName()!r}: {exc}; choose the right "
                                    "tumour-label convention") from None
        if tumour.IsA("vtkMRMLSegmentationNode"):
            array = self._labels_from_segmentation(tumour, reference, convention, what="tumour segmentation")
            return np.where(array >= labels.Label.NCR, array, 0).astype(np.uint8)
        raise WorkflowError(f"{tumour.GetName()!r} is neither a segmentation nor a labelmap volume")

    def _labels_from_segmentation(self, node: Any, reference: Any, convention: str, what: str) -> np.ndarray:
        labels = _lib()
        geometry = mrml.segmentation_geometry(node)
        dims = reference.GetImageData().GetDimensions()
        if geometry is not None:
            matrix, extent = geometry
            difference = mrml.geometry_difference(mrml.ijk_to_ras(reference), dims, matrix, dims)
            if difference is not None:
                raise WorkflowError(f"{what} {node.GetName()!r} is on another grid than {reference.GetName()!r}: "
                                    f"{difference}; set its geometry to the T1 (Segment Editor: "
                                    "'Specify geometry') or resample it first")
            if extent[0] <= extent[1] and (extent[0] < 0 or extent[2] < 0 or extent[4] < 0 or extent[1] >= dims[0]
                                            or extent[3] >= dims[1] or extent[5] >= dims[2]):
                raise WorkflowError(f"{what} {node.GetName()!r} reaches outside the grid of "
                                    f"{reference.GetName()!r}; crop or resample it onto the T1 first")
        segmentation = node.GetSegmentation()
        mapping: dict[str, int] = {}
        unknown = []
        for segment_id in segmentation.GetSegmentIDs():
            name = segmentation.GetSegment(segment_id).GetName()
            value = segment_label(name, convention)
            if value is None:
                unknown.append(name)
            else:
                mapping[segment_id] = value
        if unknown:
            raise WorkflowError(f"{what} {node.GetName()!r} has segments MedSynth does not know: "
                                f"{', '.join(repr(u) for u in unknown)}; name them CSF, GM, WM, NCR, ED or ET "
                                f"(or Segment_N with a {convention} tumour value) or remove them")
        masks = mrml.segment_binary_masks(node, reference)
        out = np.zeros(dims[::-1], np.uint8)
        # Anatomy first, then tumour from outside in: ED < ET < NCR (the inner class wins on overlap).
        order = [labels.Label.CSF, labels.Label.GM, labels.Label.WM, labels.Label.ED, labels.Label.ET,
                 labels.Label.NCR]
        for label in order:
            for segment_id, value in mapping.items():
                if value == int(label):
                    out[masks[segment_id]] = int(label)
        return out

    def prepare(self, t1: Any, tumour: Any = None, label_convention: str = "brats2021",
                others: Mapping[str, Any] | None = None, name: str | None = None,
                lock_anatomy: bool = True) -> Any:
        """Derive the 7-class label map and show it as a segmentation node.

        Anatomy (CSF/GM/WM) comes from MedSynthLib's ``derive_label_map`` on the
        T1 (the template's own label map for the healthy template); tumour
        voxels are copied from ``tumour`` (a segmentation or a labelmap volume).

        Args:
            t1: the T1 volume node (or the template node from :meth:`load_template`).
            tumour: optional tumour segmentation / labelmap volume on the T1 grid.
            label_convention: tumour values of a labelmap / ``Segment_N`` names.
            others: optional ``{"t1ce": node, "t2": node, "flair": node}`` (kept as
                the original case for the review; they help the brain mask).
            lock_anatomy: tag the anatomy segments locked.

        Returns:
            The new segmentation node (segments CSF, GM, WM, NCR, ED, ET).
        """
        ensure_medsynthlib_importable()
        from MedSynthLib.cases.anatomy import derive_label_map
        from MedSynthLib.cases.readers import Case
        from MedSynthLib.schema.errors import MedSynthError
        from MedSynthLib.schema.labels import brain_mask

        _check_convention(label_convention)
        t1_array = self._check_brain_volume(t1)
        others = {k: v for k, v in (others or {}).items() if v is not None}
        for modality, node in others.items():
            if modality not in MODALITIES:
                raise WorkflowError(f"unknown modality {modality!r} (expected {', '.join(MODALITIES)})")
            self._check_brain_volume(node, MODALITY_TITLES[modality])
            self._same_grid(t1, node, MODALITY_TITLES[modality])
        tumour_array = None
        if tumour is not None:
            tumour_array = self.tumour_from_node(tumour, t1, label_convention)
        grid = mrml.grid_from_volume(t1)
        if t1.GetAttribute(ROLE) == ROLE_TEMPLATE:
            from MedSynthLib.cases.template import template_label_map

            labelmap = template_label_map()
            if labelmap.grid.difference(grid) is not None:
                raise WorkflowError("the template volume does not match the template label map")
            if tumour_array is not None and tumour_array.any():
                array = labelmap.array.copy()
                place = tumour_array > 0
                array[place] = tumour_array[place]
                labelmap = labelmap.with_array(array, {"name": "tumour_from_segmentation",
                                                       "params": {"label_convention": label_convention},
                                                       "schema_version": labelmap.schema_version})
        else:
            images = {"t1": t1_array.astype(np.float32)}
            images.update({m: mrml.array_from_volume(n).astype(np.float32) for m, n in others.items()})
            case = Case(case_id="slicer", convention="slicer-scene", label_convention=label_convention, grid=grid,
                        images=images, tumour=tumour_array, files={})
            self.log.emit("deriving the anatomy (CSF/GM/WM) from the T1 ...")
            try:
                labelmap = derive_label_map(case)
            except MedSynthError as exc:
                raise WorkflowError(f"{t1.GetName()!r}: {exc}") from None
        if not brain_mask(labelmap.array).any():
            raise WorkflowError(f"{t1.GetName()!r}: the label map has no brain voxels")
        with mrml.scene_guard(self.scene):
            node = mrml.segmentation_from_labels(self.scene, labelmap.array, t1,
                                                 name or f"{t1.GetName()} MedSynth labels", lock_anatomy=lock_anatomy)
            node.SetAttribute(ROLE, ROLE_LABELS)
            node.SetAttribute(CONVENTION_ATTRIBUTE, label_convention)
            node.SetAttribute(mrml.HISTORY_ATTRIBUTE, json.dumps(labelmap.history))
            node.SetNodeReferenceID(ORIGINAL_REFERENCE + "t1", t1.GetID())
            for modality, other in others.items():
                node.SetNodeReferenceID(ORIGINAL_REFERENCE + modality, other.GetID())
        self._committed[node.GetID()] = labelmap.array.copy()
        self._undo[node.GetID()] = []
        self.log.emit(f"label map ready: {node.GetName()}")
        return node

    # =========================================================================================
    # the label map of a segmentation node
    # =========================================================================================

    def reference_volume(self, segmentation: Any) -> Any:
        if segmentation is None or not segmentation.IsA("vtkMRMLSegmentationNode"):
            raise WorkflowError("no MedSynth label segmentation selected: run Prepare first")
        ref = segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole())
        if ref is None:
            ref = segmentation.GetNodeReference(ORIGINAL_REFERENCE + "t1")
        if ref is None or ref.GetImageData() is None:
            raise WorkflowError(f"{segmentation.GetName()!r} has no reference volume (its T1 was removed?); "
                                "run Prepare again")
        return ref

    def labelmap(self, segmentation: Any) -> "LabelMap":
        """The current label map of a MedSynth segmentation, Segment Editor changes included.

        Changes made since the last MedSynth step (Segment Editor strokes) are
        taken here, as one ``manual_segment_edit`` record with the per-class voxel
        changes (one undo step), and written back to the segmentation with two
        rules applied: voxels of a locked anatomy segment keep their class unless
        tumour was drawn over them, and voxels whose tumour was erased down to
        nothing are refilled with the healthy anatomy.

        Raises:
            WorkflowError: no reference volume, another grid, unknown segments, an empty brain.
        """
        ensure_medsynthlib_importable()
        from MedSynthLib.edits import healthy_anatomy
        from MedSynthLib.schema.grid import LabelMap
        from MedSynthLib.schema.labels import SCHEMA_VERSION, Label, brain_mask, label_counts, tumour_mask

        reference = self.reference_volume(segmentation)
        convention = segmentation.GetAttribute(CONVENTION_ATTRIBUTE) or "brats2021"
        array = self._labels_from_segmentation(segmentation, reference, convention, what="label segmentation")
        try:
            history = json.loads(segmentation.GetAttribute(mrml.HISTORY_ATTRIBUTE) or "[]")
        except ValueError:
            history = []
        grid = mrml.grid_from_volume(reference)
        committed = self._committed.get(segmentation.GetID())
        if committed is None or committed.shape != array.shape:
            # first sight of this segmentation in this session (e.g. a reloaded scene): take it as it is
            if brain_mask(array).any():
                self._committed[segmentation.GetID()] = array.copy()
        elif not np.array_equal(committed, array):
            edited = array.copy()
            locked = self.locked_labels(segmentation)
            # A locked anatomy class keeps its voxels unless tumour is drawn over them: an edit that
            # changes them otherwise is refused as a whole (the segmentation is put back) and reported.
            violated = np.isin(committed, locked) & (edited != committed) & (edited < Label.NCR)
            if violated.any():
                mrml.set_segmentation_labels(segmentation, committed, reference)
                names = ", ".join(_lib().LABEL_INFO[_lib().Label(v)].short_name
                                  for v in sorted(set(np.unique(committed[violated]).tolist())))
                message = (f"the Segment Editor changed {int(violated.sum())} voxels of the locked anatomy "
                           f"segments ({names}); that edit was refused and undone. Draw tumour over the anatomy, "
                           "or untick 'Lock the anatomy segments' to change the anatomy itself")
                self.log.emit(message)
                raise WorkflowError(message)
            erased = (edited == Label.BACKGROUND) & tumour_mask(committed)
            if erased.any():
                edited[erased] = healthy_anatomy(committed, grid.spacing)[erased]
            previous = LabelMap(committed, grid, history)
            if not np.array_equal(committed, edited):
                before, after = label_counts(committed), label_counts(edited)
                history = list(history) + [{
                    "name": MANUAL_EDIT,
                    "params": {"changed_voxels": int(np.count_nonzero(committed != edited)),
                               "voxel_change": {k: after[k] - before[k] for k in after if after[k] != before[k]}},
                    "schema_version": SCHEMA_VERSION,
                }]
            if not brain_mask(edited).any():
                raise WorkflowError(f"{segmentation.GetName()!r} has no brain voxels (every segment is empty)")
            result = LabelMap(edited, grid, history)
            self._commit(segmentation, result, previous if not np.array_equal(committed, edited) else None)
            return result
        if not brain_mask(array).any():
            raise WorkflowError(f"{segmentation.GetName()!r} has no brain voxels (every segment is empty)")
        return LabelMap(array, grid, history)

    def locked_labels(self, segmentation: Any) -> list[int]:
        """Schema values of the segments tagged ``MedSynth.Locked`` = 1."""
        convention = segmentation.GetAttribute(CONVENTION_ATTRIBUTE) or "brats2021"
        out = []
        seg = segmentation.GetSegmentation()
        for segment_id in seg.GetSegmentIDs():
            segment = seg.GetSegment(segment_id)
            if mrml.get_tag(segment, mrml.LOCKED_TAG) == "1":
                value = segment_label(segment.GetName(), convention)
                if value is not None:
                    out.append(value)
        return out

    def set_anatomy_locked(self, segmentation: Any, locked: bool) -> None:
        """Lock (or unlock) the CSF, GM and WM segments against Segment Editor changes."""
        labels = _lib()
        seg = segmentation.GetSegmentation()
        for label in labels.ANATOMY_LABELS:
            segment = seg.GetSegment(labels.LABEL_INFO[label].short_name)
            if segment is not None:
                segment.SetTag(mrml.LOCKED_TAG, "1" if locked else "0")

    def configure_segment_editor(self, editor_node: Any, segmentation: Any, segment: str = "ED") -> None:
        """Set up a Segment Editor node for drawing tumour on the label segmentation.

        Source volume = the T1, selected segment = ``segment``, painting only
        inside the brain (inside all segments), and never overwriting other
        segments - so drawing tumour leaves the anatomy segments untouched.
        """
        if editor_node is None:
            raise WorkflowError("no Segment Editor node")
        reference = self.reference_volume(segmentation)
        editor_node.SetAndObserveSegmentationNode(segmentation)
        editor_node.SetAndObserveSourceVolumeNode(reference)
        if segmentation.GetSegmentation().GetSegment(segment) is not None:
            editor_node.SetSelectedSegmentID(segment)
        editor_node.SetMaskMode(segmentation.EditAllowedInsideAllSegments)
        editor_node.SetOverwriteMode(editor_node.OverwriteNone)

    def _commit(self, segmentation: Any, labelmap: "LabelMap", previous: "LabelMap | None") -> None:
        reference = self.reference_volume(segmentation)
        if previous is not None:
            self._undo.setdefault(segmentation.GetID(), []).append((previous.array.copy(), list(previous.history)))
        mrml.set_segmentation_labels(segmentation, labelmap.array, reference)
        segmentation.SetAttribute(mrml.HISTORY_ATTRIBUTE, json.dumps(labelmap.history))
        self._committed[segmentation.GetID()] = labelmap.array.copy()

    def copy_labels(self, segmentation: Any, name: str | None = None) -> Any:
        """A new label segmentation with the same label map and history (a variant to edit separately)."""
        current = self.labelmap(segmentation)
        reference = self.reference_volume(segmentation)
        with mrml.scene_guard(self.scene):
            node = mrml.segmentation_from_labels(self.scene, current.array, reference,
                                                 name or f"{segmentation.GetName()} copy",
                                                 lock_anatomy=bool(self.locked_labels(segmentation)))
            node.SetAttribute(ROLE, ROLE_LABELS)
            node.SetAttribute(CONVENTION_ATTRIBUTE, segmentation.GetAttribute(CONVENTION_ATTRIBUTE) or "brats2021")
            node.SetAttribute(mrml.HISTORY_ATTRIBUTE, json.dumps(current.history))
            for modality, original in self.original_volumes(segmentation).items():
                node.SetNodeReferenceID(ORIGINAL_REFERENCE + modality, original.GetID())
        self._committed[node.GetID()] = current.array.copy()
        self._undo[node.GetID()] = []
        return node

    def history(self, segmentation: Any) -> list[dict[str, Any]]:
        return json.loads(segmentation.GetAttribute(mrml.HISTORY_ATTRIBUTE) or "[]")

    # =========================================================================================
    # 3. tumour tools
    # =========================================================================================

    def apply_edit(self, segmentation: Any, edit: Any, **kwargs: Any) -> "LabelMap":
        """Apply one MedSynthLib edit (``edit(labelmap, **kwargs)``) and show the result."""
        ensure_medsynthlib_importable()
        from MedSynthLib.schema.errors import MedSynthError

        current = self.labelmap(segmentation)
        try:
            edited = edit(current, **kwargs)
        except MedSynthError as exc:
            raise WorkflowError(f"{getattr(edit, 'name', type(edit).__name__)}: {exc}") from None
        self._commit(segmentation, edited, current)
        self.log.emit(f"edit: {', '.join(r['name'] for r in edited.history[len(current.history):])}")
        return edited

    def add_parametric_tumour(self, segmentation: Any, centre_ras: Sequence[float],
                              params: TumourParameters | None = None) -> "LabelMap":
        """A new tumour (necrotic core, enhancing rim, oedema) centred at a RAS point (a click)."""
        ensure_medsynthlib_importable()
        from MedSynthLib.edits import ParametricTumour
        from MedSynthLib.schema.errors import MedSynthError

        params = params or TumourParameters()
        try:
            edit = ParametricTumour(centre_ras_mm=tuple(float(v) for v in centre_ras), radii_mm=params.radii(),
                                    rim_mm=params.rim_mm, necrosis=params.necrosis, oedema_mm=params.oedema_mm,
                                    irregularity=params.irregularity, seed=params.seed,
                                    keep_existing=params.keep_existing)
        except MedSynthError as exc:
            raise WorkflowError(f"parametric tumour: {exc}") from None
        return self.apply_edit(segmentation, edit)

    def random_tumour(self, segmentation: Any, seed: int, p_parametric: float = 0.25) -> "LabelMap":
        """A random, valid tumour edit drawn from ``seed`` (it replays from the recorded edits)."""
        ensure_medsynthlib_importable()
        from MedSynthLib.edits import RandomTumourEdit

        if not isinstance(seed, int) or seed < 0:
            raise WorkflowError(f"the random seed must be a non-negative whole number, got {seed!r}")
        return self.apply_edit(segmentation, RandomTumourEdit(p_parametric=p_parametric), seed=seed)

    def read_tumour_source(self, source: str | os.PathLike[str], label_convention: str = "brats2021") -> "LabelMap":
        """The label map whose tumour is inserted.

        Accepted: a case folder (its expert segmentation, inside its brain), a
        MedSynth label map (with its provenance sidecar), or a plain expert tumour
        segmentation file whose values follow ``label_convention`` (e.g. a BraTS
        ``*_seg.nii.gz`` with 0/1/2/4); the last carries no brain, only tumour.
        """
        ensure_medsynthlib_importable()
        from MedSynthLib.cases.readers import read_case
        from MedSynthLib.schema.errors import MedSynthError
        from MedSynthLib.schema.grid import LabelMap
        from MedSynthLib.schema.labelmap import read_label_map
        from MedSynthLib.schema.labels import Label
        from MedSynthLib.schema.provenance import sidecar_path

        path = Path(source)
        if not str(source) or not path.exists():
            raise WorkflowError(f"{source}: tumour source not found (choose a case folder or a MedSynth label map)")
        try:
            if path.is_dir():
                case = read_case(path, require_segmentation=True)
                brain = case.brain_mask()
                array = np.where(brain, int(Label.WM), 0).astype(np.uint8)
                array[case.tumour > 0] = case.tumour[case.tumour > 0]
                return LabelMap(array, case.grid, [])
            if not sidecar_path(path).exists():
                return self._expert_tumour_file(path, _check_convention(label_convention))
            return read_label_map(path)
        except MedSynthError as exc:
            raise WorkflowError(str(exc)) from None

    @staticmethod
    def _expert_tumour_file(path: Path, convention: str) -> "LabelMap":
        """A plain tumour segmentation file as a label map holding only NCR/ED/ET."""
        import SimpleITK as sitk
        from MedSynthLib.schema.grid import Grid, LabelMap
        from MedSynthLib.schema.volume_io import read_image
        from MedSynthLib.schema.labels import LabelValueError, tumour_to_schema

        image = read_image(path)
        try:
            tumour = tumour_to_schema(sitk.GetArrayFromImage(image), convention)
        except LabelValueError as exc:
            raise WorkflowError(f"{path}: {exc}; set 'Tumour labels' to the convention of this file "
                                "(a MedSynth label map needs its provenance sidecar beside it)") from None
        return LabelMap(tumour, Grid.from_image(image), [])

    def insert_tumour(self, segmentation: Any, source: "str | os.PathLike[str] | LabelMap",
                      centre_ras: Sequence[float] | None = None, keep_existing: bool = False,
                      label_convention: str = "brats2021") -> "LabelMap":
        """Insert the tumour of another case / label map (at a RAS point, or the matching position).

        A source without a brain (a plain expert tumour segmentation) is placed at
        its own physical position when it lies on the target's grid (BraTS cases
        share one), else at ``centre_ras``.
        """
        ensure_medsynthlib_importable()
        from MedSynthLib.edits import InsertTumour, tumour_centre
        from MedSynthLib.schema.errors import MedSynthError
        from MedSynthLib.schema.grid import lps_to_ras
        from MedSynthLib.schema.labels import brain_mask, tumour_mask
        from MedSynthLib.schema.provenance import array_sha256

        source_map = source if hasattr(source, "array") else self.read_tumour_source(  # type: ignore[arg-type]
            source, label_convention)
        if not tumour_mask(source_map.array).any():
            raise WorkflowError("the tumour source has no tumour voxels to insert")
        if centre_ras is None and not (brain_mask(source_map.array) & ~tumour_mask(source_map.array)).any():
            target_grid = mrml.grid_from_volume(self.reference_volume(segmentation))
            if source_map.grid.difference(target_grid) is not None:
                raise WorkflowError("this tumour segmentation has no brain to match positions with and lies on "
                                    "another grid than the label map; place the tumour centre point and tick "
                                    "'Insert at the point'")
            centre_ras = lps_to_ras(tumour_centre(source_map))
        try:
            edit = InsertTumour(centre_ras_mm=None if centre_ras is None else tuple(float(v) for v in centre_ras),
                                keep_existing=keep_existing, source="labels-" + array_sha256(source_map.array)[:16])
        except MedSynthError as exc:
            raise WorkflowError(f"insert tumour: {exc}") from None
        return self.apply_edit(segmentation, edit, source=source_map)

    def transform_tumour(self, segmentation: Any, matrix_ras: np.ndarray) -> "LabelMap":
        """Move/rotate/scale the tumour by a RAS transform (the tumour handles' matrix).

        The transform ``x -> A x + b`` is carried out as MedSynthLib edits
        (Scale/Rotate about the tumour centre, then a Translate that puts the
        centre at ``A c + b``), so the provenance records exactly what was done
        and the result replays; it is one undo step.
        """
        ensure_medsynthlib_importable()
        from MedSynthLib.edits import Translate, tumour_centre
        from MedSynthLib.schema.errors import MedSynthError
        from MedSynthLib.schema.grid import lps_to_ras

        matrix = np.asarray(matrix_ras, float)
        if matrix.shape != (4, 4):
            raise WorkflowError(f"a tumour transform is a 4x4 matrix, got shape {matrix.shape}")
        current = self.labelmap(segmentation)
        try:
            centre = lps_to_ras(tumour_centre(current))
        except MedSynthError as exc:
            raise WorkflowError(str(exc)) from None
        target = matrix[:3, :3] @ centre + matrix[:3, 3]
        edits = linear_edits_for_matrix(matrix)
        edited = current
        try:
            for edit in edits:
                edited = edit(edited)
            moved = lps_to_ras(tumour_centre(edited))
            translate = Translate(_tidy(target - moved, 4))
            if np.any(translate.voxel_offset(edited.grid) != 0):
                edited = translate(edited)
        except MedSynthError as exc:
            raise WorkflowError(f"tumour transform: {exc}") from None
        if edited is current:
            raise WorkflowError("the tumour transform is the identity (less than one voxel): nothing to apply")
        self._commit(segmentation, edited, current)
        self.log.emit("tumour transform: " + ", ".join(r["name"] for r in edited.history[len(current.history):]))
        return edited

    def begin_tumour_transform(self, segmentation: Any) -> Any:
        """Show the tumour as a movable copy under a transform node with interaction handles.

        Returns:
            The ``vtkMRMLTransformNode`` (its handles are shown in the views); apply
            with :meth:`apply_tumour_transform`, drop with :meth:`cancel_tumour_transform`.
        """
        ensure_medsynthlib_importable()
        from MedSynthLib.edits import tumour_centre
        from MedSynthLib.schema.errors import MedSynthError
        from MedSynthLib.schema.grid import lps_to_ras
        from MedSynthLib.schema.labels import TUMOUR_LABELS, Label, tumour_mask

        self.cancel_tumour_transform(segmentation)
        current = self.labelmap(segmentation)
        try:
            centre = lps_to_ras(tumour_centre(current))
        except MedSynthError as exc:
            raise WorkflowError(str(exc)) from None
        reference = self.reference_volume(segmentation)
        with mrml.scene_guard(self.scene):
            transform = self.scene.AddNewNodeByClass("vtkMRMLTransformNode", "MedSynth tumour transform")
            transform.SetCenterOfTransformation(*[float(v) for v in centre])
            transform.CreateDefaultDisplayNodes()
            display = transform.GetDisplayNode()
            display.SetEditorVisibility(True)
            display.SetEditorTranslationEnabled(True)
            display.SetEditorRotationEnabled(True)
            display.SetEditorScalingEnabled(True)
            tumour_only = np.where(tumour_mask(current.array), current.array, 0).astype(np.uint8)
            moving = mrml.segmentation_from_labels(self.scene, tumour_only, reference,
                                                   f"{segmentation.GetName()} tumour (moving)", lock_anatomy=False)
            for label in (Label.CSF, Label.GM, Label.WM):
                moving.GetSegmentation().RemoveSegment(_lib().LABEL_INFO[label].short_name)
            moving.SetAttribute(ROLE, ROLE_MOVING)
            moving.SetAndObserveTransformNodeID(transform.GetID())
            segmentation.SetAttribute("MedSynth.TransformNodeID", transform.GetID())
            segmentation.SetAttribute("MedSynth.MovingNodeID", moving.GetID())
            display_node = segmentation.GetDisplayNode()
            if display_node is not None:
                for label in TUMOUR_LABELS:
                    display_node.SetSegmentVisibility(_lib().LABEL_INFO[label].short_name, False)
        return transform

    def _transform_nodes(self, segmentation: Any) -> tuple[Any, Any]:
        transform_id = segmentation.GetAttribute("MedSynth.TransformNodeID")
        moving_id = segmentation.GetAttribute("MedSynth.MovingNodeID")
        transform = self.scene.GetNodeByID(transform_id) if transform_id else None
        moving = self.scene.GetNodeByID(moving_id) if moving_id else None
        return transform, moving

    def apply_tumour_transform(self, segmentation: Any) -> "LabelMap":
        """Carry out the handles' transform as MedSynthLib edits (recorded), then remove the handles."""
        transform, _ = self._transform_nodes(segmentation)
        if transform is None:
            raise WorkflowError("no tumour transform in progress: press 'Move tumour' first")
        matrix = mrml.vtk_matrix(np.eye(4))
        transform.GetMatrixTransformToParent(matrix)
        edited = self.transform_tumour(segmentation, mrml.numpy_matrix(matrix))
        self.cancel_tumour_transform(segmentation)
        return edited

    def cancel_tumour_transform(self, segmentation: Any) -> None:
        """Remove the movable tumour copy and its transform; show the tumour segments again."""
        transform, moving = self._transform_nodes(segmentation)
        mrml.remove_nodes(self.scene, moving, transform)
        segmentation.RemoveAttribute("MedSynth.TransformNodeID")
        segmentation.RemoveAttribute("MedSynth.MovingNodeID")
        display_node = segmentation.GetDisplayNode()
        if display_node is not None:
            for label in _lib().TUMOUR_LABELS:
                display_node.SetSegmentVisibility(_lib().LABEL_INFO[label].short_name, True)

    def undo(self, segmentation: Any) -> "LabelMap":
        """Restore the label map before the last MedSynth edit."""
        ensure_medsynthlib_importable()
        from MedSynthLib.schema.grid import LabelMap

        stack = self._undo.get(segmentation.GetID() if segmentation is not None else "", [])
        if not stack:
            raise WorkflowError("nothing to undo")
        array, history = stack.pop()
        reference = self.reference_volume(segmentation)
        restored = LabelMap(array, mrml.grid_from_volume(reference), history)
        mrml.set_segmentation_labels(segmentation, restored.array, reference)
        segmentation.SetAttribute(mrml.HISTORY_ATTRIBUTE, json.dumps(restored.history))
        self._committed[segmentation.GetID()] = restored.array.copy()
        self.log.emit("undone")
        return restored

    def can_undo(self, segmentation: Any) -> bool:
        return bool(segmentation is not None and self._undo.get(segmentation.GetID()))

    # =========================================================================================
    # 4. generate
    # =========================================================================================

    @staticmethod
    def registered_models() -> list[dict[str, Any]]:
        """The models registered with MedSynth: ``[{"name": str, "default": bool}]``, the default first.

        Read from the registry file only (no weights are loaded or verified here;
        the synthesis verifies the chosen model's checksum).
        """
        ensure_medsynthlib_importable()
        from MedSynthLib.schema.errors import MedSynthError
        from MedSynthLib.synthesis.models import read_registry

        try:
            registry = read_registry()
        except MedSynthError as exc:
            raise WorkflowError(str(exc)) from None
        out = []
        for name in sorted(registry.get("models", {})):
            out.append({"name": name, "default": name == registry.get("default")})
        out.sort(key=lambda entry: not entry["default"])
        return out

    def detect_devices(self, timeout_s: float = 180.0):
        """What torch detects in the backend's Python (run in a separate process)."""
        from .environment import detect_devices

        self.device_info = detect_devices(self.python, timeout_s)
        return self.device_info

    def _new_run_dir(self, kind: str) -> Path:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._run_counter += 1
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path(tempfile.mkdtemp(prefix=f"{kind}-{stamp}-{self._run_counter:03d}-", dir=self.work_dir))
        return run_dir

    def _write_labels(self, labelmap: "LabelMap", run_dir: Path) -> Path:
        from MedSynthLib.schema.labelmap import write_label_map

        # NRRD keeps the geometry in double precision (NIfTI stores float32).
        return write_label_map(labelmap, run_dir / "labels.nrrd")

    def start_generate(self, segmentation: Any, options: GenerateOptions | None = None) -> GenerationJob:
        """Start ``medsynth synthesize`` on the current label map in a separate process.

        Poll the job (``job.poll()``, from a QTimer in the GUI) and call
        :meth:`finish_generate` when it returns False; or :meth:`cancel_generate`.
        """
        ensure_medsynthlib_importable()
        from MedSynthLib.schema.provenance import array_sha256

        options = options or GenerateOptions()
        options.validate()
        info = self.device_info
        if info is not None and info.torch is not None and options.device not in info.available:
            raise WorkflowError(f"device {options.device!r} is not available here ({info.describe()}); "
                                "choose auto or CPU")
        labelmap = self.labelmap(segmentation)
        reference = self.reference_volume(segmentation)
        run_dir = self._new_run_dir("synthesis")
        labels_path = self._write_labels(labelmap, run_dir)
        out_dir = run_dir / "case"
        runner = ProcessRunner(progress_parser=_StepProgress(_SYNTH_STEPS))
        job = GenerationJob(runner, run_dir, out_dir, segmentation.GetID(), reference.GetID(),
                            array_sha256(labelmap.array), options)
        runner.output.connect(self.log.emit)
        runner.progress.connect(self.progress.emit)
        command = [self.python, str(RUN_CLI), "synthesize", str(labels_path), "-o", str(out_dir),
                   *options.cli_arguments()]
        self.progress.emit(0.0, "starting the synthesis process")
        try:
            runner.start(command, env=backend_env())
        except OSError as exc:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise WorkflowError(f"cannot start the synthesis process ({exc})") from None
        self.log.emit(f"synthesis started (process {runner.pid}): {' '.join(command[1:])}")
        return job

    def cancel_generate(self, job: GenerationJob) -> bool:
        """Kill the synthesis and every process it started; remove its files. Returns True when all are gone."""
        gone = job.runner.cancel()
        job.status = "cancelled"
        shutil.rmtree(job.run_dir, ignore_errors=True)
        self.progress.emit(0.0, "cancelled")
        self.log.emit("synthesis cancelled" + ("" if gone else " (some processes did not end yet)"))
        return gone

    def finish_generate(self, job: GenerationJob, name_prefix: str = "MedSynth synthetic") -> dict[str, Any]:
        """Load the synthetic T1/T1ce/T2/FLAIR of a finished job onto the input's exact geometry.

        Raises:
            CancelledError: the job was cancelled.
            WorkflowError: the process failed (its error line is the message), or the
                outputs do not fit the input grid (the scene is left as it was).
        """
        if job.runner.is_running():
            job.runner.wait()
        if job.runner.cancelled or job.status == "cancelled":
            job.status = "cancelled"
            shutil.rmtree(job.run_dir, ignore_errors=True)
            raise CancelledError("synthesis cancelled; nothing was added to the scene")
        rc = job.runner.returncode
        if rc != 0:
            job.status = "failed"
            job.error = _error_line(job.runner.lines) or f"the synthesis process ended with status {rc}"
            shutil.rmtree(job.run_dir, ignore_errors=True)
            raise WorkflowError(f"synthesis failed: {job.error}")
        outputs = self._load_case_outputs(job, name_prefix, ROLE_SYNTHETIC)
        job.status = "done"
        job.outputs = outputs
        self.progress.emit(1.0, "done")
        return outputs

    def _load_case_outputs(self, job: GenerationJob, name_prefix: str, role: str,
                           existing: Mapping[str, Any] | None = None) -> dict[str, Any]:
        from MedSynthLib.schema.labelmap import read_label_map
        from MedSynthLib.schema.provenance import array_sha256

        reference = self.scene.GetNodeByID(job.reference_id)
        if reference is None:
            raise WorkflowError("the input T1 was removed from the scene while synthesising")
        ref_matrix = mrml.ijk_to_ras(reference)
        ref_dims = reference.GetImageData().GetDimensions()
        try:
            labels = read_label_map(job.out_dir / "labels.nii.gz")
        except Exception as exc:  # noqa: BLE001 - any unreadable output is a failed synthesis
            raise WorkflowError(f"synthesis output unreadable: {exc}") from None
        if array_sha256(labels.array) != job.labels_sha256:
            raise WorkflowError("the synthesis output's labels differ from the label map sent (the output folder "
                                "was changed); synthesise again")
        outputs: dict[str, Any] = {}
        with mrml.scene_guard(self.scene):
            for modality in MODALITIES:
                path = job.out_dir / f"{modality}.nii.gz"
                if existing and modality in existing:
                    node = existing[modality]
                    temp = mrml.read_volume(self.scene, str(path), "__medsynth_preview__")
                    try:
                        self._check_output_geometry(reference, temp, ref_matrix, ref_dims)
                        mrml.update_volume_from_array(node, mrml.array_from_volume(temp))
                    finally:
                        self._remove_with_helpers(temp)
                else:
                    try:
                        node = mrml.read_volume(self.scene, str(path),
                                                f"{name_prefix} {MODALITY_TITLES[modality]}")
                    except mrml.MRMLError as exc:
                        raise WorkflowError(f"synthesis output unreadable: {exc}") from None
                    self._check_output_geometry(reference, node, ref_matrix, ref_dims)
                    mrml.set_ijk_to_ras(node, ref_matrix)  # exactly the input's matrix
                node.SetAttribute(ROLE, role)
                node.SetAttribute("MedSynth.Modality", modality)
                node.SetAttribute("MedSynth.CaseFolder", str(job.out_dir))
                node.SetAttribute("MedSynth.LabelSegmentationID", job.segmentation_id)
                node.SetAttribute("MedSynth.Seed", str(job.options.seed))
                outputs[modality] = node
        return outputs

    @staticmethod
    def _check_output_geometry(reference: Any, node: Any, ref_matrix: np.ndarray, ref_dims: Sequence[int]) -> None:
        difference = mrml.geometry_difference(ref_matrix, ref_dims, mrml.ijk_to_ras(node),
                                              node.GetImageData().GetDimensions())
        if difference is not None:
            raise WorkflowError(f"synthesis output {node.GetName()!r} is not on the grid of "
                                f"{reference.GetName()!r}: {difference}")

    def _remove_with_helpers(self, node: Any) -> None:
        mrml.remove_nodes(self.scene, node)

    def generate(self, segmentation: Any, options: GenerateOptions | None = None,
                 timeout_s: float = 3600.0) -> dict[str, Any]:
        """Blocking convenience: start, wait, load (for scripts and tests; the GUI polls instead)."""
        job = self.start_generate(segmentation, options)
        try:
            job.runner.wait(timeout_s)
        except TimeoutError:
            self.cancel_generate(job)
            raise WorkflowError(f"synthesis did not finish in {timeout_s:.0f} s and was cancelled") from None
        return self.finish_generate(job)

    # --- fast preview -----------------------------------------------------------------------

    def preview(self, segmentation: Any, options: GenerateOptions | None = None,
                timeout_s: float = 600.0) -> dict[str, Any]:
        """Re-render only the edited region with a warm worker; the first call synthesises it all.

        The preview volumes ("MedSynth preview T1" ...) are updated in place on
        later calls.  Blocking; a re-render takes a fraction of a full synthesis.
        """
        ensure_medsynthlib_importable()
        from MedSynthLib.schema.provenance import array_sha256

        options = options or GenerateOptions()
        options.validate()
        labelmap = self.labelmap(segmentation)
        reference = self.reference_volume(segmentation)
        session = self._preview
        key = (options.model, options.device, options.precision, segmentation.GetID())
        if session is None or not session.alive() or session.key != key:
            if session is not None:
                session.close()
            session = PreviewSession(self.python, options, key)
            self._preview = session
            session.start(timeout_s)
            self.log.emit(f"preview worker ready on {session.device}")
        run_dir = self._new_run_dir("preview")
        labels_path = self._write_labels(labelmap, run_dir)
        out_dir = run_dir / "case"
        first = session.outputs is None or any(not self.scene.IsNodePresent(n) for n in session.outputs.values())
        reply = session.call({"cmd": "synthesize" if first else "rerender", "labels": str(labels_path),
                              "out": str(out_dir), "seed": options.seed}, timeout_s)
        if not reply.get("ok"):
            shutil.rmtree(run_dir, ignore_errors=True)
            raise WorkflowError(f"preview failed: {reply.get('error')}")
        job = GenerationJob(ProcessRunner(), run_dir, out_dir, segmentation.GetID(), reference.GetID(),
                            array_sha256(labelmap.array), options, kind="preview")
        outputs = self._load_case_outputs(job, "MedSynth preview", ROLE_PREVIEW,
                                          existing=None if first else session.outputs)
        session.outputs = outputs
        session.last_reply = reply
        self.log.emit(f"preview ({reply.get('cmd')}) in {reply.get('seconds')} s")
        return outputs

    def close_preview(self) -> None:
        if self._preview is not None:
            self._preview.close()
            self._preview = None

    # =========================================================================================
    # 5. review
    # =========================================================================================

    @staticmethod
    def review_layout_xml() -> str:
        """A 2x2 layout of four linked axial slice views, one per modality."""
        colours = {"t1": "#F34A33", "t1ce": "#EDD54C", "t2": "#6EB04B", "flair": "#4A7BF3"}
        items = []
        for modality in MODALITIES:
            items.append(
                f'<item><view class="vtkMRMLSliceNode" singletontag="{REVIEW_VIEWS[modality]}">'
                f'<property name="orientation" action="default">Axial</property>'
                f'<property name="viewlabel" action="default">{MODALITY_TITLES[modality]}</property>'
                f'<property name="viewcolor" action="default">{colours[modality]}</property>'
                f'<property name="viewgroup" action="default">0</property></view></item>')
        return ('<layout type="vertical">'
                f'<item><layout type="horizontal">{items[0]}{items[1]}</layout></item>'
                f'<item><layout type="horizontal">{items[2]}{items[3]}</layout></item>'
                '</layout>')

    @staticmethod
    def review_view_names() -> list[str]:
        """Layout names of the four review views (T1, T1ce, T2, FLAIR)."""
        return [REVIEW_VIEWS[m] for m in MODALITIES]

    def register_review_layout(self, layout_node: Any) -> int:
        """Add the four-view layout to the layout node (the app's layout manager then creates its views)."""
        if not layout_node.IsLayoutDescription(REVIEW_LAYOUT_ID):
            layout_node.AddLayoutDescription(REVIEW_LAYOUT_ID, self.review_layout_xml())
        return REVIEW_LAYOUT_ID

    def show_in_review_views(self, volumes: Mapping[str, Any], segmentation: Any = None,
                             slice_logics: Mapping[str, Any] | None = None) -> list[Any]:
        """Put one volume per review view, link the views and the cursor, outline the tumour, fit the views.

        Returns:
            The slice composite nodes that were set (views that do not exist yet are skipped).
        """
        updated = []
        for composite in mrml.nodes_by_class(self.scene, "vtkMRMLSliceCompositeNode"):
            modality = next((m for m, view in REVIEW_VIEWS.items() if composite.GetLayoutName() == view), None)
            if modality is None:
                continue
            volume = volumes.get(modality) or volumes.get("t1")
            composite.SetBackgroundVolumeID(volume.GetID() if volume is not None else None)
            composite.SetForegroundVolumeID(None)
            composite.SetLabelVolumeID(None)
            composite.SetLinkedControl(1)
            composite.SetHotLinkedControl(1)
            updated.append(composite)
        for crosshair in mrml.nodes_by_class(self.scene, "vtkMRMLCrosshairNode"):
            crosshair.SetCrosshairMode(crosshair.ShowSmallBasic)
            crosshair.SetCrosshairBehavior(crosshair.OffsetJumpSlice)
        if segmentation is not None and segmentation.GetDisplayNode() is not None:
            self.show_tumour_outlines(segmentation)
        self.fit_review_views(slice_logics)
        return updated

    @staticmethod
    def show_tumour_outlines(segmentation: Any) -> None:
        """Review overlay: the tumour segments (NCR, ED, ET) as outlines, the anatomy segments hidden."""
        labels = _lib()
        display = segmentation.GetDisplayNode()
        display.SetVisibility(True)
        display.SetVisibility2DFill(True)
        display.SetVisibility2DOutline(True)
        for label, info in labels.LABEL_INFO.items():
            if label == labels.Label.BACKGROUND or segmentation.GetSegmentation().GetSegment(info.short_name) is None:
                continue
            tumour = label in labels.TUMOUR_LABELS
            display.SetSegmentVisibility(info.short_name, tumour)
            display.SetSegmentVisibility2DFill(info.short_name, False)
            display.SetSegmentVisibility2DOutline(info.short_name, tumour)

    def review_slice_nodes(self) -> dict[str, Any]:
        """The slice nodes of the review views (by modality) that exist in the scene."""
        out = {}
        for node in mrml.nodes_by_class(self.scene, "vtkMRMLSliceNode"):
            modality = next((m for m, view in REVIEW_VIEWS.items() if node.GetLayoutName() == view), None)
            if modality is not None:
                out[modality] = node
        return out

    def fit_review_views(self, slice_logics: Mapping[str, Any] | None = None) -> list[Any]:
        """Fit every review view to its volume: field of view and slice offset (else a view may show nothing).

        Args:
            slice_logics: the application's ``vtkMRMLSliceLogic`` of each review view, by
                view name (always pass them inside Slicer); without them (no application,
                e.g. slicer-core) a temporary slice logic per view does the same fit.

        Returns:
            The slice nodes that were fitted.
        """
        import slicer

        fitted = []
        for modality, node in self.review_slice_nodes().items():
            logic = (slice_logics or {}).get(REVIEW_VIEWS[modality])
            if logic is not None:
                logic.FitSliceToAll()
            else:
                # Without the application: the same fit by a slice logic of our own, which adds its
                # helper nodes (slice model, display nodes) to the scene; they are removed afterwards.
                before = set(mrml.node_ids(self.scene))
                logic = slicer.vtkMRMLSliceLogic()
                try:
                    logic.SetMRMLScene(self.scene)
                    logic.SetSliceNode(node)
                    logic.FitSliceToAll()
                finally:
                    logic.SetMRMLScene(None)
                    for added in [i for i in mrml.node_ids(self.scene) if i not in before][::-1]:
                        helper = self.scene.GetNodeByID(added)
                        if helper is not None:
                            self.scene.RemoveNode(helper)
            fitted.append(node)
        return fitted

    def original_volumes(self, segmentation: Any) -> dict[str, Any]:
        """The input volumes the label map was prepared from (T1, and T1ce/T2/FLAIR when given)."""
        out = {}
        for modality in MODALITIES:
            node = segmentation.GetNodeReference(ORIGINAL_REFERENCE + modality)
            if node is not None:
                out[modality] = node
        return out

    def set_review(self, outputs: Mapping[str, Any], rating: int, note: str = "") -> dict[str, Any]:
        """Store a clinician's rating (1-5; 0 = not rated) and note on the synthetic case.

        Written as node attributes (``MedSynth.Rating``, ``MedSynth.ReviewNote``,
        ``MedSynth.ReviewedAt``) on every output volume and as ``review`` in the
        case's ``provenance.json``; :meth:`export` carries the rating and its time (the
        note is free text and stays in the case folder).
        """
        from MedSynthLib.schema.volume_io import write_json

        if not outputs:
            raise WorkflowError("no synthetic case to rate: generate one first")
        if isinstance(rating, bool) or not isinstance(rating, int) or not RATINGS[0] <= rating <= RATINGS[1]:
            raise WorkflowError(f"the rating must be a whole number {RATINGS[0]}-{RATINGS[1]}, got {rating!r}")
        note = "".join(ch for ch in str(note) if ch.isprintable() or ch in "\n\t").strip()
        if len(note) > NOTE_MAX_CHARS:
            raise WorkflowError(f"the review note is {len(note)} characters; keep it under {NOTE_MAX_CHARS}")
        case_dir = self.case_folder(outputs)
        provenance_path = case_dir / "provenance.json"
        try:
            provenance = json.loads(provenance_path.read_text())
        except (OSError, ValueError) as exc:
            raise WorkflowError(f"{provenance_path}: cannot read the case provenance ({exc})") from None
        review = {"rating": rating, "note": note,
                  "reviewed_at": datetime.now(timezone.utc).replace(microsecond=0).isoformat()}
        provenance["review"] = review
        write_json(provenance, provenance_path, overwrite=True)
        for node in outputs.values():
            node.SetAttribute("MedSynth.Rating", str(rating))
            node.SetAttribute("MedSynth.ReviewNote", note)
            node.SetAttribute("MedSynth.ReviewedAt", review["reviewed_at"])
        return review

    @staticmethod
    def case_folder(outputs: Mapping[str, Any]) -> Path:
        folders = {node.GetAttribute("MedSynth.CaseFolder") for node in outputs.values()}
        if len(folders) != 1 or None in folders:
            raise WorkflowError("these volumes are not one MedSynth synthetic case")
        folder = Path(folders.pop())
        if not (folder / "provenance.json").is_file():
            raise WorkflowError(f"{folder}: the synthetic case folder is gone (was the temporary folder removed?)")
        return folder

    # =========================================================================================
    # 6. export
    # =========================================================================================

    def start_export(self, outputs: Mapping[str, Any], fmt: str, folder: str | os.PathLike[str],
                     naming: str = "brats2021") -> ExportJob:
        """Start ``medsynth export CASE --format FMT -o FOLDER`` (MedSynthLib's export) in a process."""
        if fmt not in EXPORT_FORMATS:
            raise WorkflowError(f"unknown export format {fmt!r} (choose {' or '.join(EXPORT_FORMATS)})")
        if naming not in EXPORT_NAMINGS:
            raise WorkflowError(f"unknown naming {naming!r} (choose {' or '.join(EXPORT_NAMINGS)})")
        if not str(folder).strip():
            raise WorkflowError("no export folder chosen")
        folder = Path(folder).expanduser()
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if folder.exists() and not folder.is_dir():
            raise WorkflowError(f"{folder}: the export target is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise WorkflowError(f"{existing}: the export folder is not writable; choose another folder")
        case_dir = self.case_folder(outputs)
        runner = ProcessRunner(progress_parser=_StepProgress(_EXPORT_STEPS))
        runner.output.connect(self.log.emit)
        runner.progress.connect(self.progress.emit)
        command = [self.python, str(RUN_CLI), "export", str(case_dir), "--format", fmt, "-o", str(folder)]
        if fmt == "nifti":
            command += ["--naming", naming]
        try:
            runner.start(command, env=backend_env())
        except OSError as exc:
            raise WorkflowError(f"cannot start the export process ({exc})") from None
        return ExportJob(runner, case_dir, folder, fmt)

    def finish_export(self, job: ExportJob) -> list[Path]:
        """The exported case folder(s).

        The clinician's review reaches the export through MedSynthLib's sanitiser only (the
        rating and its time; the free-text note stays in the case folder), as on the CLI.
        """
        if job.runner.is_running():
            job.runner.wait()
        if job.runner.cancelled:
            job.status = "cancelled"
            raise CancelledError("export cancelled")
        if job.runner.returncode != 0:
            job.status = "failed"
            message = _error_line(job.runner.lines) or f"the export process ended with status {job.runner.returncode}"
            if "already exists" in message:
                message += " - MedSynth never overwrites an export; choose another folder"
            raise WorkflowError(f"export failed: {message}")
        targets = []
        for line in job.runner.lines:
            match = re.match(r"^(.*): synthetic case exported \((nifti|dicom)\)\s*$", line.strip())
            if match:
                targets.append(Path(match.group(1)))
        if not targets:
            raise WorkflowError("export finished but reported no case folder")
        job.status = "done"
        job.targets = targets
        self.log.emit("exported: " + ", ".join(str(t) for t in targets))
        return targets

    def export(self, outputs: Mapping[str, Any], fmt: str, folder: str | os.PathLike[str],
               naming: str = "brats2021", timeout_s: float = 1800.0) -> list[Path]:
        job = self.start_export(outputs, fmt, folder, naming)
        try:
            job.runner.wait(timeout_s)
        except TimeoutError:
            job.runner.cancel()
            raise WorkflowError(f"export did not finish in {timeout_s:.0f} s and was cancelled") from None
        return self.finish_export(job)

    # =========================================================================================

    def cleanup(self) -> None:
        """Stop the preview worker (the work folder is kept: the synthetic cases live there)."""
        self.close_preview()


def _error_line(lines: Sequence[str]) -> str | None:
    """The ``medsynth: error: ...`` line of a failed run (else the last line that looks like an error)."""
    for line in reversed(list(lines)):
        if "medsynth: error:" in line:
            return line.split("medsynth: error:", 1)[1].strip()
    for line in reversed(list(lines)):
        if re.search(r"error|exception|traceback", line, re.IGNORECASE):
            return line.strip()
    return None


class PreviewSession:
    """A warm ``preview_worker.py`` process holding the model (JSON lines over pipes)."""

    def __init__(self, python: str, options: GenerateOptions, key: Any) -> None:
        self.python = python
        self.options = options
        self.key = key
        self.proc = None
        self.device = None
        self.outputs: dict[str, Any] | None = None
        self.last_reply: dict[str, Any] | None = None
        self._replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self._stderr: list[str] = []
        self._next_id = 1

    def start(self, timeout_s: float) -> None:
        import subprocess
        import threading

        command = [self.python, str(PREVIEW_WORKER), "--device", self.options.device,
                   "--precision", self.options.precision]
        if self.options.model:
            command += ["--model", str(self.options.model)]
        kwargs: dict[str, Any] = {"start_new_session": True} if os.name != "nt" else {
            "creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        self._replies = queue.Queue()
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, encoding="utf-8", errors="replace", env=backend_env(), **kwargs)

        def read_stdout() -> None:
            for line in self.proc.stdout:  # type: ignore[union-attr]
                if line.startswith("MEDSYNTH_REPLY "):
                    self._replies.put(json.loads(line.split(" ", 1)[1]))
            self._replies.put({"ok": False, "error": "the preview worker ended", "id": -1})

        def read_stderr() -> None:
            for line in self.proc.stderr:  # type: ignore[union-attr]
                self._stderr.append(line.rstrip())
                del self._stderr[:-200]

        threading.Thread(target=read_stdout, daemon=True).start()
        threading.Thread(target=read_stderr, daemon=True).start()
        ready = self._wait_reply(0, timeout_s)
        if not ready.get("ok"):
            self.close()
            detail = ready.get("error") or (self._stderr[-1] if self._stderr else "no reply")
            raise WorkflowError(f"the preview worker could not start: {detail}")
        self.device = ready.get("device")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _wait_reply(self, request_id: int, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.close()
                raise WorkflowError(f"the preview worker did not answer in {timeout_s:.0f} s (stopped)")
            try:
                reply = self._replies.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if reply.get("id") in (request_id, -1):
                return reply

    def call(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        if not self.alive():
            raise WorkflowError("the preview worker is not running")
        request = dict(request, id=self._next_id)
        self._next_id += 1
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._wait_reply(request["id"], timeout_s)

    def close(self) -> None:
        import signal
        import subprocess

        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit", "id": 0}) + "\n")  # type: ignore[union-attr]
                self.proc.stdin.flush()  # type: ignore[union-attr]
                self.proc.wait(timeout=3)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            try:
                if os.name == "nt":
                    subprocess.run(["taskkill", "/T", "/F", "/PID", str(self.proc.pid)], capture_output=True)
                else:
                    os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait(timeout=10)
        self.proc = None
