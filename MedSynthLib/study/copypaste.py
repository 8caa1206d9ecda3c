"""Control C2 of ``medsynth study``: real tumours copy-pasted into other real training brains.

Copy-paste is a strong, GAN-free augmentation: if it helps as much as the synthetic cases,
the gain comes from the new tumour placements, not from the generator.  Each case takes a
real training case (the *host*) and pastes the tumour of another real training case of
the same fold (the *source*):

* placement: the one of the study's ``insert`` edits
  (:class:`~MedSynthLib.edits.InsertTumour`: the source tumour's centre goes to the same
  relative position inside the host's brain box), snapped to whole voxels so that the
  source intensities are copied, never interpolated;
* label map: the host's, with the source tumour drawn over it inside the host brain
  (``InsertTumour(keep_existing=True)``, so the host's own tumour, still in its images,
  stays labelled);
* images: the source's four modalities in the pasted tumour, and in a band of
  ``margin_mm`` around it a linear blend towards the host.  Both cases are z-scored per
  modality inside their own brain (the study's per-case normalisation,
  :func:`~MedSynthLib.study.segmenter.make_seg_case`), which matches the source's
  intensities to the host's.  The band keeps the host's intensities where the host has
  tumour of its own, so no host tumour voxel is relabelled by a blend.

Everything is drawn from the seed; only the fold's training cases are hosts or sources.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from ..edits import InsertTumour
from ..edits.geometry import crop, index_affine, tumour_centre
from ..schema.errors import EditError
from ..schema.grid import LabelMap, lps_to_ras
from ..schema.labels import brain_mask, tumour_mask
from .segmenter import SegCase

#: Width of the blended border around a pasted tumour (mm).
MARGIN_MM = 6.0
#: Sources tried per host before the host is left out (each draw may not fit the host's brain).
MAX_ATTEMPTS = 10


def _shifted(array: np.ndarray, offset_kji: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``array`` moved by a whole-voxel offset onto an array of ``shape`` (0 where nothing lands)."""
    lo = -np.asarray(offset_kji, int)
    if array.ndim == len(shape):
        return crop(array, lo, lo + np.asarray(shape), 0)
    return np.stack([crop(channel, lo, lo + np.asarray(shape), 0) for channel in array])


def paste_tumour(host: SegCase, host_map: LabelMap, source: SegCase, source_map: LabelMap, *,
                 name: str, margin_mm: float = MARGIN_MM) -> tuple[SegCase, dict[str, Any]]:
    """The host with the source's tumour (labels and image intensities) pasted in.

    Raises:
        EditError: the source has no tumour, or its tumour does not fit the host's brain.
    """
    placement = InsertTumour(keep_existing=True, source=source.name).placement_lps(host_map, source_map)
    forward = index_affine(source_map.grid, host_map.grid, np.eye(3), placement - tumour_centre(source_map))
    if not np.allclose(forward[:3, :3], np.eye(3), atol=1e-6):
        raise EditError("copy-paste needs host and source on grids of one spacing and orientation")
    offset = np.round(forward[:3, 3]).astype(int)
    # The placement snapped to whole voxels: the insert edit then moves the labels by exactly ``offset``.
    centre_kji = np.argwhere(tumour_mask(source_map.array)).mean(axis=0) + offset
    snapped = host_map.grid.index_to_lps(centre_kji[::-1])
    edit = InsertTumour(centre_ras_mm=tuple(float(v) for v in lps_to_ras(snapped)), keep_existing=True,
                        source=source.name)
    labels = edit(host_map, source_map).array
    shape = host.labels.shape
    host_brain = brain_mask(host.labels)
    moved_labels = _shifted(np.asarray(source.labels), offset, shape)
    pasted = tumour_mask(moved_labels) & host_brain
    if not pasted.any():
        raise EditError("the pasted tumour lies outside the host brain")
    sampling = np.asarray(host.spacing, float)
    distance = ndimage.distance_transform_edt(~pasted, sampling=sampling)
    weight = np.clip(1.0 - distance / margin_mm, 0.0, 1.0) if margin_mm > 0 else pasted.astype(float)
    band = ~pasted
    weight[band & (tumour_mask(host.labels) | ~brain_mask(moved_labels) | ~host_brain)] = 0.0
    weight[pasted] = 1.0
    moved_images = _shifted(np.asarray(source.images, np.float32), offset, shape)
    host_images = np.asarray(host.images, np.float32)
    w = weight.astype(np.float32)[None]
    images = np.where(w > 0, host_images * (1 - w) + moved_images * w, host_images).astype(np.float32)
    images[:, pasted] = moved_images[:, pasted]  # exactly the source's values inside the tumour
    record = {"name": name, "host": host.name, "source": source.name, "offset_kji": [int(v) for v in offset],
              "pasted_tumour_voxels": int(np.count_nonzero(pasted)),
              "blended_voxels": int(np.count_nonzero((weight > 0) & ~pasted)), "edit": edit.to_record()}
    return SegCase(name, images, labels.astype(np.uint8), host.spacing), record


def make_copy_paste_cases(train: Sequence[tuple[SegCase, LabelMap]], seed: int, *, margin_mm: float = MARGIN_MM
                          ) -> tuple[list[SegCase], list[dict[str, Any]]]:
    """One copy-paste case per training host, its source drawn (seeded) among the other training cases.

    Args:
        train: the fold's real training cases (segmenter arrays and their label maps on the study grid).
        seed: fixes every draw.
        margin_mm: width of the blended border.

    Returns:
        The cases and one record per case (host, source, voxel offset, the insert edit); a host none of
        whose draws fits is left out, and its record says so (``"name": None``).
    """
    sources = [k for k, (case, _) in enumerate(train) if len(case.tumour_voxels)]
    cases: list[SegCase] = []
    records: list[dict[str, Any]] = []
    for h, (host, host_map) in enumerate(train):
        others = [k for k in sources if k != h]
        if not others:
            records.append({"name": None, "host": host.name, "source": None, "notes": ["no other training tumour"]})
            continue
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, h, 3])
        order = [others[i] for i in rng.permutation(len(others))][:MAX_ATTEMPTS]
        notes: list[str] = []
        for k in order:
            source, source_map = train[k]
            try:
                case, record = paste_tumour(host, host_map, source, source_map, name=f"copypaste_{len(cases):04d}",
                                            margin_mm=margin_mm)
            except EditError as exc:
                notes.append(f"{source.name}: {exc}")
                continue
            cases.append(case)
            records.append(dict(record, notes=notes))
            break
        else:
            records.append({"name": None, "host": host.name, "source": None, "notes": notes})
    return cases, records


__all__ = ["MARGIN_MM", "paste_tumour", "make_copy_paste_cases"]
