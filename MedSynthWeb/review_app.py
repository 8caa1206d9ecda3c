"""The review page: the four contrasts of a synthetic case beside the real case, rating and note.

Eight axial slice views with one slice offset (moving one moves all) (real above, synthetic below; four when no real case is paired)
with the tumour (NCR, ED, ET) as outlines.  The rating (1-5; 0 = not rated) and the note go into
the case's ``provenance.json`` through :func:`MedSynthLib.schema.review.save_review`, the function
the Slicer module's review uses, so export carries them the same way.  A case whose provenance is shared as it
is (an export, a generated dataset's case) takes a rating only: the note field gives way to the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from MedSynthLib.cases.readers import MODALITIES
from MedSynthLib.evaluation.reader_study import CaseImages, tumour_centre_ras
from MedSynthLib.schema.errors import MedSynthError
from MedSynthLib.schema.review import NOTE_MAX_CHARS, RATING_RANGE, note_refusal, read_provenance, save_review

TITLES = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "FLAIR"}


@dataclass
class ReviewEntry:
    """One row of the case list: a synthetic case, its real source case, or both."""

    name: str
    synthetic: CaseImages | None
    real: CaseImages | None


def view_tag(row: str, modality: str) -> str:
    """The view's id: trame-slicer names state variables after it, so no spaces."""
    return f"{row.lower()}_{modality}"


def view_definition(row: str, modality: str) -> Any:
    from trame_slicer.views import ViewLayoutDefinition, ViewProps, ViewType

    return ViewLayoutDefinition(singleton_tag=view_tag(row, modality), view_type=ViewType.SLICE_VIEW,
                                properties=ViewProps(orientation="Axial", label=f"{row} {TITLES[modality]}"))


class ReviewApp:
    """A trame-slicer page over a list of cases (built by :func:`MedSynthWeb.cli.review_entries`)."""

    def __init__(self, entries: list[ReviewEntry], server: Any = None) -> None:
        from trame.app import get_server
        from trame.widgets import html
        from trame.widgets import vuetify3 as v3
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.rca_view import register_rca_factories
        from trame_slicer.views import Layout, LayoutDirection
        from trame_vuetify.ui.vuetify3 import SinglePageLayout

        from .scene import SceneLoader, SliceOffsetLink
        from .vtk_messages import quiet_vtk

        self.entries = entries
        self.server = server or get_server(None, client_type="vue3")
        self.state, self.ctrl = self.server.state, self.server.controller
        self.slicer = SlicerApp()
        quiet_vtk()  # after SlicerApp, which sends VTK's warnings to stderr; before any view
        register_rca_factories(self.slicer.view_manager, self.server)
        self.loader = SceneLoader(self.slicer)
        self.layouts = LayoutManager(self.slicer.scene, self.slicer.view_manager, self.server)

        def row(name: str) -> Layout:
            return Layout(LayoutDirection.Horizontal,
                          [view_definition(name, m) for m in MODALITIES])

        self.layouts.register_layout_dict({
            "paired": Layout(LayoutDirection.Vertical, [row("Real"), row("Synthetic")]),
            "synthetic": Layout(LayoutDirection.Vertical, [row("Synthetic")]),
            "real": Layout(LayoutDirection.Vertical, [row("Real")]),
        })
        self._nodes: list[Any] = []
        for layout in ("paired", "synthetic", "real"):  # make every view now, so the link holds them all
            self.layouts.create_layout_views_if_needed(layout)
        self._link = SliceOffsetLink([self.slicer.view_manager.get_view(view_tag(row, m))
                                      for row in ("Real", "Synthetic") for m in MODALITIES])

        self.state.update({
            "case_names": [{"title": e.name, "value": i} for i, e in enumerate(entries)],
            "case_index": 0, "rating": 0, "note": "", "status": "", "can_rate": False, "can_note": False,
            "note_off": "", "paired": False, "note_max": NOTE_MAX_CHARS,
        })
        self.state.trame__title = "MedSynth review"
        self.state.change("case_index")(self._on_case)

        with SinglePageLayout(self.server, full_height=True) as self.ui:
            self.ui.title.set_text("MedSynth review")
            with self.ui.toolbar:
                v3.VSpacer()
                v3.VSelect(v_model=("case_index",), items=("case_names",), label="Case", density="compact",
                           hide_details=True, style="max-width: 360px", classes="mx-2", id="case-select")
            with self.ui.content:
                with html.Div(style="display: flex; flex-direction: column; height: 100%;"):
                    with html.Div(classes="d-flex text-subtitle-2", style="flex: 0 0 auto;", id="contrast-titles"):
                        for modality in MODALITIES:
                            html.Div(TITLES[modality], classes="text-center", style="flex: 1 1 0;")
                    with html.Div(style="flex: 1 1 auto; min-height: 0;", id="review-views"):
                        self.layouts.initialize_layout_grid(self.ui)
                    with html.Div(classes="d-flex align-center pa-2", style="gap: 12px; flex: 0 0 auto;",
                                  id="review-form"):
                        html.Span("{{ paired ? 'Top: real case. Bottom: synthetic.' : '' }}",
                                  classes="text-caption")
                        html.Span("Rating", classes="text-body-2")
                        with v3.VBtnToggle(v_model=("rating",), mandatory=True, density="compact",
                                           disabled=("!can_rate",), id="rating"):
                            for value in range(RATING_RANGE[0], RATING_RANGE[1] + 1):
                                v3.VBtn("–" if value == 0 else str(value), value=(value,), id=f"rating-{value}",
                                        title="not rated" if value == 0 else f"rating {value}")
                        v3.VTextField(v_model=("note",), label="Note", density="compact", hide_details=True,
                                      counter=NOTE_MAX_CHARS, disabled=("!can_note",), v_if=("can_note || !note_off",),
                                      id="note")
                        html.Span("{{ note_off }}", v_if=("note_off",), classes="text-caption", id="note-off",
                                  style="max-width: 420px;")
                        v3.VBtn("Save review", color="primary", click=(self.save, "[case_index, rating, note]"), disabled=("!can_rate",),
                                id="save-review")
                        html.Span("{{ status }}", id="status", classes="text-body-2")
        self._on_case(0)

    def _entry(self, case_index: Any) -> ReviewEntry:
        """The entry a page message names: an int index in range (not a bool, a float or a string)."""
        if type(case_index) is not int or not 0 <= case_index < len(self.entries):
            raise MedSynthError(f"no case {case_index!r} (cases 0-{len(self.entries) - 1})")
        return self.entries[case_index]

    def _on_case(self, case_index: Any = 0, **_: Any) -> None:
        from .scene import show

        try:
            entry = self._entry(case_index)
        except MedSynthError as exc:
            self.state.status = f"not shown: {exc}"
            return
        self.loader.remove(self._nodes)
        self._nodes = []
        layout = "paired" if entry.real and entry.synthetic else ("synthetic" if entry.synthetic else "real")
        self.layouts.set_layout(layout)
        for row, case in (("Real", entry.real), ("Synthetic", entry.synthetic)):
            if case is None:
                continue
            centre = tumour_centre_ras(case)
            label = self.loader.tumour_outline(case, f"{row} tumour")
            self._nodes.append(label)
            for modality in MODALITIES:
                volume = self.loader.volume(case.files[modality], view_tag(row, modality))
                self._nodes.append(volume)
                view = self.slicer.view_manager.get_view(view_tag(row, modality))
                show(view, volume, label, centre)
        review, refusal = {}, None
        if entry.synthetic is not None:
            provenance = read_provenance(entry.synthetic.folder)
            review, refusal = provenance.get("review") or {}, note_refusal(provenance)
        with self.state:
            self.state.paired = layout == "paired"
            self.state.can_rate = entry.synthetic is not None
            self.state.can_note = entry.synthetic is not None and refusal is None
            self.state.note_off = f"No note: {refusal}." if refusal else ""
            self.state.rating = int(review.get("rating", 0) or 0)
            self.state.note = review.get("note", "")
            self.state.status = ("" if entry.synthetic is not None
                                 else "a real case: nothing to rate (pass its synthetic case too)")

    def save(self, case_index: int, rating: int, note: str) -> None:
        """Save what the page shows (passed with the click, not read from possibly stale state)."""
        try:
            entry = self._entry(case_index)
            if entry.synthetic is None:
                raise MedSynthError("a real case has no synthetic provenance to rate")
            if note is not None and not isinstance(note, str):
                raise MedSynthError(f"the note must be text, got {type(note).__name__}")
            # Strict: a crafted rating (3.6, True, "abc") is refused by save_review, never rounded or cast.
            review = save_review(entry.synthetic.folder, rating, note or "")
            self.state.status = f"saved: rating {review['rating']} at {review['reviewed_at']}"
        except MedSynthError as exc:
            self.state.status = f"not saved: {exc}"
