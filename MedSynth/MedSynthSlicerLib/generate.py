"""Generate and preview on the scene: the label map goes to the worker, the images come back in memory.

Both run in the one backend worker (:mod:`.jobs`), which keeps the model loaded:
``generate`` writes the synthetic case folder (for review and export) and sends
the four images back as written; ``preview`` synthesises the whole case once and
afterwards sends only the region of the label map an edit touched; the worker
keeps the case in memory (:class:`MedSynthLib.synthesis.preview.PreviewSession`)
and answers with only the region of the images it rendered again, which is
copied into the preview volumes in place.  A newer preview supersedes a running
one (the worker stops it at its next network layer and renders both edits).
Nothing here waits on the worker: ``start_*`` returns a job at once, the widget
polls it from a QTimer, ``finish_*`` puts the result into the scene.  Every
output keeps the input's IJK-to-RAS matrix exactly.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from . import mrml
from .environment import backend_env, ensure_medsynthlib_importable
from .errors import CancelledError, WorkflowError
from .jobs import WorkerClient, WorkerTask, labelmap_request
from .mrml import ROLE, ROLE_PREVIEW, ROLE_SYNTHETIC
from .parameters import MODALITIES, MODALITY_TITLES, GenerateOptions


#: Said when a real case without a tumour segmentation is inpainted around what the user changed.
UNSEGMENTED_CASE_NOTICE = ("this case has no tumour segmentation: only what you changed since the label map was "
                           "prepared is re-rendered; MedSynth cannot know whether the patient had a tumour elsewhere, "
                           "and any unsegmented tumour stays in the images (labelled as healthy tissue in the "
                           "exported label map)")


@dataclass
class GenerationJob:
    """A synthesis of one label segmentation running in the worker."""

    task: WorkerTask
    run_dir: Path
    out_dir: Path
    segmentation_id: str
    reference_id: str
    labels_sha256: str
    options: GenerateOptions
    #: The real case folder inpainted into (its images kept outside the edited region), None for a whole case.
    context: str | None = None
    status: str = "running"  # running, done, failed, cancelled
    started: float = field(default_factory=time.monotonic)
    outputs: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def poll(self) -> bool:
        """Dispatch what the worker sent; True while the synthesis runs."""
        return self.task.poll()

    def is_running(self) -> bool:
        return self.task.is_running()


#: How long a preview cancel waits for the worker before killing it: a preview stops at its next network
#: layer (tens of milliseconds), and a kill would lose the case the worker keeps in memory.
PREVIEW_CANCEL_GRACE_S = 2.0


@dataclass
class PreviewJob:
    """A preview (full the first time, then the edited region) running in the worker.

    Attributes:
        seconds: this side's stages (``labels``: the label map read from the segmentation,
            ``diff``: the changed region found, ``submit``: sent; after :meth:`finish_preview`
            also ``receive`` and ``write_volumes``).
    """

    task: WorkerTask
    segmentation_id: str
    reference_id: str
    options: GenerateOptions
    status: str = "running"
    started: float = field(default_factory=time.monotonic)
    outputs: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    session: str = ""

    def poll(self) -> bool:
        return self.task.poll()

    def is_running(self) -> bool:
        return self.task.is_running()


def _config_spread_limit(config: dict[str, Any]) -> float | None:
    """The appearance spread limit a model's config (read as text) declares: ``DEFAULT_SPREAD_LIMIT`` for a synthesis
    model with an appearance code that declares none, ``None`` for a model without the code (or an inpainting one)."""
    from MedSynthLib.synthesis.appearance import DEFAULT_SPREAD_LIMIT

    network = config.get("network", {})
    if network.get("kind") == "inpainting" or not network.get("style_dim"):
        return None
    return float((config.get("appearance") or {}).get("spread_limit", DEFAULT_SPREAD_LIMIT))


class Synthesis:
    """Generate and preview (a part of ``WorkflowLogic``; its state lives there)."""

    # --- the worker ------------------------------------------------------------------------------

    def worker(self) -> WorkerClient:
        """The backend worker of this session (started on first use, kept with its model loaded)."""
        if self._worker is None:
            self._worker = WorkerClient(self.python, env=backend_env(), log=self.log.emit)
        return self._worker

    @staticmethod
    def registered_models() -> list[dict[str, Any]]:
        """The models registered with MedSynth: ``[{"name", "kind", "default", "spread_limit"}]``, the defaults first.

        ``kind`` is ``synthesis`` (label map -> a whole case) or ``inpainting`` (a region of a real case);
        ``default`` says whether it is the registry's default of its kind; ``spread_limit`` is the widest appearance
        spread a synthesis model with an appearance code accepts (``None`` for the others).

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
        from MedSynthLib.synthesis.models import DEFAULT_KEYS

        out = []
        for name, entry in sorted(registry.get("models", {}).items()):
            limit = None
            try:  # the kind is in the model's config (read as text: nothing is verified here)
                # The merged registry names each model's folder whole (shipped or the user's registry).
                config = json.loads((Path(entry["path"]) / "config.json").read_text())
                kind = "inpainting" if config.get("network", {}).get("kind") == "inpainting" else "synthesis"
                limit = _config_spread_limit(config)
            except (OSError, ValueError, TypeError, AttributeError):
                kind = "synthesis"
            out.append({"name": name, "kind": kind, "default": name == registry.get(DEFAULT_KEYS[kind]),
                        "spread_limit": limit})
        out.sort(key=lambda entry: (not entry["default"], entry["kind"] != "synthesis"))
        return out

    @classmethod
    def appearance_spread_limit(cls, model: str) -> float | None:
        """The widest appearance spread ``model`` accepts, for the panel's spin box.

        Args:
            model: a registered name, a model folder, or empty for the registry's default synthesis model.

        Returns:
            the model's declared limit (``DEFAULT_SPREAD_LIMIT`` when its appearance record declares none), or
            ``None`` when that cannot be read from its config without loading it (a model without an appearance
            code, an unknown name, an unreadable folder): the synthesis checks the model itself.
        """
        name = model.strip()
        try:
            entries = cls.registered_models()
        except WorkflowError:
            entries = []
        for entry in entries:
            if entry["name"] == name or (not name and entry["default"] and entry["kind"] == "synthesis"):
                return entry["spread_limit"]
        if not name:
            return None
        try:  # a model folder typed in: its config as text, as the registry's entries are read
            return _config_spread_limit(json.loads((Path(name).expanduser() / "config.json").read_text()))
        except (OSError, ValueError, TypeError, AttributeError):
            return None

    @staticmethod
    def inpainting_model_registered() -> bool:
        """Whether the registry names a default inpainting model (Generate on a real case then inpaints)."""
        from MedSynthLib.schema.errors import MedSynthError
        from MedSynthLib.synthesis.models import DEFAULT_KEYS, read_registry

        try:
            return bool(read_registry().get(DEFAULT_KEYS["inpainting"]))
        except MedSynthError:  # an unreadable registry: the worker reports it when it loads a model
            return False

    def inpainting_context(self, reference: Any, options: GenerateOptions, say: bool = False) -> str | None:
        """The real case folder Generate and the preview inpaint into, or None for a whole synthetic case.

        The rule of both: the input was loaded from a real case folder, ``options.inpaint`` is on, and an
        inpainting model is named or registered as the default.
        """
        source_case = reference.GetAttribute(mrml.SOURCE_CASE_ATTRIBUTE) if options.inpaint else None
        if not source_case:
            return None
        if options.inpainting_model or self.inpainting_model_registered():
            return source_case
        if say:
            self.log.emit("no inpainting model is registered: synthesising a whole case instead")
        return None

    def _send_labels_before_edits(self, segmentation: Any, arrays: dict[str, np.ndarray]) -> None:
        """Add the map before the user's edits to an inpainting request: the worker takes it as the old labels
        where the case has no tumour segmentation (MedSynthLib cannot tell from the edited map where the
        patient's tumour was), and leaves it where the case's own segmentation says that."""
        before = self.labels_before_edits(segmentation)
        if before is not None:
            arrays["old_labels"] = before

    def _say_old_labels(self, data: dict[str, Any]) -> None:
        """One log line when the worker took the map before the edits as the old labels."""
        if data.get("old_tumour") == "old-labels":
            self.log.emit(UNSEGMENTED_CASE_NOTICE)

    @staticmethod
    def is_real_case(volume: Any) -> bool:
        """Whether a volume (the input T1, or a segmentation's reference) was loaded from a real case folder."""
        return bool(volume is not None and volume.GetAttribute(mrml.SOURCE_CASE_ATTRIBUTE))

    def detect_devices(self, timeout_s: float = 180.0):
        """What torch detects in the backend's Python (run in a separate process)."""
        from .environment import detect_devices

        self.device_info = detect_devices(self.python, timeout_s)
        return self.device_info

    def _new_run_dir(self, kind: str) -> Path:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._run_counter += 1
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        return Path(tempfile.mkdtemp(prefix=f"{kind}-{stamp}-{self._run_counter:03d}-", dir=self.work_dir))

    def _checked_options(self, options: GenerateOptions | None) -> GenerateOptions:
        options = options or GenerateOptions()
        options.validate()
        info = self.device_info
        if info is not None and info.torch is not None and options.device not in info.available:
            raise WorkflowError(f"device {options.device!r} is not available here ({info.describe()}); "
                                "choose auto or CPU")
        return options

    # --- generate --------------------------------------------------------------------------------

    def start_generate(self, segmentation: Any, options: GenerateOptions | None = None) -> GenerationJob:
        """Send the current label map to the worker for a full synthesis; returns at once.

        Poll the job (``job.poll()``, from a QTimer in the GUI) and call
        :meth:`finish_generate` when it returns False; or :meth:`cancel_generate`.
        """
        ensure_medsynthlib_importable()
        from MedSynthLib.schema.provenance import array_sha256

        options = self._checked_options(options)
        labelmap = self.labelmap(segmentation)
        reference = self.reference_volume(segmentation)
        run_dir = self._new_run_dir("synthesis")
        out_dir = run_dir / "case"
        params, arrays = labelmap_request(labelmap)
        context = self.inpainting_context(reference, options, say=True)
        if context:  # a real case: keep its images, re-render the edited region (MedSynthLib inpainting)
            params["context"] = context
            self._send_labels_before_edits(segmentation, arrays)
        self.progress.emit(0.0, "starting the synthesis")
        try:
            task = self.worker().submit("generate", dict(params, out=str(out_dir), **options.worker_params()), arrays)
        except OSError as exc:
            raise WorkflowError(f"cannot start the MedSynth worker ({exc})") from None
        task.progress.connect(self.progress.emit)
        self.log.emit(f"synthesis started in the worker (process {task.pid})")
        return GenerationJob(task, run_dir, out_dir, segmentation.GetID(), reference.GetID(),
                             array_sha256(labelmap.array), options, context or None)

    def cancel_generate(self, job: GenerationJob) -> bool:
        """Stop the synthesis (within about half a second); remove its files. True when it has stopped."""
        gone = self.worker().cancel(job.task)
        job.status = "cancelled"
        shutil.rmtree(job.run_dir, ignore_errors=True)
        self.progress.emit(0.0, "cancelled")
        self.log.emit("synthesis cancelled" + ("" if gone else " (the worker did not stop yet)"))
        return gone

    def finish_generate(self, job: GenerationJob, name_prefix: str | None = None) -> dict[str, Any]:
        """Put the synthetic T1/T1ce/T2/FLAIR of a finished job into the scene, on the input's exact grid.

        A whole synthetic case is named "MedSynth synthetic ..." and tagged ``MedSynth.Images`` = ``synthetic``; a
        real case inpainted is named "MedSynth inpainted ..." and tagged ``patient`` (outside the edited region
        its voxels are the patient's scan).

        Raises:
            CancelledError: the job was cancelled.
            WorkflowError: the worker reported an error (its one line is the message), or the
                outputs do not fit the input grid (the scene is left as it was).
        """
        if job.task.is_running():
            job.task.wait()
        if job.task.cancelled or job.status == "cancelled":
            job.status = "cancelled"
            shutil.rmtree(job.run_dir, ignore_errors=True)
            raise CancelledError("synthesis cancelled; nothing was added to the scene")
        if job.task.status != "done":
            job.status, job.error = "failed", job.task.error
            shutil.rmtree(job.run_dir, ignore_errors=True)
            raise WorkflowError(f"synthesis failed: {job.task.error}")
        images = job.task.arrays()
        reference = self._job_reference(job.reference_id)
        if job.context and job.task.result is not None:
            self._say_old_labels(job.task.result.data)
        if name_prefix is None:
            name_prefix = "MedSynth inpainted" if job.context else "MedSynth synthetic"
        outputs: dict[str, Any] = {}
        with mrml.scene_guard(self.scene):
            for modality in MODALITIES:
                node = self._new_output_volume(reference, images.get(modality),
                                               f"{name_prefix} {MODALITY_TITLES[modality]}")
                self._tag_output(node, modality, ROLE_SYNTHETIC, job.segmentation_id, job.options)
                node.SetAttribute("MedSynth.CaseFolder", str(job.out_dir))
                node.SetAttribute("MedSynth.Images", "patient" if job.context else "synthetic")
                outputs[modality] = node
        job.status, job.outputs = "done", outputs
        self.progress.emit(1.0, "done")
        return outputs

    def generate(self, segmentation: Any, options: GenerateOptions | None = None,
                 timeout_s: float = 3600.0) -> dict[str, Any]:
        """Blocking convenience: start, wait, load (for scripts and tests; the GUI polls instead)."""
        job = self.start_generate(segmentation, options)
        try:
            job.task.wait(timeout_s)
        except TimeoutError:
            self.cancel_generate(job)
            raise WorkflowError(f"synthesis did not finish in {timeout_s:.0f} s and was cancelled") from None
        return self.finish_generate(job)

    # --- outputs on the scene --------------------------------------------------------------------

    def _job_reference(self, reference_id: str) -> Any:
        reference = self.scene.GetNodeByID(reference_id)
        if reference is None or reference.GetImageData() is None:
            raise WorkflowError("the input T1 was removed from the scene while synthesising")
        return reference

    def _new_output_volume(self, reference: Any, array: np.ndarray | None, name: str) -> Any:
        dims = reference.GetImageData().GetDimensions()
        if array is None or tuple(array.shape) != tuple(dims[::-1]):
            shape = None if array is None else tuple(array.shape[::-1])
            raise WorkflowError(f"synthesis output {name!r} is not on the grid of {reference.GetName()!r}: "
                                f"dimensions {shape} instead of {tuple(dims)}")
        return mrml.add_volume_from_array(self.scene, array, mrml.ijk_to_ras(reference), name)

    @staticmethod
    def _tag_output(node: Any, modality: str, role: str, segmentation_id: str, options: GenerateOptions) -> None:
        node.SetAttribute(ROLE, role)
        node.SetAttribute("MedSynth.Modality", modality)
        node.SetAttribute("MedSynth.LabelSegmentationID", segmentation_id)
        node.SetAttribute("MedSynth.Seed", str(options.seed))
        node.SetAttribute("MedSynth.AppearanceSpread", f"{options.appearance_spread:g}")

    # --- fast preview ----------------------------------------------------------------------------

    def start_preview(self, segmentation: Any, options: GenerateOptions | None = None) -> PreviewJob:
        """Send the edit for a preview; returns at once (poll the job, then :meth:`finish_preview`).

        A real case with inpainting on (the rule of Generate, :meth:`inpainting_context`) is previewed
        by inpainting: its own images, the edited tumour region re-rendered.  The first preview of a
        segmentation (or after the options changed, or a new worker)
        sends the whole label map and synthesises the whole case; later ones send only the
        region of the label map that changed since the last preview, and the worker renders
        only around it.  A preview started while another runs supersedes it.
        """
        ensure_medsynthlib_importable()
        from MedSynthLib.synthesis.preview import box_slices, changed_box

        clock = time.perf_counter()
        options = self._checked_options(options)
        labelmap = self.labelmap(segmentation)
        reference = self.reference_volume(segmentation)
        read = time.perf_counter()
        context = self.inpainting_context(reference, options)
        key = (segmentation.GetID(), options.model, options.device, options.precision, options.seed,
               options.appearance_spread, options.mirror_average, context,
               options.inpainting_model if context else None)
        nodes = self._preview_outputs
        worker = self.worker()
        sent = self._preview_sent
        new_case = key != self._preview_key  # another segmentation or other options: new preview volumes
        reset = (new_case or not nodes or any(not self.scene.IsNodePresent(n) for n in nodes.values())
                 or sent is None or not worker.alive() or sent["pid"] != worker.pid
                 or sent["labels"].shape != labelmap.array.shape)
        # The records with every request: the preview of a real case reads them as Generate does (plan_region).
        common = dict(options.worker_params(), history=list(labelmap.history),
                      privacy=labelmap_request(labelmap)[0]["privacy"])
        if context:  # a real case: the worker previews by inpainting its images, as Generate does
            common["context"] = context
        if reset:
            session = uuid.uuid4().hex
            params, arrays = labelmap_request(labelmap)
            params = dict(params, **common, session=session, reset=True)
            if context:  # the worker's preview takes the old labels as Generate does
                self._send_labels_before_edits(segmentation, arrays)
            sent = {"session": session, "labels": labelmap.array.copy(), "version": 0, "pid": None}
        else:
            box = changed_box(sent["labels"], labelmap.array) or ((0, 0, 0), (0, 0, 0))
            region = np.ascontiguousarray(labelmap.array[box_slices(box)])
            params = dict(common, session=sent["session"], start=list(box[0]), base=sent["version"])
            arrays = {"labels": region}
            sent["labels"][box_slices(box)] = region
            sent["version"] += 1  # the worker applies every region in order, even of a superseded preview
        diffed = time.perf_counter()
        try:
            task = worker.submit("preview", params, arrays)
        except OSError as exc:
            self._preview_sent = None
            raise WorkflowError(f"cannot start the MedSynth worker ({exc})") from None
        sent["pid"] = worker.pid
        self._preview_sent = sent
        task.progress.connect(self.progress.emit)
        self._preview_key = key
        if new_case:  # the old options' preview volumes go: one set of preview volumes in the scene, not one per seed
            mrml.remove_nodes(self.scene, *(self._preview_outputs or {}).values())
            self._preview_outputs = None
        job = PreviewJob(task, segmentation.GetID(), reference.GetID(), options, session=sent["session"])
        job.seconds = {"labels": read - clock, "diff": diffed - read, "submit": time.perf_counter() - diffed}
        self._preview_jobs = [j for j in self._preview_jobs if j.status == "running"] + [job]
        return job

    def finish_preview(self, job: PreviewJob) -> dict[str, Any]:
        """Copy a finished preview into the preview volumes ("MedSynth preview T1" ...), in place after the first.

        Raises:
            CancelledError: the preview was cancelled or superseded by a newer one.
            WorkflowError: the worker reported an error, or the input T1 is gone.
        """
        if job.task.is_running():
            job.task.wait()
        # The worker answers in order.  An earlier preview of this case that finished before this one
        # superseded it holds a region this one did not render again: it goes into the volumes first.
        for older in [j for j in self._preview_jobs if j is not job and j.task.id < job.task.id]:
            self._preview_jobs.remove(older)
            if older.task.is_running():
                older.task.wait()
            if older.status == "running" and older.task.status == "done" and older.session == job.session:
                self._apply_preview(older)
        if job in self._preview_jobs:
            self._preview_jobs.remove(job)
        if job.task.cancelled:
            job.status = "cancelled"
            raise CancelledError(job.task.error or "preview cancelled")
        if job.task.status != "done":
            job.status = "failed"
            self._preview_sent = None  # the worker may have lost the case: the next preview sends it whole
            raise WorkflowError(f"preview failed: {job.task.error}")
        return self._apply_preview(job)

    def _apply_preview(self, job: PreviewJob) -> dict[str, Any]:
        assert job.task.result is not None
        clock = time.perf_counter()
        data, regions = job.task.result.data, job.task.arrays()
        received = time.perf_counter()
        start = [int(v) for v in data["box"][0]]
        reference = self._job_reference(job.reference_id)
        nodes = self._preview_outputs
        if not nodes or any(not self.scene.IsNodePresent(n) for n in nodes.values()):
            if not data.get("full"):
                self._preview_key, self._preview_sent = None, None
                raise WorkflowError("preview failed: the preview volumes were removed; preview again")
            with mrml.scene_guard(self.scene):
                nodes = {}
                for modality in MODALITIES:
                    node = self._new_output_volume(reference, regions.get(modality),
                                                   f"MedSynth preview {MODALITY_TITLES[modality]}")
                    self._tag_output(node, modality, ROLE_PREVIEW, job.segmentation_id, job.options)
                    nodes[modality] = node
            self._preview_outputs = nodes
        else:
            for modality in MODALITIES:
                region = regions[modality]
                if region.size:
                    try:
                        mrml.update_volume_region(nodes[modality], start, region.astype(np.float32, copy=False))
                    except mrml.MRMLError as exc:
                        raise WorkflowError(f"preview failed: {exc}") from None
        job.seconds.update(receive=received - clock, write_volumes=time.perf_counter() - received)
        job.status, job.outputs = "done", dict(nodes)
        self.last_preview = dict(data, client_s={k: round(v, 4) for k, v in job.seconds.items()})
        self.log.emit(f"preview ({'full' if data.get('full') else 'edited region'}) in {data.get('seconds')} s")
        self._say_old_labels(data)
        return dict(nodes)

    def cancel_preview(self, job: PreviewJob) -> bool:
        """Stop a running preview (at its next network layer; the worker keeps the case)."""
        gone = self.worker().cancel(job.task, grace_s=PREVIEW_CANCEL_GRACE_S)
        job.status = "cancelled"
        return gone

    def preview(self, segmentation: Any, options: GenerateOptions | None = None,
                timeout_s: float = 600.0) -> dict[str, Any]:
        """Blocking convenience of :meth:`start_preview` + :meth:`finish_preview` (scripts and tests)."""
        job = self.start_preview(segmentation, options)
        try:
            job.task.wait(timeout_s)
        except TimeoutError:
            self.cancel_preview(job)
            raise WorkflowError(f"the preview did not finish in {timeout_s:.0f} s and was cancelled") from None
        return self.finish_preview(job)

    def close_preview(self) -> None:
        """Forget the preview state (the preview volumes stay in the scene)."""
        self._preview_outputs = None
        self._preview_key = None
        self._preview_sent = None
        self._preview_jobs = []


__all__ = ["PREVIEW_CANCEL_GRACE_S", "UNSEGMENTED_CASE_NOTICE", "GenerationJob", "PreviewJob", "Synthesis"]
