"""The label segmentation: input volumes, prepare, the label map of a segmentation node, lock, undo.

A MedSynth label map lives in a segmentation node (segments CSF, GM, WM, NCR, ED, ET);
its provenance history is kept in the node attribute ``MedSynth.History`` (JSON), so it
survives saving the scene.  Changes made with the Segment Editor are detected when the
label map is read back (:meth:`LabelSegmentation.labelmap`) and recorded as one
``manual_segment_edit`` record; locked anatomy is enforced there.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from . import mrml
from .environment import ensure_medsynthlib_importable
from .errors import WorkflowError
from .mrml import (CONVENTION_ATTRIBUTE, ORIGINAL_REFERENCE, ROLE, ROLE_LABELS, ROLE_TEMPLATE,
                   SOURCE_CASE_ATTRIBUTE)
from .parameters import LABEL_CONVENTIONS, MODALITIES, MODALITY_TITLES

if TYPE_CHECKING:  # pragma: no cover
    from MedSynthLib.schema.grid import LabelMap

MANUAL_EDIT = "manual_segment_edit"


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



class LabelSegmentation:
    """Input, prepare, read back, lock and undo the label segmentation (a part of ``WorkflowLogic``).

    The workflow's state (``scene``, ``log``, the committed label maps and undo
    stacks) lives on :class:`~MedSynthSlicerLib.logic.WorkflowLogic`, which
    combines this class with the other parts of the workflow.
    """

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
        from MedSynthLib.synthesis.case_folder import is_medsynth_output, labels_phrase

        folder = Path(folder)
        if is_medsynth_output(folder):  # read as a patient's case it would come in without its tumour
            raise WorkflowError(f"{folder}: is a MedSynth output ({labels_phrase(folder)}), not a "
                                "patient's case: add its volumes and label map with File > Add Data")
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
                # A real case: Generate can keep its images and re-render only the edited region.
                nodes[modality].SetAttribute(SOURCE_CASE_ATTRIBUTE, str(folder))
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
                convention does not define, or no tumour voxel (empty, or anatomy only).
        """
        labels = _lib()
        convention = tumour.GetAttribute(CONVENTION_ATTRIBUTE) or convention if tumour is not None else convention
        _check_convention(convention)
        if tumour.IsA("vtkMRMLLabelMapVolumeNode") or tumour.IsA("vtkMRMLScalarVolumeNode"):
            self._same_grid(reference, tumour, "tumour labelmap")
            values = mrml.array_from_volume(tumour)
            try:
                array = labels.tumour_to_schema(values, convention)
            except labels.LabelValueError as exc:
                raise WorkflowError(f"tumour labelmap {tumour.GetName()!r}: {exc}; choose the right "
                                    "tumour-label convention") from None
            what = "tumour labelmap"
        elif tumour.IsA("vtkMRMLSegmentationNode"):
            array = self._labels_from_segmentation(tumour, reference, convention, what="tumour segmentation")
            array = np.where(array >= labels.Label.NCR, array, 0).astype(np.uint8)
            what = "tumour segmentation"
        else:
            raise WorkflowError(f"{tumour.GetName()!r} is neither a segmentation nor a labelmap volume")
        if not array.any():  # a tumour input that became no tumour would pass as a healthy brain
            raise WorkflowError(f"{what} {tumour.GetName()!r} holds no tumour voxels (NCR, ED or ET under the "
                                f"{convention} convention); choose another tumour input, or none for a healthy brain")
        return array

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
            if tumour_array is not None:
                from MedSynthLib.edits.base import clipped_tumour_voxels, composite
                from MedSynthLib.schema.labels import Label

                # As every edit: oedema beyond the brain clipped (and said), a core more than 2 % outside refused.
                try:
                    array = composite(labelmap.array, tumour_array, labelmap.array > Label.BACKGROUND)
                except MedSynthError as exc:
                    raise WorkflowError(f"tumour {tumour.GetName()!r} on the template: {exc}; place it inside the "
                                        "brain") from None
                clipped = clipped_tumour_voxels(tumour_array, array)
                if clipped:
                    listed = ", ".join(f"{k} {v}" for k, v in clipped.items())
                    self.log.emit(f"tumour {tumour.GetName()!r}: {sum(clipped.values())} voxels ({listed}) lie "
                                  "outside the template's brain and were left out")
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
        node = self._new_label_segmentation(labelmap, t1, name or f"{t1.GetName()} MedSynth labels",
                                            label_convention, lock_anatomy, {"t1": t1, **others})
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

        While the segmentation is unchanged since MedSynth last read or wrote it (same
        modification times, :func:`.mrml.segmentation_stamp`) the label map kept then is
        returned (its array read-only) instead of reading the six segments back.

        Raises:
            WorkflowError: no reference volume, another grid, unknown segments, an empty brain.
        """
        ensure_medsynthlib_importable()
        from MedSynthLib.edits import healthy_anatomy
        from MedSynthLib.schema.grid import LabelMap
        from MedSynthLib.schema.labels import SCHEMA_VERSION, Label, brain_mask, label_counts, tumour_mask
        from MedSynthLib.schema.provenance import array_sha256

        reference = self.reference_volume(segmentation)
        cached = self._read_labels.get(segmentation.GetID())
        if cached is not None and cached[0] == self._labels_stamp(segmentation, reference):
            # Nothing changed since MedSynth last read or wrote it: no read-back of the six segments.
            labelmap = copy.copy(cached[1])
            labelmap.history = list(labelmap.history)
            return labelmap
        convention = segmentation.GetAttribute(CONVENTION_ATTRIBUTE) or "brats2021"
        array = self._labels_from_segmentation(segmentation, reference, convention, what="label segmentation")
        try:
            history = json.loads(segmentation.GetAttribute(mrml.HISTORY_ATTRIBUTE) or "[]")
        except ValueError:
            history = []
        grid = mrml.grid_from_volume(reference)
        privacy = self._stored_privacy(segmentation)
        committed = self._committed.get(segmentation.GetID())
        if committed is None or committed.shape != array.shape:
            # first sight of this segmentation in this session (e.g. a reloaded scene): take it as it is
            if brain_mask(array).any():
                self._committed[segmentation.GetID()] = array.copy()
                if (len(history) <= 1 and segmentation.GetAttribute(mrml.LABELS_SHA256_ATTRIBUTE) == array_sha256(array)
                        and self.labels_before_edits(segmentation) is None):
                    # as prepared (no edit recorded, none made unseen; a scene saved before the map before the edits
                    # was kept with it): the map before the user's edits, kept from now on
                    self._keep_before_edits(segmentation, array)
            if privacy is not None and segmentation.GetAttribute(mrml.LABELS_SHA256_ATTRIBUTE) != array_sha256(array):
                # Changed where MedSynth did not see it (before this session read it): what was drawn is unknown,
                # and the record says so from now on.
                history = list(history) + [{"name": MANUAL_EDIT, "params": {}, "schema_version": SCHEMA_VERSION}]
                unseen = LabelMap(array, grid, history, privacy=privacy.after_step(array, array, history[-1]))
                if brain_mask(array).any():
                    self._store_records(segmentation, unseen)
                privacy = unseen.privacy
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
            # Tumour lies inside the brain only (the rule of every edit): strokes beyond it (the editor's mask
            # mode changed) are removed, and the user told.
            outside = tumour_mask(edited) & (committed == Label.BACKGROUND)
            if outside.any():
                edited[outside] = Label.BACKGROUND
                self.log.emit(f"Segment Editor: {int(outside.sum())} tumour voxels drawn outside the brain were "
                              "removed (tumour lies inside the brain only)")
            previous = LabelMap(committed, grid, history, privacy=privacy)
            if np.array_equal(committed, edited):  # nothing left of the strokes: the segmentation shows the map again
                self._commit(segmentation, previous, None)
                return previous
            before, after = label_counts(committed), label_counts(edited)
            record = {
                "name": MANUAL_EDIT,
                "params": {"changed_voxels": int(np.count_nonzero(committed != edited)),
                           "voxel_change": {k: after[k] - before[k] for k in after if after[k] != before[k]},
                           "tumour_drawn_voxels": int(np.count_nonzero(tumour_mask(edited) & (edited != committed)))},
                "schema_version": SCHEMA_VERSION,
            }
            if not brain_mask(edited).any():
                raise WorkflowError(f"{segmentation.GetName()!r} has no brain voxels (every segment is empty)")
            result = previous.with_array(edited, record)  # the privacy record measured across the strokes
            self._commit(segmentation, result, previous)
            return result
        if not brain_mask(array).any():
            raise WorkflowError(f"{segmentation.GetName()!r} has no brain voxels (every segment is empty)")
        return self._remember_labels(segmentation, LabelMap(array, grid, history, privacy=privacy))

    @staticmethod
    def _stored_privacy(segmentation: Any) -> Any:
        """The privacy record MedSynth last stored on the segmentation (None: none, or unreadable)."""
        from MedSynthLib.schema.provenance import PrivacyRecord

        try:
            return PrivacyRecord.from_json(json.loads(segmentation.GetAttribute(mrml.PRIVACY_ATTRIBUTE) or "null"))
        except ValueError:
            return None

    @staticmethod
    def _store_records(segmentation: Any, labelmap: "LabelMap") -> None:
        """History, privacy and the labels' hash as the segmentation's attributes (saved with the scene)."""
        from MedSynthLib.schema.provenance import array_sha256, privacy_of

        segmentation.SetAttribute(mrml.HISTORY_ATTRIBUTE, json.dumps(labelmap.history))
        segmentation.SetAttribute(mrml.PRIVACY_ATTRIBUTE, json.dumps(privacy_of(labelmap).to_json()))
        segmentation.SetAttribute(mrml.LABELS_SHA256_ATTRIBUTE, array_sha256(labelmap.array))

    @staticmethod
    def _labels_stamp(segmentation: Any, reference: Any) -> tuple:
        return (mrml.segmentation_stamp(segmentation), segmentation.GetAttribute(mrml.HISTORY_ATTRIBUTE),
                reference.GetID(), reference.GetImageData().GetDimensions(), mrml.ijk_to_ras(reference).tobytes())

    def _remember_labels(self, segmentation: Any, labelmap: "LabelMap") -> "LabelMap":
        """Keep what the segmentation holds now, so that reading it again costs nothing until it changes.

        The kept array is read-only: the label maps handed out share it.
        """
        labelmap.array = labelmap.array.copy()
        labelmap.array.flags.writeable = False
        stamp = self._labels_stamp(segmentation, self.reference_volume(segmentation))
        self._read_labels[segmentation.GetID()] = (stamp, labelmap)
        result = copy.copy(labelmap)
        result.history = list(labelmap.history)
        return result

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
            self._undo.setdefault(segmentation.GetID(), []).append(
                (previous.array.copy(), list(previous.history), previous.privacy))
        mrml.set_segmentation_labels(segmentation, labelmap.array, reference)
        self._store_records(segmentation, labelmap)
        self._committed[segmentation.GetID()] = labelmap.array.copy()
        self._remember_labels(segmentation, copy.copy(labelmap))

    def _new_label_segmentation(self, labelmap: "LabelMap", reference: Any, name: str, convention: str,
                                lock_anatomy: bool = True, originals: Mapping[str, Any] | None = None,
                                before_edits: "np.ndarray | None | bool" = True) -> Any:
        """A new MedSynth label map node (role, convention, history, privacy, original volumes), no undo steps.

        ``before_edits``: the label map before the user's edits (:meth:`labels_before_edits`); True: ``labelmap``
        itself (a map just prepared or adopted), None: unknown.
        """
        array = labelmap.array
        with mrml.scene_guard(self.scene):
            node = mrml.segmentation_from_labels(self.scene, array, reference, name, lock_anatomy=lock_anatomy)
            node.SetAttribute(ROLE, ROLE_LABELS)
            node.SetAttribute(CONVENTION_ATTRIBUTE, convention)
            self._store_records(node, labelmap)
            for modality, original in (originals or {}).items():
                node.SetNodeReferenceID(ORIGINAL_REFERENCE + modality, original.GetID())
        self._committed[node.GetID()] = array.copy()
        self._undo[node.GetID()] = []
        if before_edits is True:
            before_edits = array
        if before_edits is not None:
            self._keep_before_edits(node, before_edits)
        return node

    def _keep_before_edits(self, segmentation: Any, array: np.ndarray) -> None:
        """Keep the map before the user's edits in this session and with the scene (a scene saved after an edit and
        opened again is still inpainted around every edit)."""
        from MedSynthLib.schema.provenance import array_sha256

        array = np.array(array, dtype=np.uint8, copy=True)
        self._before_edits[segmentation.GetID()] = array
        # A label map is mostly runs of one class: compressed, a few hundred kB at most in the .mrml.
        segmentation.SetAttribute(mrml.BEFORE_EDITS_ATTRIBUTE,
                                  base64.b64encode(zlib.compress(array.tobytes(), 6)).decode("ascii"))
        segmentation.SetAttribute(mrml.BEFORE_EDITS_SHA256_ATTRIBUTE, array_sha256(array))

    @staticmethod
    def _stored_before_edits(segmentation: Any, shape: tuple[int, ...]) -> "np.ndarray | None":
        """The map before the edits as saved with the segmentation; None when absent, of another grid, or not the
        map its hash names (changed outside MedSynth: no guess)."""
        from MedSynthLib.schema.provenance import array_sha256

        stored = segmentation.GetAttribute(mrml.BEFORE_EDITS_ATTRIBUTE)
        if not stored:
            return None
        try:
            voxels = zlib.decompress(base64.b64decode(stored, validate=True))
        except (ValueError, zlib.error):
            return None
        if len(voxels) != int(np.prod(shape)):
            return None
        array = np.frombuffer(voxels, np.uint8).reshape(shape).copy()
        return array if segmentation.GetAttribute(mrml.BEFORE_EDITS_SHA256_ATTRIBUTE) == array_sha256(array) else None

    def labels_before_edits(self, segmentation: Any) -> "np.ndarray | None":
        """The label map as it was prepared (or adopted, or first read unedited), before the user's edits.

        Generate and the preview of a real case without a tumour segmentation take it as the old labels
        (MedSynthLib's ``--old-labels``): what changed since it is re-rendered.  Kept with the scene
        (:meth:`_keep_before_edits`); None when it was never seen unedited (a scene saved after an edit by a
        MedSynth that did not keep it) or the saved one is not the map its hash names.
        """
        if segmentation is None:
            return None
        shape = tuple(self.reference_volume(segmentation).GetImageData().GetDimensions()[::-1])
        before = self._before_edits.get(segmentation.GetID())
        if before is None:
            before = self._stored_before_edits(segmentation, shape)
            if before is not None:
                self._before_edits[segmentation.GetID()] = before
        if before is None or tuple(before.shape) != shape:
            return None
        return before

    def copy_labels(self, segmentation: Any, name: str | None = None) -> Any:
        """A new label segmentation with the same label map and history (a variant to edit separately)."""
        current = self.labelmap(segmentation)
        reference = self.reference_volume(segmentation)
        # The copy continues the source's history: its map before the edits is the source's, not ``current``.
        return self._new_label_segmentation(current, reference, name or f"{segmentation.GetName()} copy",
                                            segmentation.GetAttribute(CONVENTION_ATTRIBUTE) or "brats2021",
                                            bool(self.locked_labels(segmentation)),
                                            self.original_volumes(segmentation),
                                            before_edits=self.labels_before_edits(segmentation))

    def adopt_labels(self, segmentation: Any, label_convention: str = "brats2021",
                     name: str | None = None) -> Any:
        """A MedSynth label map made from a segmentation drawn outside MedSynth (Segment Editor).

        The panel offers MedSynth label maps only (:func:`.mrml.is_label_segmentation`).  A segmentation
        with segments named CSF, GM, WM, NCR, ED, ET (or synonyms) on its reference volume's grid is read
        as a label map (the checks of every MedSynth step) and copied into a new label segmentation with
        MedSynth's segments (so *Lock anatomy* and the tools find them).  The user's node is read only,
        never changed: one that cannot be used is refused and the scene gets nothing.  From Slicer's
        Python console::

            slicer.modules.medsynth.widgetRepresentation().self().logic.workflow.adopt_labels(node)
        """
        ensure_medsynthlib_importable()
        from MedSynthLib.schema.grid import LabelMap
        from MedSynthLib.schema.labels import brain_mask

        reference = self.reference_volume(segmentation)
        convention = _check_convention(segmentation.GetAttribute(CONVENTION_ATTRIBUTE) or label_convention)
        array = self._labels_from_segmentation(segmentation, reference, convention, what="segmentation")
        if not brain_mask(array).any():
            raise WorkflowError(f"{segmentation.GetName()!r} has no brain voxels (every segment is empty)")
        node = self._new_label_segmentation(LabelMap(array, mrml.grid_from_volume(reference), []), reference,
                                            name or f"{segmentation.GetName()} MedSynth labels", convention)
        self.log.emit(f"label map made from {segmentation.GetName()}: {node.GetName()}")
        return node

    def history(self, segmentation: Any) -> list[dict[str, Any]]:
        return json.loads(segmentation.GetAttribute(mrml.HISTORY_ATTRIBUTE) or "[]")


    def undo(self, segmentation: Any) -> "LabelMap":
        """Restore the label map before the last MedSynth edit."""
        ensure_medsynthlib_importable()
        from MedSynthLib.schema.grid import LabelMap

        stack = self._undo.get(segmentation.GetID() if segmentation is not None else "", [])
        if not stack:
            raise WorkflowError("nothing to undo")
        array, history, privacy = stack.pop()
        reference = self.reference_volume(segmentation)
        restored = LabelMap(array, mrml.grid_from_volume(reference), history, privacy=privacy)
        mrml.set_segmentation_labels(segmentation, restored.array, reference)
        self._store_records(segmentation, restored)
        self._committed[segmentation.GetID()] = restored.array.copy()
        self.log.emit("undone")
        return restored

    def can_undo(self, segmentation: Any) -> bool:
        return bool(segmentation is not None and self._undo.get(segmentation.GetID()))

