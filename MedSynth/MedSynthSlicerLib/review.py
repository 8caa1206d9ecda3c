"""The review views: a 2x2 layout of linked T1/T1ce/T2/FLAIR views, tumour outlines, fitted views."""

from __future__ import annotations

from typing import Any, Mapping

from . import mrml
from .mrml import ORIGINAL_REFERENCE
from .parameters import MODALITIES, MODALITY_TITLES

from .label_segmentation import _lib

REVIEW_LAYOUT_ID = 260601
REVIEW_VIEWS = {m: f"MedSynth{MODALITY_TITLES[m]}" for m in MODALITIES}


class ReviewViews:
    """The review layout and views on the scene (a part of ``WorkflowLogic``)."""


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

