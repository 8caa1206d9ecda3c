"""The blinded reader-study page: one slice through the tumour at a time, "real or synthetic?".

The page receives only the item id (``item-007``), its position and the rendered slice; the case,
its folder and the truth stay on the server in the study plan.  The volume node is always named
"study image", and no outline is drawn (the label maps would not give the answer away, but the
reader should judge the image alone).
"""

from __future__ import annotations

from typing import Any

from MedSynthLib.evaluation.reader_study import CONFIDENCES, ReaderStudy, write_summary
from MedSynthLib.schema.errors import MedSynthError

CONFIDENCE_LABELS = {1: "guessing", 2: "fairly sure", 3: "certain"}
VIEW_TAG = "Study"


def _no_view_gutter(*_: Any) -> None:
    """The study view's gutter: nothing (see :class:`StudyApp`)."""


class StudyApp:
    """A trame-slicer page over a :class:`~MedSynthLib.evaluation.reader_study.ReaderStudy`."""

    def __init__(self, study: ReaderStudy, server: Any = None) -> None:
        from trame.app import get_server
        from trame.widgets import html
        from trame.widgets import vuetify3 as v3
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.rca_view import register_rca_factories
        from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition
        from trame_vuetify.ui.vuetify3 import SinglePageLayout

        from .scene import SceneLoader
        from .vtk_messages import quiet_vtk

        self.study = study
        self.server = server or get_server(None, client_type="vue3")
        self.state = self.server.state
        self.slicer = SlicerApp()
        quiet_vtk()  # after SlicerApp, which sends VTK's warnings to stderr; before any view
        # No view gutter: its slice slider would put the slice position, the grid's slice range and
        # its spacing into the page's state, which the reader can read; the reader judges the image.
        register_rca_factories(self.slicer.view_manager, self.server, slice_view_ui_f=_no_view_gutter)
        self.loader = SceneLoader(self.slicer)
        self.layouts = LayoutManager(self.slicer.scene, self.slicer.view_manager, self.server)
        self.layouts.register_layout_dict({
            "study": Layout(LayoutDirection.Vertical, [ViewLayoutDefinition.slice_view("Axial", label=VIEW_TAG)])})
        self.layouts.set_layout("study")
        self._nodes: list[Any] = []
        self._current = None
        self.state.update({"item_id": "", "position": 0, "total": len(study.items), "answer": None,
                           "confidence": None, "done": False, "status": ""})
        self.state.trame__title = "MedSynth reader study"

        with SinglePageLayout(self.server, full_height=True) as self.ui:
            self.ui.title.set_text("MedSynth reader study: real or synthetic?")
            with self.ui.toolbar:
                v3.VSpacer()
                html.Span("{{ done ? 'complete' : item_id + ' (' + position + ' of ' + total + ')' }}",
                          id="progress", classes="mx-4")
            with self.ui.content:
                with html.Div(style="display: flex; flex-direction: column; height: 100%;"):
                    with html.Div(style="flex: 1 1 auto; min-height: 0;", id="study-view", v_show="!done"):
                        self.layouts.initialize_layout_grid(self.ui)
                    html.Div("The study is complete: thank you. The results are saved.", v_show="done",
                             id="study-done", classes="text-h6 pa-6")
                    with html.Div(classes="d-flex align-center pa-2", style="gap: 12px; flex: 0 0 auto;",
                                  v_show="!done", id="study-form"):
                        html.Span("This image is", classes="text-body-2")
                        with v3.VBtnToggle(v_model=("answer",), density="compact", id="answer"):
                            v3.VBtn("real", value="real", id="answer-real")
                            v3.VBtn("synthetic", value="synthetic", id="answer-synthetic")
                        html.Span("Confidence", classes="text-body-2")
                        with v3.VBtnToggle(v_model=("confidence",), density="compact", id="confidence"):
                            for level in CONFIDENCES:
                                v3.VBtn(CONFIDENCE_LABELS[level], value=(level,), id=f"confidence-{level}")
                        # The answer travels with the click: the server never acts on a state update
                        # that may still be in flight.
                        v3.VBtn("Next", color="primary", click=(self.submit, "[item_id, answer, confidence]"), id="submit",
                                disabled=("!answer || !confidence",))
                        html.Span("{{ status }}", id="status", classes="text-body-2")
        self._show_next()

    def _show_next(self) -> None:
        from .scene import show

        self.loader.remove(self._nodes)
        self._nodes = []
        item = self.study.next_item()
        self._current = item
        with self.state:
            self.state.answer = None
            self.state.confidence = None
            # Pushed even where the server still holds no answer: the page's update for the answer
            # just given can arrive after the Next click, and a selection left on the page would
            # carry over to the next item (a second click on it toggles it off).
            self.state.dirty("answer", "confidence")
            if item is None:
                self.state.done = True
                self.state.item_id = ""
                write_summary(self.study.folder)
                return
            try:
                volume = self.loader.volume(item.image, "study image")
            except Exception as exc:  # noqa: BLE001 - the file went away while serving: say so on the page
                self.state.status = (f"cannot show {item.item_id}: its image cannot be read ({type(exc).__name__}); "
                                     "stop the server and check the study's cases")
                return
            self._nodes.append(volume)
            show(self.slicer.view_manager.get_view(VIEW_TAG), volume, None, item.centre_ras)
            self.state.item_id = item.item_id
            self.state.position = len(self.study.answered()) + 1

    def submit(self, item_id: Any, answer: Any, confidence: Any) -> None:
        """Record the answer the click carries; anything else than the page's own values gets a status line."""
        if self._current is None or item_id != self._current.item_id:
            return  # a second click on an item already answered
        try:
            # Strict: a crafted message (2.7, True, "abc") is refused, never rounded or cast.
            self.study.answer(item_id, answer, confidence)
        except MedSynthError as exc:
            self.state.status = f"not saved: {exc}"
            return
        self.state.status = f"saved {self._current.item_id}"
        self._show_next()
