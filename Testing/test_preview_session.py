"""The interactive preview of MedSynthLib (``synthesis/preview.py``) on a real BraTS case.

A real BraTS 2021 case (its tumour segmentation, its brain mask as white matter, cropped
around the tumour to keep the test fast) is previewed with a small random-weight model;
the tumour is moved, only the changed region of the label map goes in, only the
re-rendered region comes out.  Asserted: the preview after a move equals a full
synthesis of the moved map where the labels changed (within float tolerance) and the
engine's own ``rerender`` everywhere (bit for bit), and is unchanged outside the
returned box; a render stopped between network layers leaves the images as they were
and its region is rendered with the next edit (supersession), bit for bit as if the
two edits had come together; bad regions are refused in one line; the renderer is
pluggable by name.  No wall-clock limits here (see ``benchmarks/bench_preview.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from MedSynthLib.edits import Translate
from MedSynthLib.schema.errors import MedSynthError
from MedSynthLib.schema.grid import Grid, LabelMap
from MedSynthLib.schema.labels import Label, tumour_to_schema
from MedSynthLib.synthesis import preview as preview_module
from MedSynthLib.synthesis.inference import brain_box
from MedSynthLib.synthesis.models import resolve_model, write_model
from MedSynthLib.synthesis.networks import Generator, NetworkConfig
from MedSynthLib.synthesis.preview import (EMPTY_BOX, PREVIEW_RENDERERS, PreviewSession, box_slices, box_union,
                                           changed_box, interruptible, make_renderer)
from MedSynthLib.synthesis.synthesize import SynthesisEngine

NETWORK = NetworkConfig(channels=(4, 8, 8), strides=(2, 2), disc_channels=4, disc_layers=2)
MARGIN = 8


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> SynthesisEngine:
    import torch

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model") / "small"
    write_model(folder, Generator(NETWORK).state_dict(),
                {"name": "small", "network": NETWORK.to_json(),
                 "intensity": {m: {"low": 0.0, "high": 1000.0} for m in ("t1", "t1ce", "t2", "flair")}})
    return SynthesisEngine(resolve_model(str(folder)), "cpu", "fp32")


@pytest.fixture(scope="module")
def real_labelmap(brats_cases) -> LabelMap:
    """A real case's tumour in its own brain (the brain mask as WM), cropped around the tumour."""
    folder = brats_cases[0]
    t1 = sitk.GetArrayFromImage(sitk.ReadImage(str(next(folder.glob("*_t1.nii.gz")))))
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(next(folder.glob("*_seg.nii.gz")))))
    labels = np.where(t1 > 0, Label.WM, Label.BACKGROUND).astype(np.uint8)
    tumour = tumour_to_schema(seg, "brats2021")
    labels[tumour > 0] = tumour[tumour > 0]
    centre = np.argwhere(tumour > 0).mean(axis=0).astype(int)
    half = np.array([40, 48, 48])
    lo = np.clip(centre - half, 0, np.array(labels.shape) - 2 * half)
    crop = labels[tuple(slice(int(a), int(a + 2 * h)) for a, h in zip(lo, half))]
    shape = crop.shape
    return LabelMap(np.ascontiguousarray(crop), Grid(shape[::-1], (1.0, 1.0, 1.0), (0.0, 0.0, 0.0),
                                                    (1, 0, 0, 0, 1, 0, 0, 0, 1)))


def send_edit(session: PreviewSession, before: np.ndarray, after: np.ndarray):
    """What the Slicer module sends: the region that changed, at its start."""
    box = changed_box(before, after)
    assert box is not None
    return session.set_labels(box[0], np.ascontiguousarray(after[box_slices(box)]))


def test_changed_box_and_union():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 7, (20, 22, 24)).astype(np.uint8)
    assert changed_box(a, a.copy()) is None
    b = a.copy()
    b[3, 5:9, 2] = 7 - b[3, 5:9, 2] % 7
    b[11, 6, 20] = (b[11, 6, 20] + 1) % 7
    idx = np.argwhere(a != b)
    assert changed_box(a, b) == (tuple(idx.min(0)), tuple(idx.max(0) + 1))
    assert changed_box(a[2:], b[2:], (2, 0, 0)) == changed_box(a, b)
    assert box_union(None, ((1, 2, 3), (4, 5, 6))) == ((1, 2, 3), (4, 5, 6))
    assert box_union(((1, 2, 3), (4, 5, 6)), ((0, 4, 4), (2, 9, 5))) == ((0, 2, 3), (4, 9, 6))


@pytest.mark.realdata
def test_roi_update_equals_a_full_render_inside_and_nothing_changes_outside(engine, real_labelmap):
    session = PreviewSession(make_renderer("synthesis", engine, margin=MARGIN), real_labelmap)
    first = session.render()
    assert first.full and first.box == ((0, 0, 0), real_labelmap.array.shape)
    whole = engine.synthesize(real_labelmap)
    for modality, image in whole.images.items():  # the first render is the full synthesis
        np.testing.assert_array_equal(session.images[modality], image)
    before = {m: image.copy() for m, image in session.images.items()}

    moved = Translate((6.0, -4.0, 3.0))(real_labelmap)
    changed = send_edit(session, real_labelmap.array, moved.array)
    update = session.render()
    assert not update.full and session.pending is None
    box = box_slices(update.box)
    # the box holds every changed voxel, and only the box came back
    assert all(b0 <= c0 and c1 <= b1 for b0, b1, c0, c1 in zip(*update.box, *changed))
    assert update.regions["t1"].shape == tuple(b - a for a, b in zip(*update.box))
    assert update.regions["t1"].size < moved.array.size
    outside = np.ones(moved.array.shape, bool)
    outside[box] = False
    full = engine.synthesize(moved)
    mask = moved.array != real_labelmap.array
    reference = engine.rerender(whole, moved, margin=MARGIN)
    for modality in whole.images:
        after = session.images[modality]
        np.testing.assert_array_equal(after[outside], before[modality][outside])  # unchanged outside
        np.testing.assert_array_equal(update.regions[modality], after[box])
        np.testing.assert_array_equal(after, reference.images[modality])  # the engine's one ROI function
        # where the labels changed: a full synthesis of the moved map (scanner units, range 0-1000; the
        # network's receptive field reaches a little past the 8-voxel margin: 0.13 measured)
        assert float(np.abs(after - full.images[modality])[mask].max()) < 0.5, modality
        # elsewhere in the box the feathered edge blends two valid outputs
        assert float(np.abs(after - full.images[modality])[box].max()) < 250.0, modality
    assert np.all(session.images["t1"][moved.array == Label.BACKGROUND] == 0)

    # an edit that changes nothing renders nothing
    same = session.set_labels((0, 0, 0), moved.array[:4, :4, :4].copy())
    assert same is None and session.render().box == EMPTY_BOX
    # brain painted outside the brain box moves the network's lattice: the whole case is rendered again
    grown = moved.array.copy()
    brain = brain_box(grown)
    grown[tuple(max(s.start - 1, 0) for s in brain)] = Label.WM  # a corner just outside (or on) the brain box
    assert brain_box(grown) != brain  # this crop's brain does not reach every face
    send_edit(session, moved.array, grown)
    assert session.render().full
    whole = engine.synthesize(LabelMap(grown, moved.grid))
    np.testing.assert_array_equal(session.images["t2"], whole.images["t2"])


@pytest.mark.realdata
def test_an_roi_update_of_a_map_stored_in_another_axis_order_equals_the_engines_rerender(engine, real_labelmap):
    """A sagittal-first (PIR) map: the update runs in the network's axis order even when the engine synthesised a
    map stored otherwise between the preview's first render and the edit (one engine serves every job)."""
    image = sitk.DICOMOrient(real_labelmap.image(), "PIR")
    stored = LabelMap(sitk.GetArrayFromImage(image), Grid.from_image(image))
    session = PreviewSession(make_renderer("synthesis", engine, margin=MARGIN), stored)
    session.render()
    whole = engine.synthesize(stored)
    engine.synthesize(real_labelmap)  # another job on the same engine, stored LPS
    moved = Translate((6.0, -4.0, 3.0))(stored)
    send_edit(session, stored.array, moved.array)
    assert not session.render().full
    reference = engine.rerender(whole, moved, margin=MARGIN)
    for modality, image in reference.images.items():
        np.testing.assert_array_equal(session.images[modality], image)


@pytest.mark.realdata
def test_a_stopped_render_is_superseded_by_the_next_edit(engine, real_labelmap):
    session = PreviewSession(make_renderer("synthesis", engine, margin=MARGIN), real_labelmap)
    session.render()
    start = {m: image.copy() for m, image in session.images.items()}
    first = Translate((5.0, 0.0, 0.0))(real_labelmap)
    second = Translate((0.0, 6.0, 2.0))(first)
    send_edit(session, real_labelmap.array, first.array)
    layers = []

    def stop_after_three_layers():
        layers.append(1)
        if len(layers) > 3:
            raise preview_module.PreviewCancelled("a newer edit")

    with pytest.raises(preview_module.PreviewCancelled):
        session.render(stop_after_three_layers)
    assert len(layers) == 4  # stopped inside the network, between layers
    for modality, image in start.items():  # nothing half-written
        np.testing.assert_array_equal(session.images[modality], image)
    assert session.pending is not None
    send_edit(session, first.array, second.array)
    update = session.render()
    # one render covers both edits: the same as if they had come as one
    together = PreviewSession(make_renderer("synthesis", engine, margin=MARGIN), real_labelmap)
    together.render()
    send_edit(together, real_labelmap.array, second.array)
    reference = together.render()
    assert update.box == reference.box
    for modality in start:
        np.testing.assert_array_equal(session.images[modality], together.images[modality])
    both = (first.array != real_labelmap.array) | (second.array != first.array)
    inside = np.zeros(both.shape, bool)
    inside[box_slices(update.box)] = True
    assert np.all(inside[both])
    assert session.version == 2 and np.array_equal(session.labelmap.array, second.array)


def test_interruptible_removes_its_hooks():
    import torch

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    calls = []
    with interruptible(net, lambda: calls.append(1)):
        net(torch.zeros(1, 2))
    assert len(calls) == 3  # the container and its two layers
    net(torch.zeros(1, 2))
    assert len(calls) == 3


def test_bad_label_regions_are_refused_in_one_line(engine):
    array = np.zeros((16, 16, 16), np.uint8)
    array[2:14, 2:14, 2:14] = Label.WM
    session = PreviewSession(make_renderer("synthesis", engine, margin=MARGIN),
                             LabelMap(array, Grid((16, 16, 16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0),
                                                  (1, 0, 0, 0, 1, 0, 0, 0, 1))))
    with pytest.raises(MedSynthError, match="does not fit the grid") as error:
        session.set_labels((10, 0, 0), np.zeros((8, 4, 4), np.uint8))
    assert "\n" not in str(error.value)
    with pytest.raises(MedSynthError, match="outside the MedSynth schema"):
        session.set_labels((0, 0, 0), np.full((2, 2, 2), 9, np.uint8))
    assert session.version == 0 and session.pending is None
    with pytest.raises(MedSynthError, match="unknown preview renderer 'inpaint'"):
        make_renderer("inpaint", engine)


def test_the_renderer_is_pluggable(monkeypatch):
    """Another renderer (e.g. inpainting into the real images) plugs in by name; the session is the same."""

    class TumourBrightness:
        def __init__(self, engine, **options):
            self.images = {}

        def full(self, labelmap, check=None):
            self.images = {"t1": labelmap.array.astype(np.float32) * 100}

        def roi(self, labelmap, changed, check=None):
            box = box_slices(changed)
            self.images["t1"][box] = labelmap.array[box].astype(np.float32) * 100
            return changed

    monkeypatch.setitem(PREVIEW_RENDERERS, "brightness", TumourBrightness)
    array = np.full((8, 8, 8), Label.WM, np.uint8)
    labelmap = LabelMap(array, Grid((8, 8, 8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    session = PreviewSession(make_renderer("brightness", None), labelmap)
    session.render()
    session.set_labels((2, 3, 4), np.full((1, 2, 1), Label.ED, np.uint8))
    update = session.render()
    assert update.box == ((2, 3, 4), (3, 5, 5))
    np.testing.assert_array_equal(update.regions["t1"], np.full((1, 2, 1), 500.0, np.float32))
    assert session.images["t1"][0, 0, 0] == 300.0


def test_bf16_weights_give_the_autocast_output_bit_for_bit(engine):
    """The engine holds a U-Net's weights in bf16 on the CPU; the images are those of autocast alone."""
    import torch

    from MedSynthLib.synthesis.inference import Synthesizer
    from MedSynthLib.synthesis.models import load_generator

    bf16 = SynthesisEngine(engine.model, "cpu", "bf16")
    assert next(bf16.synth.generator.parameters()).dtype == torch.bfloat16
    autocast = Synthesizer(load_generator(engine.model, "cpu"), bf16.network, torch.device("cpu"), "bf16",
                           mirror_average=bf16.synth.mirror_average)
    assert next(autocast.generator.parameters()).dtype == torch.float32
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 7, (24, 28, 20)).astype(np.uint8)
    box = (slice(2, 22), slice(4, 28), slice(0, 16))
    np.testing.assert_array_equal(bf16.synth.predict_region(labels, box), autocast.predict_region(labels, box))
