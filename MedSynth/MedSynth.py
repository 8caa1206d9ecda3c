"""MedSynth: synthesise brain-tumour MRI (T1, T1ce, T2, FLAIR) from a label map in 3D Slicer.

A thin scripted module: the widget turns clicks into calls of
``MedSynthSlicerLib.logic.WorkflowLogic`` (Qt-free, tested on slicer-core) and
shows what it reports.  The science is in MedSynthLib; generate, preview and
export run in MedSynth's worker process (typed JSON-line messages, images as
arrays in RAM), which the widget polls from a timer.

Workflow: 1 input -> 2 prepare (label map as segments CSF, GM, WM, NCR, ED, ET)
-> 3 tumour tools -> 4 generate / preview (in the worker, progress, cancel) ->
5 review (four linked views, rating) -> 6 export (NIfTI / DICOM).
"""

from __future__ import annotations

import enum
import logging
import os
import pathlib
import tempfile
from typing import Annotated, Optional, Union

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.parameterNodeWrapper import Choice, Default, WithinRange, parameterNodeWrapper
from slicer.util import VTKObservationMixin

from MedSynthSlicerLib.errors import CancelledError, WorkflowError
from MedSynthSlicerLib.mrml import ROLE_ATTRIBUTE, ROLE_LABELS
from MedSynthSlicerLib.parameters import (APPEARANCE_SPREAD_RANGE, DETECT_CONVENTION, DEVICES, EXPORT_FORMATS,
                                          EXPORT_NAMINGS, INSERT_LABEL_CONVENTIONS, LABEL_CONVENTIONS, PRECISIONS, GenerateOptions,
                                          TumourParameters, device_parameter, platform_devices)

from slicer import (vtkMRMLLabelMapVolumeNode, vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode,  # noqa: E402
                    vtkMRMLSegmentationNode)

try:  # Slicer's translation functions; plain text where they are missing (slicer-core, old Slicer)
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:
    def _(text: str) -> str:
        return text

    def translate(context: str, text: str) -> str:
        return text

_MAX_SEED = 2**31 - 1
#: Where the user documentation lives (the extension's homepage).
DOCUMENTATION_URL = "https://github.com/MedSynth/SlicerMedSynth#readme"


class _DeviceChoice(enum.Enum):
    """Where synthesis runs; the members are the devices this platform can have (see ``Device``)."""

    def label(self) -> str:  # shown in the combo box (parameterNodeWrapper calls Device.label(member))
        return {"auto": _("auto (GPU if one is found)"), "cuda": _("GPU (NVIDIA CUDA)"),
                "mps": _("GPU (Apple MPS)"), "cpu": _("CPU")}[self.value]


#: The device choices of this platform: CUDA is never offered on macOS, Apple MPS only there.
Device = _DeviceChoice("Device", [(device_parameter(name), name) for name in platform_devices()], module=__name__)

assert {d.value for d in Device} <= set(DEVICES)


class GenerateMode(enum.Enum):
    """What Generate (and the fast preview) make of a case loaded from a real case folder."""

    INPAINT = "inpaint"
    WHOLE = "whole"

    def label(self) -> str:  # shown in the combo box (parameterNodeWrapper calls GenerateMode.label(member))
        return {"inpaint": _("Keep the patient's images, re-render the edited region (inpainting)"),
                "whole": _("Whole synthetic case (all images synthetic; the patient's anatomy)")}[self.value]


#
# MedSynth
#


class MedSynth(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedSynth")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Image Synthesis")]
        self.parent.dependencies = ["Segmentations", "SegmentEditor", "Markups"]
        self.parent.contributors = ["MedSynth developers"]
        self.parent.helpText = _(
            "Synthesise brain-tumour MRI (T1, T1ce, T2, FLAIR) from a label map with a 3D conditional GAN. "
            "Load a brain (or the healthy template), prepare its label map, draw, move, insert or randomise "
            "a tumour, generate on the GPU or CPU in the background, review the four contrasts and export "
            "NIfTI or DICOM marked synthetic.") + " " + _(
            'See the <a href="{url}">MedSynth documentation</a> for the workflow and the models.').format(
            url=DOCUMENTATION_URL)
        self.parent.acknowledgementText = _(
            "Method after Shin et al., Medical image synthesis for data augmentation and anonymization using "
            "generative adversarial networks (SASHIMI 2018). Healthy canvas: ICBM152 2009a (via nilearn).")


#
# Parameter node
#


@parameterNodeWrapper
class MedSynthParameterNode:
    """What the user chose; every field is bound to a widget of MedSynth.ui (SlicerParameterName)."""

    # 1. input
    caseFolder: pathlib.Path
    t1Volume: vtkMRMLScalarVolumeNode
    t1ceVolume: vtkMRMLScalarVolumeNode
    t2Volume: vtkMRMLScalarVolumeNode
    flairVolume: vtkMRMLScalarVolumeNode
    # Optional: the wrapper writes the default None, which only a Union that includes None accepts.
    tumourInput: Optional[Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]]
    labelConvention: Annotated[str, Choice(list(LABEL_CONVENTIONS)), Default("brats2021")]
    # 2. prepare
    lockAnatomy: Annotated[bool, Default(True)]
    labelSegmentation: vtkMRMLSegmentationNode
    # 3. tumour tools
    tumourCentre: vtkMRMLMarkupsFiducialNode
    tumourRadiusMm: Annotated[float, WithinRange(2.0, 60.0), Default(15.0)]
    rimMm: Annotated[float, WithinRange(0.0, 10.0), Default(2.0)]
    oedemaMm: Annotated[float, WithinRange(0.0, 40.0), Default(10.0)]
    irregularity: Annotated[float, WithinRange(0.0, 1.0), Default(0.3)]
    necrosis: Annotated[bool, Default(True)]
    shapeSeed: Annotated[int, WithinRange(0, _MAX_SEED), Default(0)]
    insertSource: pathlib.Path
    insertLabelConvention: Annotated[str, Choice(list(INSERT_LABEL_CONVENTIONS)), Default(DETECT_CONVENTION)]
    insertAtPoint: bool
    randomSeed: Annotated[int, WithinRange(0, _MAX_SEED), Default(0)]
    # 4. generate
    # A real case: keep its images and inpaint the edited region (default), or synthesise it whole.
    generateMode: Annotated[GenerateMode, Default(GenerateMode.INPAINT)]
    model: str
    inpaintingModel: str
    device: Annotated[Device, Default(Device.AUTO)]
    precision: Annotated[str, Choice(list(PRECISIONS)), Default("auto")]
    synthesisSeed: Annotated[int, WithinRange(0, _MAX_SEED), Default(0)]
    appearanceSpread: Annotated[float, WithinRange(*APPEARANCE_SPREAD_RANGE), Default(1.0)]
    mirrorAverage: Annotated[bool, Default(True)]  # the command line's default (off: --no-mirror-average)
    # 5. review
    rating: Annotated[int, WithinRange(0, 5), Default(0)]
    reviewNote: str
    # 6. export
    exportFormat: Annotated[str, Choice(list(EXPORT_FORMATS)), Default("nifti")]
    exportNaming: Annotated[str, Choice(list(EXPORT_NAMINGS)), Default("brats2021")]
    exportFolder: pathlib.Path


def _insert_convention(choice: str) -> Optional[str]:
    """The tumour-label convention of an inserted file: None lets MedSynth read it from the file."""
    return None if choice == DETECT_CONVENTION else choice


def _path_text(path: Optional[pathlib.Path]) -> str:
    """'' for an unset Path parameter (the wrapper stores an empty path as '.')."""
    text = str(path) if path is not None else ""
    return "" if text in ("", ".") else text


#
# Widget
#


class MedSynthWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    POLL_MS = 50  # the worker's events are drained this often (a preview takes about a second)

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[MedSynthLogic] = None
        self._parameterNode: Optional[MedSynthParameterNode] = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._exportJob = None
        self._previewJob = None
        self._outputs: dict = {}
        self._dependenciesReady = False
        self._modelNames: list = []
        self._inpaintingModelNames: list = []
        self._inpaintingDefault = False
        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_MS)
        self._timer.timeout.connect(self._onPoll)

    # --- setup ---------------------------------------------------------------------------------

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedSynth.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = MedSynthLogic()
        self.logic.workflow.log.connect(self._appendLog)
        self.logic.workflow.progress.connect(self._onProgress)

        # Only MedSynth label maps (mrml.is_label_segmentation): not the handles' moving copy or other segmentations.
        self.ui.labelsSelector.addAttribute("vtkMRMLSegmentationNode", ROLE_ATTRIBUTE, ROLE_LABELS)
        self.ui.tumourCentrePlaceWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.tumourCentrePlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceSingleMarkup
        self.ui.progressBar.setRange(0, 1000)
        self.ui.progressBar.setValue(0)
        self.ui.advancedCollapsibleButton.collapsed = True
        self._fillModelList()
        self.ui.registeredModelsListWidget.currentTextChanged.connect(self.onRegisteredModelSelected)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartImportEvent, self.onSceneStartImport)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)

        # 1. input
        self.ui.templateButton.clicked.connect(self.onTemplate)
        self.ui.loadCaseButton.clicked.connect(self.onLoadCase)
        # 2. prepare
        self.ui.prepareButton.clicked.connect(self.onPrepare)
        self.ui.segmentEditorButton.clicked.connect(self.onSegmentEditor)
        self.ui.lockAnatomyCheckBox.toggled.connect(self.onLockAnatomy)
        # 3. tumour tools
        self.ui.moveTumourButton.clicked.connect(self.onMoveTumour)
        self.ui.applyTransformButton.clicked.connect(self.onApplyTransform)
        self.ui.cancelTransformButton.clicked.connect(self.onCancelTransform)
        self.ui.addTumourButton.clicked.connect(self.onAddTumour)
        self.ui.insertTumourButton.clicked.connect(self.onInsertTumour)
        self.ui.randomTumourButton.clicked.connect(self.onRandomTumour)
        self.ui.undoButton.clicked.connect(self.onUndo)
        # 4. generate
        self.ui.detectDevicesButton.clicked.connect(self.onDetectDevices)
        self.ui.applyButton.clicked.connect(self.onApplyButton)
        self.ui.previewButton.clicked.connect(self.onPreview)
        # 5. review
        self.ui.reviewLayoutButton.clicked.connect(self.onReviewLayout)
        self.ui.showSyntheticButton.clicked.connect(self.onShowSynthetic)
        self.ui.showOriginalButton.clicked.connect(self.onShowOriginal)
        self.ui.saveReviewButton.clicked.connect(self.onSaveReview)
        # 6. export
        self.ui.exportButton.clicked.connect(self.onExport)

        self.initializeParameterNode()
        self._updateButtons()
        problem = self.slicerVersionProblem()
        if problem:  # said at once in the panel; the first action refuses to run with the same sentence
            self.ui.statusLabel.text = problem
            self._appendLog(problem)

    @staticmethod
    def slicerVersionProblem() -> Optional[str]:
        """Why this Slicer is too old for MedSynth (one sentence), or None."""
        from MedSynthSlicerLib import environment

        try:
            environment.check_slicer_version(environment.running_slicer_version())
        except RuntimeError as exc:
            return str(exc)
        return None

    def cleanup(self) -> None:
        self._timer.stop()
        if self._job is not None and self._job.is_running():
            self.logic.workflow.cancel_generate(self._job)
        if self._previewJob is not None and self._previewJob.is_running():
            self.logic.workflow.cancel_preview(self._previewJob)
        if self.logic is not None:
            self.logic.workflow.cleanup()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self._takeSegmentEditorChanges()

    def _takeSegmentEditorChanges(self) -> None:
        """Back from the Segment Editor: record its strokes now, or refuse a change to locked anatomy now."""
        seg = self._segmentation()
        if seg is not None and self._dependenciesReady:
            self._run(_("taking the Segment Editor changes"), self.workflow.labelmap, seg)

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None and self._job.is_running():
            self.logic.workflow.cancel_generate(self._job)
            self._endJobUi()
        if self._previewJob is not None:  # its volumes would land in the next scene, on reused node IDs
            if self._previewJob.is_running():
                self.logic.workflow.cancel_preview(self._previewJob)
            self._previewJob = None
        self.logic.workflow.scene_closed()
        self.ui.progressBar.setValue(0)
        self._updateButtons()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        self._outputs = {}
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onSceneStartImport(self, caller, event) -> None:
        # The imported scene's MedSynth parameters are copied into this parameter node: the panel reads them
        # again after they were repaired (onSceneEndImport), not while a foreign device is in it.
        self.setParameterNode(None)

    def onSceneEndImport(self, caller, event) -> None:
        from MedSynthSlicerLib.logic import repair_parameter_nodes

        if repair_parameter_nodes(slicer.mrmlScene):  # a scene saved on another platform (CUDA on a Mac)
            self._appendLog(_("the loaded scene's device is not available on this computer: device set to auto"))
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.t1Volume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.t1Volume = first
        if not _path_text(self._parameterNode.exportFolder):
            self._parameterNode.exportFolder = pathlib.Path.home()
        self._chooseInpaintingModel()
        # The tumour-centre point list is created when a tumour tool first needs it, not on entering.
        self.ui.tumourCentrePlaceWidget.setCurrentNode(self._parameterNode.tumourCentre)

    def _tumourCentreNode(self):
        """The tumour-centre point list, created (and given to the place widget) on first need."""
        p = self._parameterNode
        if p.tumourCentre is None:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", _("MedSynth tumour centre"))
            node.SetMarkupLabelFormat(_("tumour centre"))
            p.tumourCentre = node
            self.ui.tumourCentrePlaceWidget.setCurrentNode(node)
        return p.tumourCentre

    def _fillModelList(self) -> None:
        """The registered models in the list (the default marked); picking one sets the model parameter."""
        listWidget = self.ui.registeredModelsListWidget
        listWidget.clear()
        try:
            models = self.workflow.registered_models()
        except Exception as exc:  # the list is a convenience: a broken registry must not stop the module
            logging.warning(f"MedSynth: {exc}")
            models = []
        for entry in models:
            notes = ([_("inpainting")] if entry.get("kind") == "inpainting" else []) + (
                [_("default")] if entry["default"] else []) + (
                [_("appearance spread up to {limit:g}").format(limit=entry["spread_limit"])]
                if entry.get("spread_limit") not in (None, 1.0) else [])
            listWidget.addItem(entry["name"] + (" (" + ", ".join(notes) + ")" if notes else ""))
        self._modelNames = [entry["name"] for entry in models]
        self._spreadLimitFor = (None, None)  # the registry was read again: so are the limits
        self._inpaintingModelNames = [entry["name"] for entry in models if entry.get("kind") == "inpainting"]
        self._inpaintingDefault = any(e["default"] for e in models if e.get("kind") == "inpainting")

    def _chooseInpaintingModel(self) -> None:
        """Without a default inpainting model in the registry, a registered one is chosen (shown in the panel),
        so that keeping a real case's images works as the choice says."""
        p = self._parameterNode
        names = getattr(self, "_inpaintingModelNames", [])
        if p is not None and not p.inpaintingModel.strip() and names and not self._inpaintingDefault:
            p.inpaintingModel = names[0]
            self._appendLog(_("inpainting model: {name} (registered; the registry names no default)").format(
                name=names[0]))

    def onRegisteredModelSelected(self, text: str) -> None:
        """Picking a registered model sets the model of its kind (synthesis, or inpainting for real cases)."""
        if self._parameterNode is None:
            return
        for name in self._modelNames:
            if text == name or text.startswith(name + " "):
                if name in getattr(self, "_inpaintingModelNames", []):
                    self._parameterNode.inpaintingModel = name
                else:
                    self._parameterNode.model = name
                return

    def setParameterNode(self, inputParameterNode: Optional[MedSynthParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            if self.hasObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons):
                self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._updateButtons()

    # --- helpers ---------------------------------------------------------------------------------

    @property
    def workflow(self):
        return self.logic.workflow

    def _run(self, what: str, fn, *args, **kwargs):
        """Call the Logic with a wait cursor; show its WorkflowError in a message box."""
        try:
            with slicer.util.tryWithErrorDisplay(_("MedSynth: {what} failed.").format(what=what), waitCursor=True):
                try:
                    return fn(*args, **kwargs)
                except WorkflowError:
                    raise
                except Exception as exc:  # an unexpected error: show it, log the trace
                    logging.exception("MedSynth")
                    raise WorkflowError(f"{type(exc).__name__}: {exc}") from exc
        except Exception:
            return None
        finally:
            self._updateButtons()

    def _ensureDependencies(self, needTorch: bool = False) -> bool:
        """MedSynthLib's packages (pip_ensure) and, for synthesis, torch (PyTorch extension, after asking)."""
        from MedSynthSlicerLib import environment

        try:
            if not self._dependenciesReady:
                environment.ensure_medsynthlib_importable()
                environment.ensure_python_requirements()
                self._dependenciesReady = True
            if needTorch:
                version = environment.ensure_torch(
                    confirm=lambda text: slicer.util.confirmOkCancelDisplay(text, _("MedSynth")))
                self._appendLog(_("PyTorch {version}").format(version=version))
            return True
        except Exception as exc:
            slicer.util.errorDisplay(_("MedSynth cannot run yet: {reason}").format(reason=exc))
            return False

    def _appendLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)
        logging.info(f"MedSynth: {text}")

    def _onProgress(self, fraction: float, text: str) -> None:
        self.ui.progressBar.setValue(int(round(1000 * fraction)))
        self.ui.statusLabel.text = text

    def _segmentation(self):
        return self._parameterNode.labelSegmentation if self._parameterNode else None

    def _options(self) -> GenerateOptions:
        p = self._parameterNode
        return GenerateOptions(model=p.model.strip() or None, device=p.device.value, precision=p.precision,
                               seed=int(p.synthesisSeed), appearance_spread=float(p.appearanceSpread),
                               inpaint=p.generateMode == GenerateMode.INPAINT,
                               inpainting_model=p.inpaintingModel.strip() or None,
                               mirror_average=bool(p.mirrorAverage))

    def _isRealCase(self) -> bool:
        """Whether the input was loaded from a real case folder (its four images can be kept)."""
        p = self._parameterNode
        reference = p.t1Volume
        seg = p.labelSegmentation
        if seg is not None:
            reference = seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole()) or reference
        return self.workflow.is_real_case(reference)

    def _tumourParameters(self) -> TumourParameters:
        p = self._parameterNode
        return TumourParameters(radius_mm=p.tumourRadiusMm, rim_mm=p.rimMm, oedema_mm=p.oedemaMm,
                                irregularity=p.irregularity, necrosis=p.necrosis, seed=int(p.shapeSeed))

    def _pointRas(self):
        node = self._parameterNode.tumourCentre
        if node is None or node.GetNumberOfControlPoints() == 0:
            return None
        point = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(node.GetNumberOfControlPoints() - 1, point)
        return point

    def _updateButtons(self, caller=None, event=None) -> None:
        if not self._parameterNode:
            return
        p = self._parameterNode
        busy = self._job is not None and self._job.is_running()
        previewing = self._previewJob is not None and self._previewJob.is_running()
        exporting = self._exportJob is not None and self._exportJob.is_running()
        seg = p.labelSegmentation
        hasLabels = seg is not None
        transforming = hasLabels and bool(seg.GetAttribute("MedSynth.TransformNodeID"))
        self.ui.prepareButton.enabled = p.t1Volume is not None and not busy
        self.ui.segmentEditorButton.enabled = hasLabels
        for button in (self.ui.moveTumourButton, self.ui.addTumourButton, self.ui.insertTumourButton,
                       self.ui.randomTumourButton):
            button.enabled = hasLabels and not busy and not transforming
        self.ui.applyTransformButton.enabled = transforming
        self.ui.cancelTransformButton.enabled = transforming
        self.ui.undoButton.enabled = hasLabels and self.workflow.can_undo(seg) and not busy
        self.ui.applyButton.enabled = hasLabels or busy
        self.ui.applyButton.text = _("Cancel") if busy else _("Generate")
        self.ui.applyButton.toolTip = (_("Stop the synthesis (within about half a second)") if busy
                                       else _("Synthesise T1, T1ce, T2 and FLAIR in MedSynth's worker process"))
        realCase = self._isRealCase()
        self.ui.generateModeComboBox.enabled = realCase and not busy
        self.ui.generateModeComboBox.toolTip = (
            _("The input is a real case: keep the patient's images and re-render only the edited tumour region "
              "(not anonymous), or synthesise every voxel (not anonymous either: the case still has this patient's "
              "anatomy, brain outline and CSF/GM/WM). For a case to share, start from the healthy template brain "
              "with a drawn (parametric) tumour") if realCase
            else _("Only for a case loaded from a folder with its four images: this input is always synthesised "
                   "as a whole case"))
        self.ui.inpaintingModelLineEdit.enabled = realCase and p.generateMode == GenerateMode.INPAINT
        self.ui.previewButton.enabled = (hasLabels and not busy) or previewing
        self.ui.previewButton.text = _("Stop preview") if previewing else _("Fast preview")
        hasOutputs = bool(self._outputs)
        for button in (self.ui.showSyntheticButton, self.ui.saveReviewButton):
            button.enabled = hasOutputs
        self.ui.showOriginalButton.enabled = hasOutputs and hasLabels
        self.ui.reviewLayoutButton.enabled = hasOutputs
        self.ui.exportButton.enabled = hasOutputs and not exporting
        self._fitAppearanceSpreadToModel()

    def _fitAppearanceSpreadToModel(self) -> None:
        """The spin box offers the chosen model's appearance spreads only; a spread past a newly chosen model's
        limit is lowered to it (and logged), so Generate is not refused for a setting the panel offered."""
        p = self._parameterNode
        model = p.model.strip()
        if getattr(self, "_spreadLimitFor", (None, None))[0] != model:  # read once per model, not per update
            self._spreadLimitFor = (model, self.workflow.appearance_spread_limit(model))
        limit = self._spreadLimitFor[1]
        high = APPEARANCE_SPREAD_RANGE[1] if limit is None else min(limit, APPEARANCE_SPREAD_RANGE[1])
        spin = self.ui.appearanceSpreadSpinBox
        if spin.maximum != high:
            spin.maximum = high
            spin.toolTip = (_("How far the seed's appearance reaches from the model's mean appearance: 1 the "
                              "training cases' spread, 0 the mean appearance for every seed; this model accepts up "
                              "to {limit:g}; recorded in the provenance").format(limit=high) if limit is not None
                            else _("How far the seed's appearance reaches from the model's mean appearance: 1 the "
                                   "training cases' spread, 0 the mean appearance for every seed; past 1 only as far "
                                   "as the chosen model accepts (its model card); recorded in the provenance"))
        if p.appearanceSpread > high:
            p.appearanceSpread = high
            self._appendLog(_("appearance spread lowered to {limit:g}, the widest the model accepts").format(
                limit=high))

    # --- 1. input ----------------------------------------------------------------------------

    def onTemplate(self) -> None:
        if not self._ensureDependencies():
            return
        node = self._run(_("loading the template"), self.workflow.load_template)
        if node is not None:
            p = self._parameterNode
            p.t1Volume, p.t1ceVolume, p.t2Volume, p.flairVolume, p.tumourInput = node, None, None, None, None
            slicer.util.setSliceViewerLayers(background=node, fit=True)

    def onLoadCase(self) -> None:
        if not self._ensureDependencies():
            return
        folder = _path_text(self._parameterNode.caseFolder)
        if not folder:
            slicer.util.errorDisplay(_("MedSynth: choose a case folder first."))
            return
        nodes = self._run(_("loading the case"), self.workflow.load_case, folder)
        if nodes:
            p = self._parameterNode
            p.t1Volume, p.t1ceVolume, p.t2Volume, p.flairVolume = nodes["t1"], nodes["t1ce"], nodes["t2"], nodes["flair"]
            p.tumourInput = nodes["tumour"]
            if nodes["tumour"] is not None:
                p.labelConvention = nodes["tumour"].GetAttribute("MedSynth.LabelConvention") or p.labelConvention
            slicer.util.setSliceViewerLayers(background=nodes["t1"], fit=True)

    # --- 2. prepare ---------------------------------------------------------------------------

    def onPrepare(self) -> None:
        if not self._ensureDependencies():
            return
        p = self._parameterNode
        others = {"t1ce": p.t1ceVolume, "t2": p.t2Volume, "flair": p.flairVolume}
        seg = self._run(_("preparing the label map"), self.workflow.prepare, p.t1Volume, p.tumourInput,
                        p.labelConvention, others, None, p.lockAnatomy)
        if seg is not None:
            p.labelSegmentation = seg
            self._tumourCentreNode()  # the tumour tools are usable now: give them their point list
            slicer.util.setSliceViewerLayers(background=p.t1Volume, fit=True)

    def onLockAnatomy(self, locked: bool) -> None:
        seg = self._segmentation()
        if seg is not None:
            self._run(_("locking the anatomy"), self.workflow.set_anatomy_locked, seg, locked)

    def onSegmentEditor(self) -> None:
        seg = self._segmentation()
        if seg is None:
            return
        reference = self._run(_("opening the Segment Editor"), self.workflow.reference_volume, seg)
        if reference is None:
            return
        slicer.util.selectModule("SegmentEditor")
        editorWidget = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editorWidget.setSegmentationNode(seg)
        editorWidget.setSourceVolumeNode(reference)
        self._run(_("opening the Segment Editor"), self.workflow.configure_segment_editor,
                  editorWidget.mrmlSegmentEditorNode(), seg)

    # --- 3. tumour tools ------------------------------------------------------------------------

    def onMoveTumour(self) -> None:
        seg = self._segmentation()
        transform = self._run(_("showing the tumour handles"), self.workflow.begin_tumour_transform, seg)
        if transform is not None:
            self._appendLog(_("drag the handles in the views, then press Apply"))

    def onApplyTransform(self) -> None:
        self._edited(self._run(_("moving the tumour"), self.workflow.apply_tumour_transform, self._segmentation()))

    def onCancelTransform(self) -> None:
        self._run(_("cancelling the move"), self.workflow.cancel_tumour_transform, self._segmentation())

    def onAddTumour(self) -> None:
        point = self._pointRas()
        if point is None:
            slicer.util.errorDisplay(_("MedSynth: click a point in the brain first (place the tumour centre)."))
            return
        self._edited(self._run(_("placing the tumour"), self.workflow.add_parametric_tumour, self._segmentation(),
                               point, self._tumourParameters()))

    def onInsertTumour(self) -> None:
        source = _path_text(self._parameterNode.insertSource)
        if not source:
            slicer.util.errorDisplay(_("MedSynth: choose a case folder, a tumour segmentation file or a MedSynth "
                                       "label map to take the tumour from."))
            return
        point = None
        if self._parameterNode.insertAtPoint:
            point = self._pointRas()
            if point is None:
                slicer.util.errorDisplay(_("MedSynth: click a point in the brain first (place the tumour centre)."))
                return
        self._edited(self._run(_("inserting the tumour"), self.workflow.insert_tumour, self._segmentation(), source,
                               point, False, _insert_convention(self._parameterNode.insertLabelConvention)))

    def onRandomTumour(self) -> None:
        self._edited(self._run(_("drawing a random tumour"), self.workflow.random_tumour, self._segmentation(),
                               int(self._parameterNode.randomSeed)))

    def onUndo(self) -> None:
        self._edited(self._run(_("undo"), self.workflow.undo, self._segmentation()))

    def _edited(self, labelmap) -> None:
        """After a successful edit: refresh the preview in the background when one is shown."""
        if labelmap is not None:
            self.previewAfterEdit()

    # --- 4. generate ----------------------------------------------------------------------------

    def onDetectDevices(self) -> None:
        if not self._ensureDependencies(needTorch=True):
            return
        self.ui.deviceInfoLabel.text = _("asking PyTorch ...")
        slicer.app.processEvents()
        info = self._run(_("detecting the GPU"), self.workflow.detect_devices)
        if info is not None:
            self.ui.deviceInfoLabel.text = info.describe()

    def onApplyButton(self) -> None:
        if self._job is not None and self._job.is_running():
            self.onCancel()
            return
        if not self._ensureDependencies(needTorch=True):
            return
        if self.workflow.device_info is None:
            self.onDetectDevices()
        job = self._run(_("starting the synthesis"), self.workflow.start_generate, self._segmentation(),
                        self._options())
        if job is None:
            return
        self._job = job
        self.ui.progressBar.setValue(0)
        self._timer.start()
        self._updateButtons()

    def onCancel(self) -> None:
        job = self._job
        if job is None:
            return
        gone = self.workflow.cancel_generate(job)
        self._endJobUi()
        if not gone:
            slicer.util.warningDisplay(_("MedSynth: some synthesis processes did not stop yet."))

    def _endJobUi(self) -> None:
        self._job = None
        if self._exportJob is None and self._previewJob is None:  # an export or a preview is still polled
            self._timer.stop()
        self._updateButtons()

    def _onPoll(self) -> None:
        if self._exportJob is not None and not self._exportJob.poll():
            job, self._exportJob = self._exportJob, None
            targets = self._run(_("exporting"), self.workflow.finish_export, job)
            if targets:
                slicer.util.infoDisplay(_("MedSynth: exported to") + "\n" + "\n".join(str(t) for t in targets))
        if self._job is not None and not self._job.poll():
            job = self._job
            self._endJobUi()
            try:
                outputs = self.workflow.finish_generate(job)
            except CancelledError as exc:
                self._appendLog(str(exc))
                return
            except Exception as exc:  # noqa: BLE001 - a WorkflowError is the worker's one line; others are logged
                self.ui.progressBar.setValue(0)  # not left at the failed run's last step
                if not isinstance(exc, WorkflowError):
                    logging.exception("MedSynth")
                    exc = f"{type(exc).__name__}: {exc}"
                slicer.util.errorDisplay(_("MedSynth: {reason}").format(reason=exc))
                return
            self._outputs = outputs
            self.onReviewLayout()
        if self._previewJob is not None and not self._previewJob.poll():
            self._finishPreview()
        if self._job is None and self._exportJob is None and self._previewJob is None:
            self._timer.stop()
        self._updateButtons()

    def onPreview(self) -> None:
        """Start a preview in the worker (the panel stays responsive), or stop the running one."""
        if self._previewJob is not None and self._previewJob.is_running():
            self.workflow.cancel_preview(self._previewJob)
            self._previewJob = None
            self.ui.progressBar.setValue(0)
            self._updateButtons()
            return
        if not self._ensureDependencies(needTorch=True):
            return
        self._startPreview()

    def _startPreview(self) -> None:
        job = self._run(_("previewing"), self.workflow.start_preview, self._segmentation(), self._options())
        if job is None:
            return
        self._previewJob = job
        self._timer.start()
        self._updateButtons()

    def previewAfterEdit(self) -> None:
        """After an edit, refresh a preview that is shown or running (only the edited region is rendered again).

        A running preview is superseded: the worker stops it at its next network layer and the
        new one renders both edits.
        """
        running = self._previewJob is not None and self._previewJob.is_running()
        if running or (self._outputs and all(n.GetAttribute("MedSynth.Role") == "preview"
                                             for n in self._outputs.values())):
            self._startPreview()

    def _finishPreview(self) -> None:
        job, self._previewJob = self._previewJob, None
        try:
            outputs = self.workflow.finish_preview(job)
        except CancelledError as exc:
            self._appendLog(str(exc))
            return
        except WorkflowError as exc:
            slicer.util.errorDisplay(_("MedSynth: {reason}").format(reason=exc))
            return
        except Exception as exc:  # noqa: BLE001 - unexpected: one message, the trace in the log
            logging.exception("MedSynth")
            slicer.util.errorDisplay(_("MedSynth: {reason}").format(reason=f"{type(exc).__name__}: {exc}"))
            return
        first = self._outputs != outputs
        self._outputs = outputs
        if first:
            self.onReviewLayout()

    # --- 5. review ---------------------------------------------------------------------------

    def onReviewLayout(self) -> None:
        layoutManager = slicer.app.layoutManager()
        layoutNode = layoutManager.layoutLogic().GetLayoutNode()
        layoutManager.setLayout(self.workflow.register_review_layout(layoutNode))
        slicer.app.processEvents()  # let the layout manager create the four views
        self.onShowSynthetic()

    def _reviewSliceLogics(self) -> dict:
        """The application's slice logic of each review view that exists (by view name)."""
        layoutManager = slicer.app.layoutManager()
        logics = {}
        for name in self.workflow.review_view_names():
            sliceWidget = layoutManager.sliceWidget(name) if layoutManager is not None else None
            if sliceWidget is not None:
                logics[name] = sliceWidget.sliceLogic()
        return logics

    def onShowSynthetic(self) -> None:
        if self._outputs:
            self.workflow.show_in_review_views(self._outputs, self._segmentation(), self._reviewSliceLogics())

    def onShowOriginal(self) -> None:
        seg = self._segmentation()
        if seg is not None:
            self.workflow.show_in_review_views(self.workflow.original_volumes(seg), seg, self._reviewSliceLogics())

    def onSaveReview(self) -> None:
        review = self._run(_("saving the review"), self.workflow.set_review, self._outputs,
                           int(self._parameterNode.rating), self._parameterNode.reviewNote)
        if review:
            self._appendLog(_("review saved: rating {rating}").format(rating=review["rating"]))

    # --- 6. export ----------------------------------------------------------------------------

    def onExport(self) -> None:
        p = self._parameterNode
        job = self._run(_("starting the export"), self.workflow.start_export, self._outputs, p.exportFormat,
                        _path_text(p.exportFolder), p.exportNaming)
        if job is not None:
            self._exportJob = job
            self._timer.start()
            self._updateButtons()


#
# Logic
#


class MedSynthLogic(ScriptedLoadableModuleLogic):
    """The module logic: the parameter node, and the Qt-free ``WorkflowLogic`` on the application's scene."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        from MedSynthSlicerLib.environment import ensure_medsynthlib_importable
        from MedSynthSlicerLib.logic import WorkflowLogic

        try:
            ensure_medsynthlib_importable()
        except ImportError as exc:
            logging.warning(f"MedSynth: {exc}")
        work_dir = os.path.join(slicer.app.temporaryPath, "MedSynth")
        self.workflow = WorkflowLogic(slicer.mrmlScene, work_dir=work_dir)

    def getParameterNode(self) -> MedSynthParameterNode:
        from MedSynthSlicerLib.logic import repair_device_parameter

        node = super().getParameterNode()
        repair_device_parameter(node)  # a scene saved on another platform (CUDA on a Mac); imports: onSceneEndImport
        return MedSynthParameterNode(node)


#
# Test
#


class MedSynthTest(ScriptedLoadableModuleTest):
    """The workflow on the real application: input -> prepare -> edit -> generate -> review -> export.

    Uses a BraTS 2021 case when ``MEDSYNTH_DATA`` (or ``../shared/data`` beside the
    source checkout) holds one, else the healthy template; synthesis uses a tiny
    random-weight model written to a temporary folder (needs PyTorch in Slicer).
    """

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_MedSynthWorkflow()
        self.setUp()
        self.test_MedSynthBadInput()

    def _case_folder(self):
        here = pathlib.Path(__file__).resolve().parent
        roots = [os.environ.get("MEDSYNTH_DATA"), here.parent.parent / "shared" / "data"]
        for root in roots:
            if root and (pathlib.Path(root) / "brats2021" / "cases" / "BraTS2021_00000").is_dir():
                return pathlib.Path(root) / "brats2021" / "cases" / "BraTS2021_00000"
        return None

    @staticmethod
    def _tiny_model(folder: pathlib.Path) -> pathlib.Path:
        from MedSynthLib.schema.labels import MODALITIES
        from MedSynthLib.synthesis.models import write_model
        from MedSynthLib.synthesis.networks import Generator, NetworkConfig

        config = NetworkConfig(channels=(4, 8), strides=(2,), disc_channels=4, disc_layers=2)
        write_model(folder, Generator(config).state_dict(),
                    {"name": "tiny-test", "network": config.to_json(),
                     "intensity": {m: {"low": 0.0, "high": 1000.0} for m in MODALITIES}})
        return folder

    def test_MedSynthWorkflow(self) -> None:
        import numpy as np

        from MedSynthLib.schema.labels import LABEL_INFO, Label
        from MedSynthSlicerLib import mrml
        from MedSynthSlicerLib.logic import WorkflowLogic

        self.delayDisplay("MedSynth workflow")
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="medsynth-test-"))
        logic = WorkflowLogic(slicer.mrmlScene, work_dir=tmp / "work")
        case = self._case_folder()
        if case is not None:
            nodes = logic.load_case(case)
            t1, tumour = nodes["t1"], nodes["tumour"]
            others = {m: nodes[m] for m in ("t1ce", "t2", "flair")}
        else:
            t1, tumour, others = logic.load_template(), None, {}
        before = {n.GetID(): (mrml.array_from_volume(n), mrml.ijk_to_ras(n)) for n in [t1, *others.values()]}

        seg = logic.prepare(t1, tumour, "brats2021", others)
        names = mrml.segment_names(seg)
        self.assertEqual(names, ["CSF", "GM", "WM", "NCR", "ED", "ET"])
        for label in Label:
            if label != Label.BACKGROUND:
                segment = seg.GetSegmentation().GetSegment(LABEL_INFO[label].short_name)
                np.testing.assert_allclose(segment.GetColor(), LABEL_INFO[label].color, atol=1e-6)
        self.delayDisplay("label map prepared")

        labelmap = logic.labelmap(seg)
        brain = np.argwhere(labelmap.array == Label.WM).mean(axis=0)[::-1]
        centre = mrml.ijk_to_ras(t1) @ np.append(brain, 1.0)
        logic.add_parametric_tumour(seg, centre[:3], TumourParameters(radius_mm=12.0, seed=1))
        logic.undo(seg)
        logic.random_tumour(seg, seed=3)
        self.delayDisplay("tumour edited")

        import importlib.util

        if importlib.util.find_spec("torch") is None:
            self.delayDisplay("PyTorch is not installed in Slicer: generate/export not tested")
            return
        model = self._tiny_model(tmp / "tiny")
        outputs = logic.generate(seg, GenerateOptions(model=str(model), device="cpu"))
        for node in outputs.values():
            np.testing.assert_array_equal(mrml.ijk_to_ras(node), mrml.ijk_to_ras(t1))
        for node_id, (array, matrix) in before.items():
            node = slicer.mrmlScene.GetNodeByID(node_id)
            np.testing.assert_array_equal(mrml.array_from_volume(node), array)
            np.testing.assert_array_equal(mrml.ijk_to_ras(node), matrix)
        self.delayDisplay("synthesised")

        layoutManager = slicer.app.layoutManager()
        layoutManager.setLayout(logic.register_review_layout(layoutManager.layoutLogic().GetLayoutNode()))
        slicer.app.processEvents()
        sliceLogics = {name: layoutManager.sliceWidget(name).sliceLogic() for name in logic.review_view_names()}
        self.assertEqual(len(logic.show_in_review_views(outputs, seg, sliceLogics)), 4)
        for name in logic.review_view_names():  # fitted: the slice goes through the volume's centre
            sliceNode = layoutManager.sliceWidget(name).mrmlSliceNode()
            bounds = [0.0] * 6
            outputs["t1"].GetRASBounds(bounds)
            self.assertAlmostEqual(sliceNode.GetSliceOffset(), (bounds[4] + bounds[5]) / 2, delta=1.0)
        logic.set_review(outputs, 4, "test rating")
        targets = logic.export(outputs, "nifti", tmp / "export")
        self.assertTrue((targets[0] / "provenance.json").is_file())
        self.delayDisplay("exported")

        job = logic.start_generate(seg, GenerateOptions(model=str(model), device="cpu"))
        nodes_before = slicer.mrmlScene.GetNumberOfNodes()
        self.assertTrue(logic.cancel_generate(job))
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodes_before)
        self.delayDisplay("cancel works")

    def test_MedSynthBadInput(self) -> None:
        from MedSynthSlicerLib.logic import WorkflowLogic

        logic = WorkflowLogic(slicer.mrmlScene, work_dir=tempfile.mkdtemp(prefix="medsynth-test-"))
        count = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(WorkflowError):
            logic.prepare(None)
        with self.assertRaises(WorkflowError):
            logic.start_generate(None)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)
        self.delayDisplay("bad input refused, scene unchanged")
