"""The MedSynth label schema: the one module every stage imports.

MedSynth describes a brain with tumour as a single 7-class label map::

    0 background   1 CSF   2 GM   3 WM   4 NCR   5 ED   6 ET

stored as ``uint8`` on the case's own grid.  Anatomy (CSF/GM/WM) is derived by
MedSynth (see :mod:`MedSynthLib.cases.anatomy`); tumour classes are copied exactly from
the expert segmentation through one of the explicit conventions below.

Every conversion between a dataset's tumour labels and the schema lives here, as
data, so that a wrong label convention is a visible table entry rather than an
``if`` buried in a reader.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Mapping

import numpy as np

#: Bumped whenever the meaning of a label value changes. Models, label maps
#: written by MedSynth and provenance records carry it.
SCHEMA_VERSION = 1


class Label(enum.IntEnum):
    """Values of the MedSynth 7-class label map."""

    BACKGROUND = 0
    CSF = 1
    GM = 2
    WM = 3
    NCR = 4  #: necrotic / non-enhancing tumour core
    ED = 5  #: peritumoural oedema
    ET = 6  #: enhancing tumour


#: The four MRI contrasts MedSynth synthesises, in channel order (file stems of a case).
MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
#: Display titles of the contrasts (figures, reports, Slicer views).
MODALITY_TITLES: Mapping[str, str] = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "FLAIR"}

NUM_CLASSES = len(Label)
ANATOMY_LABELS: tuple[Label, ...] = (Label.CSF, Label.GM, Label.WM)
TUMOUR_LABELS: tuple[Label, ...] = (Label.NCR, Label.ED, Label.ET)


@dataclass(frozen=True)
class LabelInfo:
    """Display information of one label, shared by the CLI, PNGs and Slicer."""

    value: int
    short_name: str
    name: str
    color: tuple[float, float, float]  # RGB in [0, 1]


#: Anatomy colours follow the FreeSurfer colour table (cortex, white matter,
#: ventricles); tumour colours follow the red/green/yellow used by BraTS viewers.
LABEL_INFO: Mapping[Label, LabelInfo] = {
    Label.BACKGROUND: LabelInfo(0, "BG", "Background", (0.0, 0.0, 0.0)),
    Label.CSF: LabelInfo(1, "CSF", "Cerebrospinal fluid", (120 / 255, 18 / 255, 134 / 255)),
    Label.GM: LabelInfo(2, "GM", "Grey matter", (205 / 255, 62 / 255, 78 / 255)),
    Label.WM: LabelInfo(3, "WM", "White matter", (245 / 255, 245 / 255, 245 / 255)),
    Label.NCR: LabelInfo(4, "NCR", "Necrotic / non-enhancing tumour core", (1.0, 0.0, 0.0)),
    Label.ED: LabelInfo(5, "ED", "Peritumoural oedema", (0.0, 0.85, 0.0)),
    Label.ET: LabelInfo(6, "ET", "Enhancing tumour", (1.0, 0.9, 0.0)),
}


@dataclass(frozen=True)
class TumourConvention:
    """How one dataset family encodes tumour sub-regions in its segmentation.

    Attributes:
        name: identifier used on the command line (``--convention``).
        description: human-readable origin of the convention.
        to_schema: dataset value -> MedSynth :class:`Label` (0 -> background is implicit).
        from_schema: MedSynth tumour label -> dataset value, for export.
    """

    name: str
    description: str
    to_schema: Mapping[int, Label]
    from_schema: Mapping[Label, int]

    @property
    def allowed_values(self) -> frozenset[int]:
        return frozenset({0, *self.to_schema})


#: The explicit tumour-label mappings. BRATS 2015 and MSD distinguish a
#: non-enhancing core from necrosis; MedSynth folds both into NCR exactly as the
#: BraTS 2017+ challenges did (label 1 "NCR/NET").
CONVENTIONS: Mapping[str, TumourConvention] = {
    "brats2021": TumourConvention(
        "brats2021",
        "BraTS 2017-2021: 1 NCR, 2 ED, 4 ET (3 unused)",
        {1: Label.NCR, 2: Label.ED, 4: Label.ET},
        {Label.NCR: 1, Label.ED: 2, Label.ET: 4},
    ),
    "brats2023": TumourConvention(
        "brats2023",
        "BraTS 2023+: 1 NCR, 2 ED, 3 ET",
        {1: Label.NCR, 2: Label.ED, 3: Label.ET},
        {Label.NCR: 1, Label.ED: 2, Label.ET: 3},
    ),
    "msd": TumourConvention(
        "msd",
        "Medical Segmentation Decathlon Task01: 1 oedema, 2 non-enhancing tumour, 3 enhancing tumour",
        {1: Label.ED, 2: Label.NCR, 3: Label.ET},
        {Label.ED: 1, Label.NCR: 2, Label.ET: 3},
    ),
    "brats2015": TumourConvention(
        "brats2015",
        "BRATS 2012-2015 (OT): 1 necrosis, 2 oedema, 3 non-enhancing, 4 enhancing",
        {1: Label.NCR, 2: Label.ED, 3: Label.NCR, 4: Label.ET},
        {Label.NCR: 1, Label.ED: 2, Label.ET: 4},
    ),
}


class LabelValueError(ValueError):
    """A segmentation holds values its convention does not define."""


def tumour_to_schema(seg: np.ndarray, convention: str) -> np.ndarray:
    """Map a dataset tumour segmentation to MedSynth labels.

    Args:
        seg: integer array of dataset tumour labels.
        convention: a key of :data:`CONVENTIONS`.

    Returns:
        ``uint8`` array with values in {0, 4, 5, 6}.

    Raises:
        LabelValueError: if ``seg`` holds a value the convention does not define.
    """
    conv = CONVENTIONS[convention]
    values = np.unique(seg)
    _check_whole_values(values)
    unknown = sorted(int(v) for v in values if int(v) not in conv.allowed_values)
    if unknown:
        raise LabelValueError(
            f"label values {unknown} are not defined by the {conv.name} convention "
            f"(allowed {sorted(conv.allowed_values)})"
        )
    lut = np.zeros(max(conv.allowed_values) + 1, dtype=np.uint8)
    for src, dst in conv.to_schema.items():
        lut[src] = dst
    return lut[seg.astype(np.int64)]


class NonIntegerLabelError(LabelValueError):
    """A segmentation holds fractions or NaN: no convention can name them."""


def _check_whole_values(values: np.ndarray) -> None:
    """Refuse fractional (or NaN) labels by name: ``int()`` would truncate 1.5 to a valid 1 and -0.25 to 0."""
    if values.dtype.kind in "iub":
        return
    fractional = values[~np.isfinite(values) | (values != np.round(values))]
    if fractional.size:
        # Each value as stored (the shortest text that reads back to it): 6 digits showed 1.999998 as a whole "2".
        shown = ", ".join(np.format_float_positional(v, trim="-") for v in fractional[:5]) + (
            ", ..." if fractional.size > 5 else "")
        raise NonIntegerLabelError(f"{fractional.size} non-integer label values ({shown}): a segmentation holds whole "
                              "numbers (resample one with nearest-neighbour interpolation, never linear)")


class AmbiguousConventionError(LabelValueError):
    """A segmentation's values fit two conventions that read its voxels differently."""


#: Conventions tried, in this order, for a segmentation whose convention is not given. BRATS 2012-2015 is
#: only recognised by its values 3 and 4 together: with 3 alone it would read a BraTS 2023 ET as core.
DETECTABLE_CONVENTIONS = ("brats2021", "brats2023", "msd", "brats2015")

#: How much larger the oedema's share of boundary facing healthy brain must be than the core's. On the 46
#: real BraTS maps of the project's data the two shares differ by 0.24 to 0.94 (oedema 0.57-0.96, core
#: 0.00-0.48; the real-data tests read each one in three conventions): a map inside the margin is refused, not
#: guessed.
OEDEMA_MARGIN = 0.10


def detect_tumour_convention(seg: np.ndarray) -> str:
    """The convention of a tumour-only segmentation whose source is not known.

    Its values decide where every convention that allows them reads them alike (``{1, 2, 4}`` is BraTS
    2017-2021, ``{3, 4}`` BRATS 2015). MSD Task01 and BraTS 2023 share ``{1, 2, 3}`` with oedema and core
    swapped; there the oedema is told by the anatomy of a glioma: it surrounds the core, so a larger share of
    its boundary faces the healthy brain (label 0) while the core's faces other tumour.

    Raises:
        LabelValueError: values no convention defines.
        AmbiguousConventionError: the values fit readings that differ and the shape cannot tell them apart.
    """
    values = np.unique(seg)
    _check_whole_values(values)
    present = sorted(int(v) for v in values if v != 0)
    names = [n for n in DETECTABLE_CONVENTIONS
             if set(present) <= CONVENTIONS[n].allowed_values and (n != "brats2015" or {3, 4} <= set(present))]
    if not names:
        raise LabelValueError(f"label values {[v for v in present]} fit no tumour convention "
                              f"({', '.join(f'{n}: {sorted(CONVENTIONS[n].allowed_values)}' for n in CONVENTIONS)})")
    readings = {n: tuple(CONVENTIONS[n].to_schema[v] for v in present) for n in names}
    if len(set(readings.values())) == 1:
        return names[0]
    # The readings left differ only in which of 1 and 2 is the oedema (BraTS 2023 versus MSD).
    if not {1, 2} <= set(present):
        raise AmbiguousConventionError(
            f"label values {present} read differently as {' or '.join(names)} (oedema 2 or 1) and the map has no "
            "oedema and core both to tell them apart: give --label-convention")
    share = {v: _boundary_share_facing_background(seg, v) for v in (1, 2)}
    if abs(share[1] - share[2]) < OEDEMA_MARGIN:
        raise AmbiguousConventionError(
            f"labels 1 and 2 border the healthy brain alike ({share[1]:.2f} and {share[2]:.2f} of their boundaries):"
            f" oedema 2 (BraTS) or 1 (msd) cannot be told; give --label-convention")
    oedema = 1 if share[1] > share[2] else 2
    return next(n for n in names if CONVENTIONS[n].to_schema[oedema] == Label.ED)


def _boundary_share_facing_background(seg: np.ndarray, value: int) -> float:
    """Of the faces between voxels of ``value`` and other values, the share whose neighbour is 0."""
    inside = seg == value
    background = other = 0
    for axis in range(seg.ndim):
        for a, b in ((slice(1, None), slice(None, -1)), (slice(None, -1), slice(1, None))):
            here = [slice(None)] * seg.ndim
            there = [slice(None)] * seg.ndim
            here[axis], there[axis] = a, b
            faces = inside[tuple(here)]
            neighbour = seg[tuple(there)]
            background += int(np.count_nonzero(faces & (neighbour == 0)))
            other += int(np.count_nonzero(faces & (neighbour != 0) & (neighbour != value)))
    return background / max(background + other, 1)


def schema_to_tumour(labels: np.ndarray, convention: str) -> np.ndarray:
    """Map MedSynth labels back to a dataset's tumour labels (anatomy -> 0)."""
    conv = CONVENTIONS[convention]
    lut = np.zeros(NUM_CLASSES, dtype=np.uint8)
    for src, dst in conv.from_schema.items():
        lut[src] = dst
    check_label_map(labels)
    return lut[labels]


def check_label_map(labels: np.ndarray) -> None:
    """Raise :class:`LabelValueError` unless ``labels`` holds only schema values."""
    if labels.dtype.kind == "u" and labels.size and int(labels.max()) < NUM_CLASSES:
        return  # the usual uint8 map: one pass instead of three
    _check_whole_values(labels)
    bad = np.unique(labels[(labels < 0) | (labels >= NUM_CLASSES)])
    if bad.size:
        # An image given as a label map has thousands of values: name a few, not all (one short line).
        shown = ", ".join(str(int(v)) for v in bad[:5]) + (", ..." if bad.size > 5 else "")
        raise LabelValueError(
            f"{bad.size} distinct values outside the MedSynth schema 0-{NUM_CLASSES - 1} "
            f"(min {int(bad.min())}, max {int(bad.max())}: {shown}); not a label map"
            if bad.size > 5 else
            f"label values [{shown}] are outside the MedSynth schema 0-{NUM_CLASSES - 1}"
        )


def check_anatomy(labels: np.ndarray) -> None:
    """Raise :class:`LabelValueError` unless ``labels`` holds white matter (a schema map always does).

    Values 0-6 alone do not make a MedSynth map: a raw BraTS segmentation (0, 1, 2, 4) or a
    0/1 mask passes :func:`check_label_map` and would be read as CSF/GM/NCR silently.
    """
    if not np.any(labels == Label.WM):
        values = ", ".join(str(int(v)) for v in np.unique(labels))
        raise LabelValueError(
            f"not a MedSynth label map: it holds no white matter (label 3; values {values}), a tumour "
            "segmentation or mask? derive a label map with `medsynth labels`"
        )


#: Fewer labelled millilitres than this on a grid that could hold a whole brain is a tumour segmentation, not a
#: brain: an adult brain holds 1000-1800 mL, a BraTS whole tumour 10-300 mL.
MIN_BRAIN_ML = 400.0
#: Only a grid this large is held to :data:`MIN_BRAIN_ML` (a crop around a region may label a part of a brain).
WHOLE_BRAIN_GRID_ML = 1000.0


def check_whole_brain(labels: np.ndarray, voxel_ml: float) -> None:
    """Raise :class:`LabelValueError` when a grid that could hold a whole brain labels less than a brain.

    A BraTS 2023-style segmentation (1 NCR, 2 ED, 3 ET) holds a 3 and passes :func:`check_anatomy`; on the
    BraTS grid (8.9 L) it labels a tumour's 10-300 mL where a MedSynth map labels the whole brain.
    """
    grid_ml = labels.size * voxel_ml
    brain_ml = float(np.count_nonzero(labels)) * voxel_ml
    if grid_ml >= WHOLE_BRAIN_GRID_ML and brain_ml < MIN_BRAIN_ML:
        raise LabelValueError(
            f"not a MedSynth label map: its labels cover {brain_ml:.0f} mL of a {grid_ml:.0f} mL grid, not a whole "
            f"brain (a MedSynth map labels every brain voxel, at least {MIN_BRAIN_ML:.0f} mL), a tumour "
            "segmentation (BraTS 2023 labels 1-3)? derive a label map with `medsynth labels`"
        )


def tumour_mask(labels: np.ndarray) -> np.ndarray:
    """Whole tumour (NCR, ED, ET; BraTS "WT"): the one tumour test of MedSynth (also on torch tensors)."""
    return labels >= Label.NCR


def core_mask(labels: np.ndarray) -> np.ndarray:
    """Tumour core (NCR + ET; BraTS "TC")."""
    return (labels == Label.NCR) | (labels == Label.ET)


def brain_mask(labels: np.ndarray) -> np.ndarray:
    """Brain of a label map: every non-background label, tumour included (also on torch tensors)."""
    return labels > Label.BACKGROUND


def label_counts(labels: np.ndarray) -> dict[str, int]:
    """Voxel count of every schema label, keyed by short name."""
    counts = np.bincount(labels.ravel(), minlength=NUM_CLASSES)
    return {LABEL_INFO[Label(v)].short_name: int(counts[v]) for v in range(NUM_CLASSES)}
