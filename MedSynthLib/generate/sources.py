"""Where generated cases come from: real cases, tumour-only label maps and the healthy template.

Real case folders get their anatomy derived once (the default anatomy model of
:mod:`MedSynthLib.cases.anatomy`) and cached as ``.npy`` under a key made of the anatomy
model's settings, the label schema and the bytes of every input file, so a changed file or
anatomy model never reuses a stale label map.  Tumour label maps without images (BraTS
``*_seg`` files) can only be inserted into a brain.  Sources are read under content hashes;
a dataset records them under keyed ids (:func:`with_dataset_ids`), never a path, a case name
or a hash that the source files give.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..schema.errors import InputError
from ..schema.grid import BRAIN_CROP_MARGIN, Grid, LabelMap, crop_to_brain
from ..schema.labels import SCHEMA_VERSION, Label
from ..schema.provenance import PrivacyRecord

#: Bump when the cached arrays change meaning (3: the anatomy of a case not stored LPS is derived in LPS order).
CACHE_VERSION = 3
TEMPLATE_ID = "template"
#: Brains are stored and edited cropped to their bounding box grown by this many voxels (a BraTS
#: volume shrinks about 2.5x, and every edit with it); at least the synthesis engine's brain-box
#: margin (4), so the network sees exactly what it would on the whole volume.
CROP_MARGIN = BRAIN_CROP_MARGIN  # in the cache files' names


@dataclass(frozen=True)
class Source:
    """One label map to draw from.

    Attributes:
        source_id: ``sha256:<16 hex>`` of the source's files as read; in a dataset, the keyed id
            :func:`with_dataset_ids` gives (never a path or a name).
        kind: ``case`` (a real brain with its tumour), ``tumour`` (tumour labels only) or
            ``template`` (the healthy canvas).
        cache_file: ``.npy`` of the label array (absent for the template).
        grid: the label map's grid as JSON.
        tumour_sha256: content hash of the tumour-only array (labels >= NCR kept), which
            recognises the same patient's tumour arriving from two folders.
        stats: tumour statistics (see :func:`tumour_stats`).
        full_grid: the grid of the source's files when ``grid`` is a crop of it (brains).
        offset: the crop's first voxel (k, j, i) in ``full_grid``.
        sort_key: what the draw orders the sources by (the content hash under a keyed id, so the
            cases drawn do not depend on the key); never written into a dataset.
    """

    source_id: str
    kind: str
    cache_file: str | None
    grid: dict[str, Any]
    tumour_sha256: str | None
    stats: dict[str, Any] | None
    full_grid: dict[str, Any] | None = None
    offset: tuple[int, int, int] | None = None
    sort_key: str | None = None

    @property
    def has_brain(self) -> bool:
        return self.kind in ("case", "template")

    @property
    def has_tumour(self) -> bool:
        return self.kind in ("case", "tumour") and bool(self.stats and self.stats["voxels"]["WT"])

    @property
    def is_patient(self) -> bool:
        return self.kind in ("case", "tumour")

    @property
    def output_grid(self) -> dict[str, Any]:
        """The grid a case drawn on this source is written on (the files' own)."""
        return self.full_grid or self.grid

    def to_full(self, array: np.ndarray) -> np.ndarray:
        """An array on this source's (cropped) grid placed into its full grid (0 elsewhere)."""
        if self.full_grid is None or self.offset is None:
            return array
        full = np.zeros(Grid.from_json(self.full_grid).shape, array.dtype)
        full[tuple(slice(o, o + n) for o, n in zip(self.offset, array.shape))] = array
        return full

    def to_json(self) -> dict[str, Any]:
        return {"source_id": self.source_id, "kind": self.kind, "cache_file": self.cache_file, "grid": self.grid,
                "tumour_sha256": self.tumour_sha256, "stats": self.stats, "full_grid": self.full_grid,
                "offset": None if self.offset is None else list(self.offset), "sort_key": self.sort_key}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Source":
        data = dict(data)
        if data.get("offset") is not None:
            data["offset"] = tuple(int(v) for v in data["offset"])
        return cls(**data)


def with_dataset_ids(sources: Sequence[Source], key: Any) -> list[Source]:
    """The sources under the ids a dataset records: each patient source's content hash keyed with ``key``
    (:class:`~.keys.SourceKey`), which anyone holding the source files could compute otherwise; the template
    keeps its name."""
    return [dataclasses.replace(s, source_id=key.source_id(s.sort_key or s.source_id),
                                sort_key=s.sort_key or s.source_id) if s.is_patient else s for s in sources]


def grid_from_json(data: dict[str, Any]) -> Grid:
    return Grid.from_json(data)


def _anatomy_key(files: Sequence[Path]) -> str:
    from ..cases.anatomy import DEFAULT_ANATOMY_MODEL

    digest = hashlib.sha256(f"generate-cache{CACHE_VERSION}-schema{SCHEMA_VERSION}".encode())
    digest.update(json.dumps(DEFAULT_ANATOMY_MODEL.to_json(), sort_keys=True).encode())
    for path in files:
        digest.update(b"\0file\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _files_sha(files: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(b"\0file\0")
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def tumour_stats(labels: np.ndarray, grid: Grid, brain: np.ndarray | None = None) -> dict[str, Any]:
    """Size (voxels, ml), sub-region fractions and location of the tumour of a label array.

    The location is the tumour centre's relative position (0..1 per RAS axis) inside the
    brain's bounding box (``brain`` given) and its RAS centre in mm.
    """
    from ..schema.grid import lps_to_ras

    counts = np.bincount(labels.ravel(), minlength=7)
    ncr, ed, et = (int(counts[v]) for v in (Label.NCR, Label.ED, Label.ET))
    wt = ncr + ed + et
    ml = grid.voxel_volume_mm3 / 1000.0
    out: dict[str, Any] = {"voxels": {"NCR": ncr, "ED": ed, "ET": et, "WT": wt},
                           "volume_ml": {"WT": round(wt * ml, 3), "TC": round((ncr + et) * ml, 3),
                                         "ET": round(et * ml, 3)},
                           "fractions": {k: (round(v / wt, 4) if wt else None) for k, v in
                                         (("NCR", ncr), ("ED", ed), ("ET", et))},
                           "centre_ras_mm": None, "relative_location": None}
    if wt:
        from ..schema.grid import mask_box

        idx = np.argwhere(labels >= Label.NCR).mean(axis=0)  # (k, j, i)
        centre_lps = grid.index_to_lps(idx[::-1])
        out["centre_ras_mm"] = [round(float(v), 2) for v in lps_to_ras(centre_lps)]
        if brain is not None and brain.any():
            box = mask_box(brain)
            first = np.array([b.start for b in box], float)
            last = np.array([b.stop - 1 for b in box], float)
            corners = np.array([grid.index_to_lps(c[::-1]) for c in (first, last)])
            lo_ras, hi_ras = np.sort(np.array([lps_to_ras(c) for c in corners]), axis=0)
            extent = np.where(hi_ras > lo_ras, hi_ras - lo_ras, 1.0)
            out["relative_location"] = [round(float(v), 4) for v in (lps_to_ras(centre_lps) - lo_ras) / extent]
    return out


def find_sources(folders: Sequence[str | os.PathLike[str]]) -> tuple[list[Path], list[Path]]:
    """Split ``--labels-from`` folders into real case folders and tumour label-map files.

    A folder holding case folders (BraTS, MSD, BRATS 2015 naming) gives cases; otherwise
    its image files are read as tumour label maps.
    """
    from ..schema.volume_io import is_image_file
    from ..training.data import find_case_folders

    cases: list[Path] = []
    tumours: list[Path] = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(folder, "--labels-from: no such folder")
        try:
            cases.extend(find_case_folders(folder))
        except InputError:
            found = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))
            if not found:
                raise InputError(folder, "--labels-from: neither case folders nor label-map images here") from None
            tumours.extend(found)
    return cases, tumours


def prepare_case(folder: Path, cache_dir: Path) -> Source:
    """Derive (or read from the cache) a real case's label map; its tumour statistics."""
    from ..cases.anatomy import derive_label_map
    from ..cases.readers import read_case
    from ..schema.provenance import array_sha256

    case = read_case(folder, require_segmentation=True)
    files = [Path(case.files[k]) for k in sorted(case.files)]
    key = _anatomy_key(files)
    cached = cache_dir / f"case-{key}.npy"
    if cached.exists():
        labels = np.load(cached)
    else:
        labels = derive_label_map(case).array
        _save_npy(labels, cached)
    tumour = np.where(labels >= Label.NCR, labels, 0).astype(np.uint8)
    cropped, crop_grid, offset = crop_to_brain(labels, case.grid)
    cropped_file = cache_dir / f"case-{key}-crop{CROP_MARGIN}.npy"
    if not cropped_file.exists():
        _save_npy(cropped, cropped_file)
    return Source("sha256:" + _files_sha(files)[:16], "case", str(cropped_file), crop_grid.to_json(),
                  array_sha256(tumour), tumour_stats(labels, case.grid, labels > Label.BACKGROUND),
                  case.grid.to_json(), offset)


def prepare_tumour(path: Path, cache_dir: Path, label_convention: str | None = None) -> Source:
    """Read a tumour-only segmentation as MedSynth tumour labels.

    Args:
        label_convention: a key of :data:`~MedSynthLib.schema.labels.CONVENTIONS`; None detects it from the
            map's values and, where BraTS 2023 and MSD both fit, from which label surrounds the other
            (:func:`~MedSynthLib.schema.labels.detect_tumour_convention`).
    """
    import SimpleITK as sitk

    from ..schema.labels import LabelValueError, detect_tumour_convention, tumour_to_schema
    from ..schema.provenance import array_sha256
    from ..schema.volume_io import read_image

    key = _files_sha([path])
    cached = cache_dir / f"tumour-{key}-{label_convention or 'detected'}.npy"
    image = read_image(path)
    grid = Grid.from_image(image)
    if cached.exists():
        labels = np.load(cached)
    else:
        seg = sitk.GetArrayFromImage(image)
        try:
            labels = tumour_to_schema(seg, label_convention or detect_tumour_convention(seg))
        except LabelValueError as exc:
            raise InputError(path, f"tumour label map: {exc}") from None
        _save_npy(labels, cached)
    if not (labels >= Label.NCR).any():
        raise InputError(path, "tumour label map holds no tumour voxel")
    return Source("sha256:" + key[:16], "tumour", str(cached), grid.to_json(), array_sha256(labels),
                  tumour_stats(labels, grid))


def template_source() -> Source:
    template = _template()
    _, crop_grid, offset = crop_to_brain(template.array, template.grid)
    return Source(TEMPLATE_ID, "template", None, crop_grid.to_json(), None, None, template.grid.to_json(), offset)


def _save_npy(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


@functools.lru_cache(maxsize=4)
def _cached_array(path: str) -> np.ndarray:
    array = np.load(path)
    array.setflags(write=False)
    return array


def source_privacy(source: Source) -> PrivacyRecord:
    """The privacy record a source's label map starts from (the edits then measure each change).

    A real case is its patient's anatomy and, when it has one, the patient's own tumour (Dice 1
    to both); the template is nobody's anatomy and holds no tumour; a tumour-only map is a
    patient's tumour without a brain (it is only ever inserted, so only its shape travels).
    """
    if source.kind == "template":
        return PrivacyRecord("template", None, None, "none")
    if source.kind == "case":
        return PrivacyRecord("patient", 1.0, 1.0 if source.has_tumour else None,
                             "patient" if source.has_tumour else "none")
    return PrivacyRecord("unknown", None, None, "patient")


def load_source(source: Source) -> LabelMap:
    """The source's label map (read-only array, a small per-process cache bounds memory).

    The history is empty: a generated case's history then holds exactly its replayable edits.
    Its privacy record (:func:`source_privacy`) is set, so every edit updates it
    (:meth:`~MedSynthLib.schema.grid.LabelMap.with_array`) and a generated case reads how close it
    stays to its patient from the label map itself.
    """
    if source.kind == "template":
        array, grid, _ = _template_cropped()
        return LabelMap(array, grid, [], privacy=source_privacy(source))
    assert source.cache_file is not None
    return LabelMap(_cached_array(source.cache_file), grid_from_json(source.grid), [],
                    privacy=source_privacy(source))


@functools.lru_cache(maxsize=1)
def _template() -> LabelMap:
    from ..cases.template import template_label_map

    return template_label_map()


@functools.lru_cache(maxsize=1)
def _template_cropped() -> tuple[np.ndarray, Grid, tuple[int, int, int]]:
    template = _template()
    array, grid, offset = crop_to_brain(template.array, template.grid)
    array.setflags(write=False)
    return array, grid, offset
