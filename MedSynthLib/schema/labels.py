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
    unknown = sorted(int(v) for v in values if int(v) not in conv.allowed_values or v != int(v))
    if unknown:
        raise LabelValueError(
            f"label values {unknown} are not defined by the {conv.name} convention "
            f"(allowed {sorted(conv.allowed_values)})"
        )
    lut = np.zeros(max(conv.allowed_values) + 1, dtype=np.uint8)
    for src, dst in conv.to_schema.items():
        lut[src] = dst
    return lut[seg.astype(np.int64)]


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
    if labels.dtype.kind not in "iu":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise LabelValueError("label map holds non-integer values")
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
