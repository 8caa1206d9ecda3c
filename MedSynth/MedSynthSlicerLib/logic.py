"""The MedSynth workflow on an MRML scene, without Qt: a thin facade over the parts of the module.

:class:`WorkflowLogic` is what the widget (``MedSynth.py``) and scripts call.  It
holds the state of one session on one scene and combines the parts, each in its
own module:

* :mod:`.label_segmentation` - input volumes, prepare, the label map of a
  segmentation node (Segment Editor strokes recorded, locked anatomy enforced), undo;
* :mod:`.tumour_tools` - MedSynthLib edits: parametric, random, insert, the handles;
* :mod:`.generate` - generate and preview through the backend worker (:mod:`.jobs`);
* :mod:`.review` - the four linked review views;
* here - the clinician's rating and the export (through the same worker).

It holds no science: every label-map operation is a MedSynthLib call, and
synthesis and export run in the worker process.  The rules of the module:

* inputs are never modified (their voxels and IJK-to-RAS matrices are read,
  never written);
* outputs keep the input's IJK-to-RAS matrix exactly;
* every problem raises :class:`~MedSynthSlicerLib.errors.WorkflowError` with one
  clear sentence, and leaves the scene as it was (nodes added by the failing
  call are removed, existing nodes are changed only after all checks passed).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import CancelledError, WorkflowError
from .generate import GenerationJob, PreviewJob, Synthesis
from .jobs import WorkerClient, WorkerTask
from .label_segmentation import MANUAL_EDIT, LabelSegmentation, segment_label
from . import mrml
from .mrml import ROLE, ROLE_PREVIEW
from .parameters import EXPORT_FORMATS, EXPORT_NAMINGS, repaired_device
from .process import python_executable
from .review import REVIEW_LAYOUT_ID, REVIEW_VIEWS, ReviewViews
from .signals import Signal
from .tumour_tools import TumourTools, linear_edits_for_matrix

__all__ = ["MANUAL_EDIT", "REVIEW_LAYOUT_ID", "REVIEW_VIEWS", "ExportJob", "GenerationJob", "PreviewJob",
           "WorkflowLogic", "linear_edits_for_matrix", "repair_device_parameter", "repair_parameter_nodes",
           "segment_label"]

#: The module name: singleton tag (and ``ModuleName`` attribute) of MedSynth's parameter node.
MODULE_NAME = "MedSynth"


def repair_device_parameter(node: Any) -> bool:
    """Set a parameter node's device back to auto when this platform lacks it (see
    :func:`.parameters.repaired_device`); True when it was changed."""
    fixed = repaired_device(node.GetParameter("device") or "")
    if fixed is None:
        return False
    node.SetParameter("device", fixed)
    return True


def repair_parameter_nodes(scene: Any, module_name: str = MODULE_NAME) -> list[Any]:
    """Repair every MedSynth parameter node of ``scene`` (after a scene was imported); returns those changed.

    Importing a scene copies its MedSynth parameter node into the open session's, so a scene saved on
    another platform brings a device this one lacks; the widget calls this on ``EndImportEvent``.
    Other modules' parameter nodes are left alone.
    """
    return [node for node in mrml.nodes_by_class(scene, "vtkMRMLScriptedModuleNode")
            if module_name in (node.GetSingletonTag(), node.GetAttribute("ModuleName")) and repair_device_parameter(node)]


class ExportJob:
    """An export of one synthetic case running in the worker."""

    def __init__(self, task: WorkerTask, case_dir: Path, folder: Path, fmt: str) -> None:
        self.task = task
        self.case_dir = case_dir
        self.folder = folder
        self.fmt = fmt
        self.status = "running"
        self.targets: list[Path] = []

    def poll(self) -> bool:
        return self.task.poll()

    def is_running(self) -> bool:
        return self.task.is_running()


class WorkflowLogic(LabelSegmentation, TumourTools, Synthesis, ReviewViews):
    """MedSynth's module logic on one MRML scene (no Qt; tested on slicer-core).

    Args:
        scene: the ``vtkMRMLScene``.
        python: the Python that runs the backend worker (default: ``PythonSlicer`` in
            Slicer, this interpreter elsewhere).
        work_dir: where the synthetic cases of this session go
            (default: a new temporary folder).

    Signals:
        log(str): one line for the module's log box (the worker's log included).
        progress(float, str): progress of the running job.
    """

    def __init__(self, scene: Any, python: str | None = None, work_dir: str | os.PathLike[str] | None = None) -> None:
        self.scene = scene
        self.python = python or python_executable()
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="medsynth-slicer-"))
        self.log = Signal("str")
        self.progress = Signal("float", "str")
        self._committed: dict[str, np.ndarray] = {}
        self._read_labels: dict[str, tuple[tuple, Any]] = {}  # segmentation ID -> (stamp, LabelMap read)
        self._undo: dict[str, list[tuple[np.ndarray, list[dict[str, Any]], Any]]] = {}  # array, history, privacy
        self._before_edits: dict[str, np.ndarray] = {}  # segmentation ID -> its map before the user's edits
        self._run_counter = 0
        self._worker: WorkerClient | None = None
        self._preview_outputs: dict[str, Any] | None = None
        self._preview_key: tuple | None = None
        self._preview_sent: dict[str, Any] | None = None  # what the worker's preview session holds
        self._preview_jobs: list[PreviewJob] = []  # previews sent and not finished, oldest first
        self.last_preview: dict[str, Any] | None = None
        self.device_info = None

    # =========================================================================================
    # 5. review: the clinician's rating
    # =========================================================================================

    def set_review(self, outputs: Mapping[str, Any], rating: int, note: str = "") -> dict[str, Any]:
        """Store a clinician's rating (1-5; 0 = not rated) and note on the synthetic case.

        Written as node attributes (``MedSynth.Rating``, ``MedSynth.ReviewNote``,
        ``MedSynth.ReviewedAt``) on every output volume and as ``review`` in the case's
        ``provenance.json`` through MedSynthLib's ``save_review`` (the same path as the web
        review); :meth:`export` carries the rating and its time, the note stays in the case folder.
        """
        from MedSynthLib.schema.errors import MedSynthError
        from MedSynthLib.schema.review import save_review

        if not outputs:
            raise WorkflowError("no synthetic case to rate: generate one first")
        case_dir = self.case_folder(outputs)
        try:
            review = save_review(case_dir, rating, note)
        except MedSynthError as exc:
            raise WorkflowError(str(exc)) from None
        for node in outputs.values():
            node.SetAttribute("MedSynth.Rating", str(review["rating"]))
            node.SetAttribute("MedSynth.ReviewNote", review["note"])
            node.SetAttribute("MedSynth.ReviewedAt", review["reviewed_at"])
        return review

    @staticmethod
    def case_folder(outputs: Mapping[str, Any]) -> Path:
        if any(node.GetAttribute(ROLE) == ROLE_PREVIEW for node in outputs.values()):
            raise WorkflowError("a preview is not a saved case: press Generate to make the case to rate and export")
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
        """Start MedSynthLib's export of the case in the worker; returns at once (poll, then :meth:`finish_export`)."""
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
        try:
            task = self.worker().submit("export", {"case": str(case_dir), "folder": str(folder), "format": fmt,
                                                   "naming": naming})
        except OSError as exc:
            raise WorkflowError(f"cannot start the MedSynth worker ({exc})") from None
        task.progress.connect(self.progress.emit)
        return ExportJob(task, case_dir, folder, fmt)

    def finish_export(self, job: ExportJob) -> list[Path]:
        """The exported case folder(s).

        The clinician's review reaches the export through MedSynthLib's sanitiser only (the
        rating and its time; the free-text note stays in the case folder), as on the CLI.
        """
        if job.task.is_running():
            job.task.wait()
        if job.task.cancelled:
            job.status = "cancelled"
            raise CancelledError("export cancelled")
        if job.task.status != "done":
            job.status = "failed"
            message = job.task.error or "the export ended without a result"
            if "already exists" in message:
                message += " - MedSynth never overwrites an export; choose another folder"
            raise WorkflowError(f"export failed: {message}")
        assert job.task.result is not None
        targets = [Path(t) for t in job.task.result.data.get("targets", [])]
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
            job.task.wait(timeout_s)
        except TimeoutError:
            self.worker().cancel(job.task)
            raise WorkflowError(f"export did not finish in {timeout_s:.0f} s and was cancelled") from None
        return self.finish_export(job)

    # =========================================================================================

    def scene_closed(self) -> None:
        """Forget what was kept per node: a closed scene's node IDs are handed out again to the next scene's
        nodes, whose label segmentation would otherwise take the old one's undo steps, committed labels and
        preview (an Undo wrote the closed scene's tumour into a loaded tumour-free map)."""
        self._committed.clear()
        self._read_labels.clear()
        self._undo.clear()
        self._before_edits.clear()
        self.close_preview()
        self.last_preview = None

    def cleanup(self) -> None:
        """Stop the worker (the work folder is kept: the synthetic cases live there)."""
        self.close_preview()
        if self._worker is not None:
            self._worker.close()
            self._worker = None


