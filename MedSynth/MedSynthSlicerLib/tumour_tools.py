"""Tumour tools: MedSynthLib edits on the label segmentation (parametric, random, insert, handles).

Every tool is one MedSynthLib edit applied through :meth:`TumourTools.apply_edit`, so it is
recorded in the history and undone in one step; the interactive handles (a transform node on
a movable copy of the tumour) become Translate/Rotate/Scale edits when applied.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

import slicer.util
import vtk

from . import mrml
from .environment import ensure_medsynthlib_importable
from .errors import WorkflowError
from .mrml import ROLE, ROLE_MOVING
from .parameters import TumourParameters

if TYPE_CHECKING:  # pragma: no cover
    from MedSynthLib.schema.grid import LabelMap

from .label_segmentation import _check_convention, _lib

#: MedSynthLib's hints that name ``--label-convention``; for an inserted file the panel's choice is 'Its tumour labels'.
_INSERT_CONVENTION_HINT = re.compile(
    r"(?:;|:)?\s*(?:\(choose (?:another )?with --label-convention\)|give --label-convention)")
_INSERT_CONVENTION_CHOICE = " choose this file's convention under 'Its tumour labels'"


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



class TumourTools:
    """Edits of the tumour in the label segmentation (a part of ``WorkflowLogic``).

    The workflow's state (``scene``, ``log``, the committed label maps and undo
    stacks) lives on :class:`~MedSynthSlicerLib.logic.WorkflowLogic`, which
    combines this class with the other parts of the workflow.
    """

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
        name = getattr(edit, "name", type(edit).__name__)
        if name in ("rotate", "scale", "translate") and np.array_equal(edited.array, current.array):
            # Its record would claim a move no voxel shows (the command line refuses it too).
            raise WorkflowError(f"{name} changes no voxel (too small a change for this grid's voxels): nothing to "
                                "apply")
        self._commit(segmentation, edited, current)
        self.log.emit(f"edit: {', '.join(r['name'] for r in edited.history[len(current.history):])}")
        self._say_clipped("edit", current, edited)
        return edited

    def _say_clipped(self, what: str, current: "LabelMap", edited: "LabelMap") -> None:
        """Tell the user when a move pushed tumour voxels out of the brain (clipped, as its records say)."""
        from MedSynthLib.edits.base import clipped_in_records, clipped_notice

        clipped = clipped_in_records(edited.history[len(current.history):])
        if clipped:
            self.log.emit(f"{what}: {clipped_notice(clipped)}")

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

    def read_tumour_source(self, source: str | os.PathLike[str], label_convention: str | None = None) -> "LabelMap":
        """The label map whose tumour is inserted.

        Accepted: a case folder (its expert segmentation, inside its brain), a
        MedSynth label map, or a plain expert tumour segmentation file (e.g. a BraTS
        ``*_seg.nii.gz``, an MSD label map) whose values follow ``label_convention``,
        or, when it is None, the convention its own values and shape show (the file's,
        not the loaded case's: MedSynthLib's ``read_tumour_source``); the last carries
        no brain, only tumour.  ``label_convention`` never applies to a label map with
        its provenance sidecar.
        """
        ensure_medsynthlib_importable()
        from MedSynthLib.cases.readers import read_case
        from MedSynthLib.schema.errors import MedSynthError
        from MedSynthLib.schema.grid import LabelMap
        from MedSynthLib.schema.labelmap import read_tumour_source
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
            if label_convention is None or sidecar_path(path).exists():  # a MedSynth label map reads as one
                return read_tumour_source(path)
            return read_tumour_source(path, _check_convention(label_convention))
        except MedSynthError as exc:
            message = _INSERT_CONVENTION_HINT.sub(";" + _INSERT_CONVENTION_CHOICE, str(exc))
            if label_convention is not None and _INSERT_CONVENTION_CHOICE not in message:
                message += f";{_INSERT_CONVENTION_CHOICE} or let MedSynth detect it"
            raise WorkflowError(message) from None

    def insert_tumour(self, segmentation: Any, source: "str | os.PathLike[str] | LabelMap",
                      centre_ras: Sequence[float] | None = None, keep_existing: bool = False,
                      label_convention: str | None = None) -> "LabelMap":
        """Insert the tumour of another case / label map (at a RAS point, or the matching position).

        ``label_convention`` is that of a plain tumour segmentation file (None: read from the file).

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

        if hasattr(source, "array"):
            source_map, name, replay_convention = source, None, None
        else:
            source_map = self.read_tumour_source(source, label_convention)  # type: ignore[arg-type]
            name, replay_convention = Path(source).name, None  # type: ignore[arg-type]
        if not tumour_mask(source_map.array).any():
            raise WorkflowError("the tumour source has no tumour voxels to insert")
        if name is not None and Path(source).is_dir():  # type: ignore[arg-type]
            # The map built above (the brain filled with WM) is no file anyone has: `medsynth tumour replay
            # --source` reads the case's segmentation file, so that file is the recorded source, and the place
            # found in the source's brain is recorded as the centre (the same voxels: only its tumour is drawn).
            if centre_ras is None:
                try:
                    centre_ras = lps_to_ras(InsertTumour().placement_lps(self.labelmap(segmentation), source_map))
                except MedSynthError as exc:
                    raise WorkflowError(f"insert tumour: {exc}") from None
            source_map, name, replay_convention = self._case_tumour_file(Path(source))  # type: ignore[arg-type]
        elif name is not None and label_convention is not None:
            replay_convention = self._replay_convention(Path(source), source_map, label_convention)  # type: ignore[arg-type]
        if centre_ras is None and not (brain_mask(source_map.array) & ~tumour_mask(source_map.array)).any():
            target_grid = mrml.grid_from_volume(self.reference_volume(segmentation))
            if source_map.grid.difference(target_grid) is not None:
                raise WorkflowError("this tumour segmentation has no brain to match positions with and lies on "
                                    "another grid than the label map; place the tumour centre point and tick "
                                    "'Insert at the point'")
            centre_ras = lps_to_ras(tumour_centre(source_map))
        sha256 = array_sha256(source_map.array)
        try:
            # Recorded as `medsynth tumour insert` records it: the file's name (not its path, which may name a
            # patient) and its content hash, so that `medsynth tumour replay --source FILE` redoes it.
            edit = InsertTumour(centre_ras_mm=None if centre_ras is None else tuple(float(v) for v in centre_ras),
                                keep_existing=keep_existing, source=name or "labels-" + sha256[:16],
                                source_labels_sha256=sha256)
        except MedSynthError as exc:
            raise WorkflowError(f"insert tumour: {exc}") from None
        edited = self.apply_edit(segmentation, edit, source=source_map)
        if name is not None:
            how = f" --label-convention {replay_convention}" if replay_convention else ""
            self.log.emit(f"insert: source recorded as {name}; `medsynth tumour replay` redoes it with "
                          f"--source {name}{how}")
        return edited

    @staticmethod
    def _case_tumour_file(folder: Path) -> tuple["LabelMap", str, str | None]:
        """A case folder's tumour as `medsynth tumour replay --source` reads its segmentation file: the map, the
        file's name, and the ``--label-convention`` the replay needs (None: the file's values show it)."""
        from MedSynthLib.cases.readers import read_case
        from MedSynthLib.schema.errors import MedSynthError
        from MedSynthLib.schema.labelmap import read_tumour_source

        try:
            case = read_case(folder, require_segmentation=True)
            seg_file = case.files["seg"]
            try:
                detected = read_tumour_source(seg_file)
            except MedSynthError:
                detected = None
            if detected is not None and np.array_equal(detected.array, case.tumour):
                return detected, seg_file.name, None
            return read_tumour_source(seg_file, case.label_convention), seg_file.name, case.label_convention
        except MedSynthError as exc:
            raise WorkflowError(str(exc)) from None

    @staticmethod
    def _replay_convention(path: Path, source_map: "LabelMap", label_convention: str) -> str | None:
        """The ``--label-convention`` a replay needs to read ``path`` as the insert did (None: read as it is)."""
        from MedSynthLib.schema.errors import MedSynthError
        from MedSynthLib.schema.labelmap import read_tumour_source

        try:
            if np.array_equal(read_tumour_source(path).array, source_map.array):
                return None
        except MedSynthError:
            pass
        return label_convention

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
                changed = edit(edited)
                if not np.array_equal(changed.array, edited.array):  # a part that moves no voxel is not recorded
                    edited = changed
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
        self._say_clipped("tumour transform", current, edited)
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
        matrix = vtk.vtkMatrix4x4()
        transform.GetMatrixTransformToParent(matrix)
        edited = self.transform_tumour(segmentation, slicer.util.arrayFromVTKMatrix(matrix))
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

