"""Loading MedSynth cases into an MRML scene for the web views (volumes and tumour outlines)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from MedSynthLib.evaluation.reader_study import CaseImages
from MedSynthLib.schema.labels import LABEL_INFO, TUMOUR_LABELS

#: Colours of the tumour outlines (NCR red, ED green, ET yellow): the schema's, as everywhere in MedSynth.
TUMOUR_COLOURS = {int(label): (LABEL_INFO[label].short_name, LABEL_INFO[label].color) for label in TUMOUR_LABELS}
LABEL_VOLUME = 1  # vtkSlicerVolumesLogic option: load as a label map


class SceneLoader:
    """Adds volumes to an MRML scene and removes them again (one case at a time stays in memory)."""

    def __init__(self, slicer_app: Any) -> None:
        from slicer import vtkMRMLColorTableNode, vtkSlicerVolumesLogic

        self.app = slicer_app
        self.logic = vtkSlicerVolumesLogic()
        self.logic.SetMRMLApplicationLogic(slicer_app.app_logic)
        self.logic.SetMRMLScene(slicer_app.scene)
        self._temp = tempfile.TemporaryDirectory(prefix="medsynth-web-")
        colours = vtkMRMLColorTableNode()
        colours.SetTypeToUser()
        colours.SetNumberOfColors(7)
        for value in range(7):
            name, rgb = TUMOUR_COLOURS.get(value, ("", (0.0, 0.0, 0.0)))
            colours.SetColor(value, name or "none", *rgb, 1.0 if name else 0.0)
            colours.SetColorDefined(value, bool(name))
        colours.SetName("MedSynth tumour")
        slicer_app.scene.AddNode(colours)
        self.colour_id = colours.GetID()
        self._count = 0

    def volume(self, path: Path, name: str) -> Any:
        node = self.logic.AddArchetypeVolume(str(path), name, 0)
        if node is None:
            raise RuntimeError(f"{path}: the MRML volume reader could not read it")
        return node

    def tumour_outline(self, case: CaseImages, name: str) -> Any | None:
        """The case's tumour labels (NCR, ED, ET; anatomy left out) as a label-map node, or None."""
        if case.tumour is None or not case.tumour.any():
            return None
        reference = sitk.ReadImage(str(case.labels or case.files["t1"]))
        image = sitk.GetImageFromArray(case.tumour.astype(np.uint8))
        image.CopyInformation(reference)
        self._count += 1
        path = Path(self._temp.name) / f"tumour{self._count}.nii.gz"
        sitk.WriteImage(image, str(path))
        node = self.logic.AddArchetypeVolume(str(path), name, LABEL_VOLUME)
        path.unlink(missing_ok=True)
        if node is None:
            return None
        node.GetDisplayNode().SetAndObserveColorNodeID(self.colour_id)
        return node

    def remove(self, nodes: list[Any]) -> None:
        for node in nodes:
            if node is not None and self.app.scene.IsNodePresent(node):
                self.app.scene.RemoveNode(node)


def show(view: Any, volume: Any, label: Any | None = None, offset_ras: list[float] | None = None) -> None:
    """Put a volume (and its tumour outline) in a slice view, fitted, at the given RAS point."""
    logic = view._logic  # trame-slicer keeps the MRML slice logic private; it exposes no composite node
    composite = logic.GetSliceCompositeNode()
    composite.SetBackgroundVolumeID(volume.GetID() if volume is not None else None)
    composite.SetLabelVolumeID(label.GetID() if label is not None else None)
    composite.SetLabelOpacity(1.0)
    logic.GetSliceNode().SetUseLabelOutline(True)
    view.fit_view_to_content()
    if offset_ras is not None:
        logic.GetSliceNode().JumpSliceByOffsetting(*offset_ras)
    view.schedule_render()


class SliceOffsetLink:
    """Keeps the slice offset of several slice views equal: moving one moves the others.

    The Slicer application links views through its slice-link logic, which the Slicer libraries
    alone (trame-slicer's ``SlicerApp``) do not create; this does the part the review needs.
    """

    def __init__(self, views: list[Any]) -> None:
        from vtkmodules.vtkCommonCore import vtkCommand

        self.nodes = [view._logic.GetSliceNode() for view in views]
        self._updating = False
        for node in self.nodes:
            node.AddObserver(vtkCommand.ModifiedEvent, self._on_modified)

    def _on_modified(self, node: Any, _event: str) -> None:
        if self._updating:
            return
        self._updating = True
        try:
            offset = node.GetSliceOffset()
            for other in self.nodes:
                if other is not node and abs(other.GetSliceOffset() - offset) > 1e-6:
                    other.SetSliceOffset(offset)
        finally:
            self._updating = False
