"""Insert the tumour of another label map into this brain.

The source label map is passed in by the caller (the CLI and the Slicer module read it);
nothing here reads a file, so an insertion replays from its record and the source alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

import numpy as np

from ..schema.errors import EditError
from ..schema.grid import Grid, LabelMap, ras_to_lps
from ..schema.labels import Label, brain_mask, tumour_mask
from ..schema.provenance import array_sha256
from .base import Edit, composite, flag, healthy_anatomy, refuse_core_outside, register, set_field, vec3
from .geometry import brain_box_lps, check_point, index_affine, tumour_centre
from .transforms import resample_tumour


@register
@dataclass(frozen=True)
class InsertTumour(Edit):
    """Insert the tumour of another label map into this brain.

    The source tumour is resampled into the target grid by physical coordinates.
    Without ``centre_ras_mm`` its centre is placed at the same relative position
    inside the target brain's bounding box as it had inside the source brain's
    (so a tumour of an SRI24-space BraTS case lands at the matching place of an
    MNI template); otherwise at the given RAS point.  The target's own tumour is
    removed first (healthy refill) unless ``keep_existing``.

    Attributes:
        centre_ras_mm: RAS point for the tumour centre, or ``None`` for the
            relative placement.
        keep_existing: keep the target's tumour (the new one is drawn over it).
        source: identifier of the source recorded in the provenance (the key
            :func:`~MedSynthLib.edits.records.replay` looks the source up by; the
            CLI records the source file's name).
        source_labels_sha256: content hash of the source label map
            (:func:`~MedSynthLib.schema.provenance.array_sha256`), or ``None``; when
            given, a source with other content is refused (a replay with the wrong map).
    """

    name: ClassVar[str] = "insert_tumour"
    renamed_params: ClassVar[Mapping[str, str]] = {"center_ras_mm": "centre_ras_mm"}
    centre_ras_mm: tuple[float, float, float] | None = None
    keep_existing: bool = False
    source: str = "external"
    source_labels_sha256: str | None = None

    def __post_init__(self) -> None:
        if self.centre_ras_mm is not None:
            set_field(self, "centre_ras_mm", vec3(self.centre_ras_mm, "centre_ras_mm"))
        set_field(self, "keep_existing", flag(self.keep_existing, "keep_existing"))
        for name in ("source", "source_labels_sha256"):  # str() would turn an edited record's list into a key
            value = getattr(self, name)
            if not (isinstance(value, str) or (value is None and name == "source_labels_sha256")):
                raise EditError(f"insert_tumour {name} must be a string, got {value!r}")

    def params(self) -> dict:
        params = super().params()
        if params["source_labels_sha256"] is None:  # callers that identify the source otherwise
            del params["source_labels_sha256"]
        return params

    def check(self, grid: Grid) -> None:
        if self.centre_ras_mm is not None:
            check_point(self.centre_ras_mm, "insertion centre", grid)

    def placement_lps(self, target: LabelMap, source: LabelMap) -> np.ndarray:
        """Where the source tumour's centre goes in the target, in LPS mm."""
        if self.centre_ras_mm is not None:
            return ras_to_lps(self.centre_ras_mm)
        s_min, s_max = brain_box_lps(source)
        t_min, t_max = brain_box_lps(target)
        extent = np.where(s_max > s_min, s_max - s_min, 1.0)
        relative = (tumour_centre(source) - s_min) / extent
        return t_min + relative * (t_max - t_min)

    def apply(self, labelmap: LabelMap, source: LabelMap | None = None) -> np.ndarray:  # type: ignore[override]
        """Insert ``source``'s tumour into ``labelmap``."""
        if source is None:
            raise EditError(f"insert_tumour needs the source label map {self.source!r}")
        if self.source_labels_sha256 is not None and array_sha256(source.array) != self.source_labels_sha256:
            raise EditError(f"the source label map given for {self.source!r} is not the recorded source "
                            "(its labels_sha256 differs)")
        source_centre = tumour_centre(source)  # raises when the source has no tumour
        shift = self.placement_lps(labelmap, source) - source_centre
        forward = index_affine(source.grid, labelmap.grid, np.eye(3), shift)
        tumour, lost = resample_tumour(source.array, forward, labelmap.array.shape)
        if not tumour.any() and not lost:
            raise EditError("the source tumour is smaller than a voxel of the target grid")
        labels = labelmap.array
        brain = brain_mask(labels)
        try:
            refuse_core_outside(tumour, brain, core_lost_voxels=lost)  # before the costly refill
            base = labels if self.keep_existing else healthy_anatomy(labels, labelmap.grid.spacing)
            out = composite(base, tumour, brain, core_lost_voxels=lost)
        except EditError as exc:
            raise EditError(f"the source tumour cannot fit in the target brain ({exc})") from None
        if not tumour_mask(out).any():
            raise EditError("the source tumour cannot fit in the target brain (no tumour voxel left)")
        return out


def tumour_in_brain(source: LabelMap, brain: np.ndarray) -> LabelMap:
    """``source``'s tumour inside ``brain`` (a mask on its grid) filled with white matter.

    A case's expert segmentation holds its tumour only; with the case's brain (found in its
    scans) it has a relative position, which :meth:`InsertTumour.placement_lps` matches in
    the target brain, as the Slicer module places a case folder's tumour.
    """
    if brain.shape != source.array.shape:
        raise EditError(f"the brain mask ({brain.shape}) is not on the source's grid ({source.array.shape})")
    tumour = tumour_mask(source.array)
    array = np.where(brain | tumour, np.uint8(Label.WM), np.uint8(0))
    array[tumour] = source.array[tumour]
    return LabelMap(array, source.grid, [])
