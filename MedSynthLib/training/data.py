"""Training volumes for the synthesis GAN: label maps derived on the fly, cached.

Each case becomes (labels uint8, images float16 in [-1, 1], normaliser
statistics), cropped to the brain's bounding box and cached by the sha256 of
its files and the anatomy model's settings, so a second run (or another fold)
skips the anatomy step.

A *prepared training set* (``medsynth prepare``) is such a cache with a manifest,
``prepared_set.json``: ``medsynth train --data SET`` trains on it where the scans
themselves are not (a GPU node), with the same case hashes in the run's record.  The
manifest also keeps each volume file's sha256, which training checks: a volume changed,
damaged or swapped since it was prepared is refused.

A volume that cannot be read, or holds what no training case can (NaN images, no brain, a
z-scored brain without signal), is an :class:`InputError` naming its file: a prepared set's is
refused; a cache entry is derived again from its case folder, with a notice.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cases.case_key import CACHE_VERSION, case_files_hash
from ..cases.readers import MODALITIES, read_case
from ..schema.errors import InputError
from ..schema.grid import mask_box
from ..schema.labels import brain_mask, tumour_mask
from ..synthesis.models import file_sha256
from ..synthesis.normalize import Normalizer, fit_case_normalizers, normalizer_from_json


@dataclass
class TrainingVolume:
    """One case ready for patch sampling (arrays cropped to the brain box)."""

    key: str  # content hash of the case files
    labels: np.ndarray  # (k, j, i) uint8
    images: np.ndarray  # (4, k, j, i) float16 in [-1, 1]
    normalizers: dict[str, Normalizer]
    tumour_voxels: np.ndarray  # (n, 3) int32 indices of tumour voxels, for biased sampling
    brain_voxels: np.ndarray  # (m, 3) int32 indices (subsampled) of brain voxels


#: The manifest that makes a folder a prepared training set.
PREPARED_SET_FILE = "prepared_set.json"
PREPARED_SET_FORMAT = "medsynth-prepared-training-set"
PREPARED_SET_VERSION = 1


@dataclass(frozen=True)
class CaseSource:
    """Where one training case comes from: its case folder, or a prepared set's volume.

    Attributes:
        name: the case's name (its folder's name), which cross-validation folds and validation lists use.
        folder: the case folder; None for a case of a prepared set.
        prepared: the prepared set holding the case's volume; None for a case folder.
        key: the case's content hash (:func:`case_key`); a prepared set records it, a folder's is computed.
        volume_sha256: the sha256 of the prepared volume's file, which loading it checks; None for a case
            folder and for a set prepared before sets recorded it (or re-encoded since: ``packed_images``).
    """

    name: str
    folder: Path | None = None
    prepared: Path | None = None
    key: str | None = None
    volume_sha256: str | None = None  # of the prepared volume's file, where the set records it

    def __post_init__(self) -> None:
        if (self.folder is None) == (self.prepared is None):
            raise ValueError(f"training case {self.name!r}: give its case folder or its prepared set, not both or neither")

    @property
    def origin(self) -> Path:
        """The case folder, or the case's place in its prepared set."""
        if self.folder is not None:
            return self.folder
        assert self.prepared is not None  # __post_init__: one of the two is set
        return self.prepared / self.name


def volume_file_name(key: str, normalization: str) -> str:
    """The file of a case's prepared volume under one normalisation (in a cache or a prepared set)."""
    from ..synthesis.normalize import ZSCORE_KINDS

    # The original percentile cache keeps its file name, so existing caches stay valid; z-score caches
    # name their clip range (it is baked into the cached images).
    suffix = "" if normalization == "percentile" else f"-{normalization}{ZSCORE_KINDS[normalization]:g}"
    return f"{key}{suffix}.npz"


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def read_prepared_set(root: Path) -> tuple[str, list[CaseSource]]:
    """A prepared set's normalisation and cases, each volume file checked to be there.

    Each case carries its volume file's recorded sha256 (checked when the volume is loaded:
    :func:`load_prepared_volume`); a set from before the record, or one unpacked before ``unpack.py``
    recorded the hashes of the volumes it writes (``packed_images``: the record describes the volumes
    before ``pack.py`` rounded them), carries None and is not verified.
    """
    from ..schema.jsonshape import expect_object, read_json
    from ..synthesis.normalize import ZSCORE_KINDS

    manifest = root / PREPARED_SET_FILE
    record = read_json(manifest, "prepared training set")
    if record.get("format") != PREPARED_SET_FORMAT:
        raise InputError(manifest, f"'format' must be {PREPARED_SET_FORMAT!r}")
    if record.get("version") != PREPARED_SET_VERSION or record.get("cache_version") != CACHE_VERSION:
        raise InputError(manifest, f"prepared by another MedSynth version (set version {record.get('version')}, "
                                   f"cache version {record.get('cache_version')}; this one reads "
                                   f"{PREPARED_SET_VERSION} and {CACHE_VERSION}): prepare it again")
    normalization = record.get("normalization")
    if normalization != "percentile" and normalization not in ZSCORE_KINDS:
        raise InputError(manifest, f"unknown 'normalization' {normalization!r}")
    cases = expect_object(record.get("cases"), manifest, "'cases'")
    if not cases:
        raise InputError(manifest, "'cases' is empty")
    hashes = record.get("volume_sha256")
    if hashes is not None:
        hashes = expect_object(hashes, manifest, "'volume_sha256'")
    if "packed_images" in record:
        hashes = None  # re-encoded by pack.py: the recorded hashes are of the volumes before
    sources = []
    for name, key in cases.items():
        if not _is_sha256(key):
            raise InputError(manifest, f"case {name!r}: its key must be a sha256 in hex")
        if not (root / volume_file_name(key, normalization)).is_file():
            raise InputError(root, f"case {name!r}: its volume {volume_file_name(key, normalization)} is missing")
        if hashes is not None and not _is_sha256(hashes.get(name)):
            raise InputError(manifest, f"case {name!r}: 'volume_sha256' must give its volume file's sha256 in hex")
        sources.append(CaseSource(name, prepared=root, key=key,
                                  volume_sha256=hashes[name] if hashes is not None else None))
    return normalization, sources


def cases_by_name(sources: list[CaseSource]) -> dict[str, CaseSource]:
    """The cases keyed by name (a case named twice with the same origin counts once; two origins are refused)."""
    by_name: dict[str, CaseSource] = {}
    for source in sources:
        if source.name in by_name and by_name[source.name] != source:
            raise InputError(source.origin, f"two cases are named {source.name} ({by_name[source.name].origin})")
        by_name[source.name] = source
    return by_name


def find_case_sources(data: str | os.PathLike[str], normalization: str) -> list[CaseSource]:
    """The training cases under ``data``: a prepared set's (of this normalisation), or its case folders."""
    root = Path(data)
    if (root / PREPARED_SET_FILE).is_file():
        prepared_as, sources = read_prepared_set(root)
        if prepared_as != normalization:
            raise InputError(root, f"prepared with {prepared_as} normalisation; the training config uses "
                                   f"{normalization} (prepare it again with this config)")
        return sources
    return [CaseSource(folder.name, folder=folder) for folder in find_case_folders(root)]


def write_prepared_set(folders: list[Path], output: Path, normalization: str, *, cache_dir: Path | None = None,
                       overwrite: bool = False, command: str = "", progress: bool = False) -> Path:
    """Prepare case folders once into ``output``, a set ``medsynth train --data`` takes without the scans.

    The volumes are what training reads (label map derived, images normalised and cropped to the brain):
    patients' images, rescaled and clipped, so a set is patient data and travels under the same rules as the scans.
    A cached volume is checked before it is copied (a damaged one is derived again); the manifest records
    each volume file's sha256.
    """
    import shutil

    from tqdm import tqdm

    from ..schema.volume_io import atomic_directory, write_json

    sources = cases_by_name([CaseSource(folder.name, folder=folder) for folder in folders])
    cases: dict[str, str] = {}
    hashes: dict[str, str] = {}
    with atomic_directory(output, overwrite=overwrite) as tmp:
        for name, source in tqdm(sources.items(), desc="prepare", disable=not progress or None, leave=False):
            key = case_key(source.origin)
            file_name = volume_file_name(key, normalization)
            # Through the cache: a cached volume is loaded (checked; derived again where damaged), then copied.
            prepare_volume(source.origin, tmp if cache_dir is None else cache_dir, normalization, key)
            if cache_dir is not None:
                shutil.copyfile(Path(cache_dir) / file_name, tmp / file_name)
            cases[name] = key
            hashes[name] = file_sha256(tmp / file_name)
        write_json({"format": PREPARED_SET_FORMAT, "version": PREPARED_SET_VERSION, "cache_version": CACHE_VERSION,
                    "normalization": normalization, "command": command, "cases": cases, "volume_sha256": hashes},
                   tmp / PREPARED_SET_FILE)
    return output


def find_case_folders(data: str | os.PathLike[str]) -> list[Path]:
    """Case folders under ``data``: ``data`` itself, its sub-folders, or their sub-folders."""
    from ..cases.readers import detect_convention

    root = Path(data)
    if not root.is_dir():
        raise InputError(root, "data folder not found")
    found: list[Path] = []
    for candidate in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        try:
            detect_convention(candidate)
            found.append(candidate)
        except InputError:
            if candidate != root:
                for sub in sorted(p for p in candidate.iterdir() if p.is_dir()):
                    try:
                        detect_convention(sub)
                        found.append(sub)
                    except InputError:
                        pass
    if not found:
        raise InputError(root, "no case folders found (BraTS 2021/2023, MSD or BRATS 2015 naming)")
    return found


def case_key(case_dir: Path) -> str:
    """The content hash that names a case's prepared volume (and the model record keeps for it)."""
    return case_files_hash(read_case(case_dir, require_segmentation=True))


#: What reading a damaged .npz raises: a cut or altered archive, a missing or malformed array, bad statistics.
_READ_ERRORS = (zipfile.BadZipFile, ValueError, OSError, KeyError, EOFError, TypeError, AttributeError)
PREPARE_AGAIN = "prepare the set again from its case folders"


def load_volume_file(path: Path, key: str, *, sha256: str | None = None, recover: str = "") -> TrainingVolume:
    """A prepared volume's file, read and checked; an :class:`InputError` naming it otherwise.

    Args:
        sha256: the file's sha256 as its prepared set records it (None: not verified).
        recover: what the user can do about a damaged file, appended to the message.
    """
    path = Path(path)
    then = f": {recover}" if recover else ""
    content = None
    try:
        content = path.read_bytes() if sha256 is not None else None  # read once: hashed and loaded
        with np.load(path if content is None else io.BytesIO(content)) as data:
            missing = [name for name in ("labels", "images", "normalizers") if name not in data.files]
            if missing:
                raise InputError(path, f"unreadable prepared volume: no {', '.join(missing)} array{then}")
            labels, images = data["labels"], data["images"]
            normalizers = {m: normalizer_from_json(v) for m, v in json.loads(str(data["normalizers"])).items()}
    except _READ_ERRORS as error:  # told first: a file cut short or altered says so, not only that its hash differs
        reason = str(error).strip() or type(error).__name__
        raise InputError(path, f"unreadable prepared volume, damaged or not a MedSynth volume ({reason}){then}") \
            from None
    if content is not None and hashlib.sha256(content).hexdigest() != sha256:
        raise InputError(path, "is not the volume its prepared_set.json records (its sha256 differs: "
                               f"changed, damaged or swapped since it was prepared){then}")
    del content
    _check_volume(path, labels, images, normalizers, then)
    return _volume(key, labels, images, normalizers)


def _check_volume(where: Path, labels: np.ndarray, images: np.ndarray, normalizers: dict[str, Normalizer],
                  then: str = "") -> None:
    """Refuse a volume training cannot use, naming ``where`` (its file, or the case it is derived from).

    What is checked is what training would otherwise fail on later, after writing a run folder:
    shapes, NaN or infinite images, no brain, a z-scored brain without signal (its floor is undefined).
    """
    from ..synthesis.normalize import HealthyTissueZScore, signal_floor_z

    if (labels.ndim != 3 or images.ndim != 4 or images.shape != (len(MODALITIES), *labels.shape)
            or not np.issubdtype(labels.dtype, np.integer) or not np.issubdtype(images.dtype, np.floating)
            or sorted(normalizers) != sorted(MODALITIES)):
        raise InputError(where, f"not a MedSynth training volume (labels {labels.dtype} {list(labels.shape)}, "
                                f"images {images.dtype} {list(images.shape)}, statistics of {sorted(normalizers)})"
                                f"{then}")
    if not np.isfinite(images).all():
        raise InputError(where, f"its images hold NaN or infinite values{then}")
    brain = brain_mask(labels)
    if not brain.any():
        raise InputError(where, f"its label map has no brain{then}")
    for c, m in enumerate(MODALITIES):
        if isinstance(normalizers[m], HealthyTissueZScore):
            try:
                signal_floor_z(images[c], brain, normalizers[m])
            except ValueError:
                raise InputError(where, f"its {m} image carries no signal in the brain{then}") from None


def load_prepared_volume(source: CaseSource, normalization: str) -> TrainingVolume:
    """A prepared set's volume of one case, checked (and verified against the set's record where it has one)."""
    assert source.prepared is not None and source.key is not None
    return load_volume_file(source.prepared / volume_file_name(source.key, normalization), source.key,
                            sha256=source.volume_sha256, recover=f"{PREPARE_AGAIN} (case {source.name})")


def prepare_volume(case_dir: Path, cache_dir: Path | None, normalization: str = "percentile",
                   key: str | None = None) -> TrainingVolume:
    """Read a case, derive its label map and normalise its images (cached per normalisation).

    A cached volume that cannot be used (damaged, or holding what no case can) is derived again from the
    case folder, with a notice; in a prepared set (no case folder to derive it from) it is refused.

    Args:
        normalization: ``percentile``, ``healthy_zscore`` or ``tissue_zscore`` (:mod:`MedSynthLib.synthesis.normalize`).
        key: the case's :func:`case_key` when the caller has it (a cached volume is then loaded without
            reading the case again).
    """
    from ..cases.anatomy import derive_label_map

    case = None
    if key is None:
        case = read_case(case_dir, require_segmentation=True)
        key = case_files_hash(case)

    cached = Path(cache_dir) / volume_file_name(key, normalization) if cache_dir is not None else None
    if cached is not None and cached.exists():
        # A cache entry is derived again from its case folder; a prepared set has none to derive it from.
        derivable = not (cached.parent / PREPARED_SET_FILE).is_file() and Path(case_dir).is_dir()
        try:
            return load_volume_file(cached, key, recover="" if derivable else PREPARE_AGAIN)
        except InputError as error:
            if not derivable:
                raise
            print(f"{cached}: {error.problem}; deriving it again from {case_dir}", file=sys.stderr)
    if case is None:
        case = read_case(case_dir, require_segmentation=True)
    labels = derive_label_map(case).array
    brain = brain_mask(labels)
    box = mask_box(brain, margin=4)
    normalizers = fit_case_normalizers({m: case.images[m] for m in MODALITIES}, labels, normalization)
    images = np.stack([normalizers[m].forward(case.images[m], brain)[box] for m in MODALITIES]).astype(np.float16)
    labels = labels[box]
    _check_volume(Path(case_dir), labels, images, normalizers, " (as its scans give them)")
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, labels=labels, images=images,
                 normalizers=json.dumps({m: n.to_json() for m, n in normalizers.items()}))
        os.replace(tmp, cached)
    return _volume(key, labels, images, normalizers)


def _volume(key: str, labels: np.ndarray, images: np.ndarray,
            normalizers: dict[str, Normalizer]) -> TrainingVolume:
    tumour = np.argwhere(tumour_mask(labels)).astype(np.int32)
    brain = np.argwhere(brain_mask(labels)).astype(np.int32)[::7]
    return TrainingVolume(key, labels, images, normalizers, tumour, brain)


@dataclass(frozen=True)
class PatchSampler:
    """Draws augmented training patches; fully determined by (seed, step, rank).

    Because every draw derives its generator from the step number, a resumed run
    sees exactly the patches an uninterrupted run would have seen.
    """

    patch_size: int
    tumour_fraction: float = 0.5
    flip: bool = True
    rotate_deg: float = 10.0
    scale: float = 0.1
    intensity: float = 0.05
    brain_only_interpolation: bool = False

    def sample(self, volumes: list[TrainingVolume], seed: int, step: int, rank: int,
               batch_size: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """A batch on ``device``: labels (B, P, P, P) long and images (B, 4, P, P, P) float32.

        The crop is cut on the CPU and augmented on ``device``: on a GPU the resampling of large patches
        would otherwise hold the step up (0.1 s a 96-voxel patch on two CPU cores).
        """
        rng = np.random.default_rng([seed, step, rank])
        labels, images = [], []
        for _ in range(batch_size):
            volume = volumes[int(rng.integers(len(volumes)))]
            lab, img = self._crop(volume, rng)
            lab, img = self._augment(lab, img, rng, torch.device(device))
            labels.append(lab)
            images.append(img)
        return torch.stack(labels), torch.stack(images)

    def _crop(self, volume: TrainingVolume, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        pool = volume.tumour_voxels if (len(volume.tumour_voxels) and rng.random() < self.tumour_fraction) \
            else volume.brain_voxels
        centre = pool[int(rng.integers(len(pool)))] + rng.integers(-8, 9, 3)
        size = self.patch_size
        lo = centre - size // 2
        shape = np.array(volume.labels.shape)
        # Pad with background where the patch leaves the cropped volume.
        src_lo = np.clip(lo, 0, shape)
        src_hi = np.clip(lo + size, 0, shape)
        dst_lo = src_lo - lo
        dst_hi = dst_lo + (src_hi - src_lo)
        lab = np.zeros((size,) * 3, np.uint8)
        img = np.full((4,) + (size,) * 3, -1.0, np.float32)
        src = tuple(slice(a, b) for a, b in zip(src_lo, src_hi))
        dst = tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi))
        lab[dst] = volume.labels[src]
        img[(slice(None),) + dst] = volume.images[(slice(None),) + src]
        return lab, img

    def _augment(self, lab: np.ndarray, img: np.ndarray, rng: np.random.Generator,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        lab_t = torch.from_numpy(lab.astype(np.int64)).to(device)
        img_t = torch.from_numpy(img).to(device)
        if self.flip and rng.random() < 0.5:
            lab_t, img_t = lab_t.flip(-1), img_t.flip(-1)  # left-right (i axis)
        if self.rotate_deg > 0 or self.scale > 0:
            lab_t, img_t = _random_affine(lab_t, img_t, rng, self.rotate_deg, self.scale,
                                          self.brain_only_interpolation)
        if self.intensity > 0:
            brain = brain_mask(lab_t)
            gain = torch.from_numpy(rng.uniform(1 - self.intensity, 1 + self.intensity,
                                                (4, 1, 1, 1)).astype(np.float32)).to(device)
            shift = torch.from_numpy(rng.uniform(-self.intensity, self.intensity,
                                                 (4, 1, 1, 1)).astype(np.float32)).to(device)
            img_t = torch.where(brain, ((img_t + 1) * gain - 1 + shift).clamp(-1, 1), img_t)
        return lab_t, img_t


def _random_affine(lab: torch.Tensor, img: torch.Tensor, rng: np.random.Generator, rotate_deg: float,
                   scale: float, brain_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Small random rotation and scaling about the patch centre (grid_sample).

    The label map is resampled by nearest neighbour, the images linearly. With ``brain_only`` the images are
    interpolated from brain voxels only (normalised by the interpolated brain mask) and the background stays -1:
    otherwise a voxel the resampled label map calls brain may take up to half its value from the background (-1),
    and the brain's outermost layer becomes a dark target the network learns (docs/model_card.md).
    """
    from scipy.spatial.transform import Rotation

    angles = rng.uniform(-rotate_deg, rotate_deg, 3)
    factor = rng.uniform(1 - scale, 1 + scale)
    matrix = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() / factor
    theta = torch.zeros(1, 3, 4, device=img.device)
    theta[0, :, :3] = torch.from_numpy(matrix.astype(np.float32))
    grid = torch.nn.functional.affine_grid(theta, (1, 1) + tuple(lab.shape), align_corners=False)
    lab_out = torch.nn.functional.grid_sample(lab[None, None].float(), grid, mode="nearest", padding_mode="zeros",
                                              align_corners=False)[0, 0].long()
    if not brain_only:
        img_out = torch.nn.functional.grid_sample(img[None] + 1, grid, mode="bilinear", padding_mode="zeros",
                                                  align_corners=False)[0] - 1
        return lab_out, img_out
    brain = brain_mask(lab).to(img.dtype)
    both = torch.cat([(img + 1) * brain, brain[None]])[None]  # one resampling for the images and the mask
    resampled = torch.nn.functional.grid_sample(both, grid, mode="bilinear", padding_mode="zeros",
                                                align_corners=False)[0]
    # The nearest brain voxel is one of the 8 interpolated, so the weight is positive wherever lab_out is brain.
    weight = resampled[-1:].clamp(min=1e-6)
    img_out = torch.where(brain_mask(lab_out)[None], resampled[:-1] / weight - 1, torch.full_like(resampled[:-1], -1.0))
    return lab_out, img_out


def data_summary(volumes: list[TrainingVolume]) -> dict[str, Any]:
    """What a model was trained on, without identifiers: counts and content hashes."""
    return {
        "cases": len(volumes),
        "case_sha256": [v.key for v in volumes],
        "tumour_voxels": int(sum(len(v.tumour_voxels) for v in volumes)),
    }


@dataclass(frozen=True)
class RegionSampler:
    """Regions to blank and inpaint in training patches (``network.kind: inpainting``), from (seed, step, rank).

    A region is either the patch's tumour grown by a random margin (what an edit re-renders: the tumour
    and the oedema and mass effect around it) or, otherwise and when the patch holds no tumour, one to three
    random overlapping ellipsoids in the brain (healthy tissue appearing where a tumour left).

    Attributes:
        tumour_fraction: probability of a tumour-centred region when the patch holds tumour.
        margin_range: growth of the tumour, in voxels (min, max).
        radius_range: ellipsoid semi-axes, in voxels (min, max).
    """

    tumour_fraction: float = 0.6
    margin_range: tuple[float, float] = (3.0, 12.0)
    radius_range: tuple[float, float] = (5.0, 20.0)

    def sample(self, labels: torch.Tensor, seed: int, step: int, rank: int) -> torch.Tensor:
        """(B, 1, *spatial) float masks for a batch of patch label maps (B, *spatial)."""
        rng = np.random.default_rng([seed, step, rank, 2])
        masks = [self._one(lab.numpy(), rng) for lab in labels]
        return torch.from_numpy(np.stack(masks)[:, None].astype(np.float32))

    def _one(self, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        from ..synthesis.inpainting import _ball_growth

        brain = brain_mask(labels)
        tumour = tumour_mask(labels)
        if tumour.any() and rng.random() < self.tumour_fraction:
            margin = float(rng.uniform(*self.margin_range))
            return _ball_growth(tumour, margin, (1.0, 1.0, 1.0)) & brain
        points = np.argwhere(brain)
        region = np.zeros(labels.shape, bool)
        if not len(points):
            return region
        grid = np.indices(labels.shape, dtype=np.float32)
        for _ in range(int(rng.integers(1, 4))):
            centre = points[int(rng.integers(len(points)))]
            radii = rng.uniform(*self.radius_range, 3)
            distance = sum(((grid[a] - centre[a]) / radii[a]) ** 2 for a in range(3))
            region |= distance <= 1.0
        return region & brain
