"""The inpainting preview (``InpaintingRoiRenderer``) of a real case without a tumour segmentation nor old labels.

Generate (``plan_region``) then takes the old tumour from the label map's history, where it says it exactly, and
refuses otherwise: the patient's tumour would stay in the images, labelled healthy tissue.  The preview used to
inpaint around the new tumour only, silently, whatever the history said; it now takes the history as Generate does
(its privacy record included, sent with every edit) and refuses with Generate's own one-line reason.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from MedSynthLib.schema.errors import InputError
from MedSynthLib.schema.grid import LabelMap
from MedSynthLib.schema.labelmap import read_label_map
from MedSynthLib.schema.labels import MODALITIES, Label
from MedSynthLib.synthesis.inpainting import inpaint_case, plan_region, read_context
from MedSynthLib.synthesis.preview import PreviewSession, box_slices, changed_box, make_renderer
from test_inpainting import _noseg_case, edited, phantom_cases, tiny_inpainter  # noqa: F401  (fixtures)

MOVE = {"name": "translate", "params": {}, "schema_version": 1}


def _refusal(labelmap: LabelMap, context, **options) -> str:
    with pytest.raises(InputError) as refused:
        plan_region(labelmap, context, **options)
    return str(refused.value)


def _edit(session: PreviewSession, after: LabelMap) -> None:
    """Send an edit as the Slicer worker applies it: the changed region with the records after the edit."""
    box = changed_box(session.labelmap.array, after.array)
    assert box is not None
    session.set_labels(box[0], np.ascontiguousarray(after.array[box_slices(box)]), after.history, after.privacy)


def test_a_map_whose_history_cannot_say_is_refused_as_generate_refuses_it(tiny_inpainter, edited, tmp_path: Path):
    case = _noseg_case(edited, tmp_path)
    moved = read_label_map(edited["moved"])
    nohist = LabelMap(moved.array, moved.grid, [])  # a map copied without its sidecar: where was the tumour?
    context = read_context(case, nohist)
    reason = _refusal(nohist, context)
    assert "no history" in reason
    session = PreviewSession(make_renderer("inpainting", tiny_inpainter, context=str(case)), nohist)
    with pytest.raises(InputError) as refused:
        session.render()
    assert str(refused.value) == reason  # before: rendered, the patient's tumour left in place labelled healthy

    # Rendered while the history said it (the map as derived), refused once an edit leaves it unable to say
    # (two steps, no measured privacy record): the edit is not shown as if it were Generate's output.
    labels = read_label_map(edited["labels"])
    session = PreviewSession(make_renderer("inpainting", tiny_inpainter, context=context), labels)
    assert session.render().full
    unmeasured = LabelMap(moved.array, moved.grid, labels.history + [MOVE])
    _edit(session, unmeasured)
    before = {m: image.copy() for m, image in session.images.items()}
    with pytest.raises(InputError) as refused:
        session.render()
    assert str(refused.value) == _refusal(unmeasured, context)
    assert all(np.array_equal(session.images[m], before[m]) for m in MODALITIES)  # nothing written


def test_a_history_that_says_it_exactly_is_previewed_as_generate_inpaints_it(tiny_inpainter, edited, tmp_path: Path):
    """One measured edit that kept the patient's tumour in place: Generate takes the history as exact (its privacy
    record says so); the preview, sent that record with the edit, renders exactly what Generate writes."""
    case = _noseg_case(edited, tmp_path)
    labels = read_label_map(edited["labels"])
    labels = LabelMap(labels.array, labels.grid, labels.history)
    relabelled = labels.with_array(np.where(labels.array == Label.ET, Label.NCR, labels.array).astype(np.uint8), MOVE)
    assert relabelled.privacy.tumour_dice_to_source == 1.0
    context = read_context(case, labels)
    assert plan_region(relabelled, context).old_tumour == "label-history"
    session = PreviewSession(make_renderer("inpainting", tiny_inpainter, context=context), labels)
    session.render()
    _edit(session, relabelled)
    session.render()
    expected = inpaint_case(tiny_inpainter, relabelled, context)
    for m in MODALITIES:
        assert np.array_equal(session.images[m], expected.images[m].astype(np.float32))


def test_the_slicer_panel_says_these_refusals_in_its_own_terms(edited, tmp_path: Path):
    """The panel sends the map before the edits itself: Generate's refusals must not ask for ``--old-labels``.
    Before: an edit undone read 'the label map equals the label map before the edit: ...', and a map whose history
    cannot say where the tumour was asked to 'give --old-labels'."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "MedSynth"))
    from MedSynthSlicerLib.errors import WorkflowError

    case = _noseg_case(edited, tmp_path)
    labels = read_label_map(edited["labels"])
    context = read_context(case, labels)
    undone = str(WorkflowError(_refusal(labels, context, old_labelmap=labels)))
    assert undone.startswith("nothing was edited: draw, move or erase a tumour first (") and "--" not in undone
    moved = read_label_map(edited["moved"])
    unknown = str(WorkflowError(_refusal(LabelMap(moved.array, moved.grid, []), context)))
    assert "--" not in unknown and unknown.startswith(str(case)) and unknown.endswith(
        "MedSynth does not know this label map as it was before your edits: prepare it again from the case and "
        "redo the edits, or choose Real case > Whole synthetic case"), unknown
