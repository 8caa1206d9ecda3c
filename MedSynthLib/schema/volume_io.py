"""Reading images safely and writing outputs atomically.

Two traps of plain SimpleITK reading are closed here: a truncated ``.nii.gz``
is read without error (the missing voxels silently become 0) and NaN voxels of
a floating-point NIfTI come back as 0.  Both are detected and rejected.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import json
import math
import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError, OutputExistsError
# Re-exported: readers and writers of case folders import the file-name rules from here.
from .image_files import IMAGE_SUFFIXES, NIFTI_SUFFIXES, PAIRED_SUFFIXES, metaimage_data_file, strip_image_suffix

#: Suffix of the hidden folder a paired image is written in before its files are moved into place.
TMP_PAIR_SUFFIX = ".tmp-pair"
# Voxel sizes MedSynth accepts: a 0 or negative pixdim is a broken header, not 1 mm.
MIN_SPACING_MM = 1e-3
MAX_SPACING_MM = 1e3


def is_image_file(path: Path) -> bool:
    return path.is_file() and strip_image_suffix(path.name) != path.name


#: Bits per voxel of every NIfTI data type code (nifti1.h); a header naming another code, or a bitpix that
#: disagrees with its code, is corrupt (the NIfTI library behind SimpleITK would print its own line for it).
NIFTI_DATATYPE_BITS = {2: 8, 4: 16, 8: 32, 16: 32, 32: 64, 64: 64, 128: 24, 256: 8, 512: 16, 768: 32, 1024: 64,
                       1280: 64, 1536: 128, 1792: 128, 2048: 256, 2304: 32}


def _raw_nifti_header(path: Path) -> tuple[list[int], list[float]]:
    """``dim`` and ``pixdim`` as stored (the NIfTI library behind SimpleITK replaces a 0 pixdim by 1).

    Raises:
        InputError: not a NIfTI-1 or NIfTI-2 header.
    """
    try:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as stream:  # type: ignore[operator]
            head = stream.read(540)
    except (EOFError, OSError, zlib.error) as exc:
        raise InputError(path, f"not a readable NIfTI file ({exc})") from None
    for order in ("<", ">"):
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348:
            dim = list(struct.unpack(order + "8h", head[40:56]))
            pixdim = list(struct.unpack(order + "8f", head[76:108]))
            datatype, bitpix = struct.unpack(order + "hh", head[70:74])
            break
        if len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540:
            dim = list(struct.unpack(order + "8q", head[16:80]))
            pixdim = list(struct.unpack(order + "8d", head[104:168]))
            datatype, bitpix = struct.unpack(order + "hh", head[12:16])
            break
    else:
        raise InputError(path, "not a NIfTI file (no NIfTI-1 or NIfTI-2 header)")
    ndim = dim[0]
    if not 1 <= ndim <= 7 or any(d < 1 for d in dim[1:ndim + 1]):
        raise InputError(path, f"invalid NIfTI header: dim {dim[:max(1, min(ndim, 7)) + 1]}")
    if datatype not in NIFTI_DATATYPE_BITS:
        raise InputError(path, f"invalid NIfTI header: datatype {datatype} is not a NIfTI data type")
    if bitpix != NIFTI_DATATYPE_BITS[datatype]:
        raise InputError(path, f"invalid NIfTI header: bitpix {bitpix} does not match datatype {datatype} "
                               f"({NIFTI_DATATYPE_BITS[datatype]} bits per voxel)")
    return dim[1:ndim + 1], pixdim[1:ndim + 1]


def _check_spacing(path: Path, spacing: Sequence[float]) -> None:
    spatial = list(spacing)[:3]
    if not all(math.isfinite(s) and MIN_SPACING_MM <= s <= MAX_SPACING_MM for s in spatial):
        shown = ", ".join(f"{s:g}" for s in spatial)
        raise InputError(path, f"voxel spacing ({shown}) mm is not a valid size "
                               f"({MIN_SPACING_MM:g} to {MAX_SPACING_MM:g} mm)")


def _check_nifti_bytes(path: Path) -> None:
    """Reject a hostile header, an oversized grid, or a truncated or corrupt NIfTI before reading it.

    The sizes come from the stored header (no nibabel import: it costs about 0.4 s of
    every ``medsynth`` start); only then is the stored data counted, so SimpleITK never
    zero-fills a truncated file.
    """
    from .budget import check_voxels

    shape, pixdim = _raw_nifti_header(path)
    check_voxels(path, shape)
    _check_spacing(path, pixdim)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        expected = int(float(reader.GetMetaData("vox_offset"))) + int(np.prod(shape)) * int(
            reader.GetMetaData("bitpix")) // 8
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else exc.__class__.__name__
        raise InputError(path, f"not a readable NIfTI file ({first})") from None
    if path.name.lower().endswith(".gz"):
        size = 0
        try:
            with gzip.open(path, "rb") as stream:
                while chunk := stream.read(1 << 22):
                    size += len(chunk)
        except (EOFError, OSError, zlib.error) as exc:
            raise InputError(path, f"truncated or corrupt gzip data ({exc})") from None
    else:
        size = path.stat().st_size
    if size < expected:
        raise InputError(path, f"truncated: {size} bytes of image data, header requires {expected}")


def _check_header(path: Path) -> None:
    """Read the header of a non-NIfTI image and check its grid before any voxel is read."""
    from .budget import check_voxels

    if path.name.lower().endswith((".mhd", ".mha")):
        data_file = metaimage_data_file(path)
        if data_file is not None and not data_file.is_file():
            problem = "not found" if not data_file.exists() else "not a regular file"
            raise InputError(path, f"its ElementDataFile {data_file} is {problem}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reader error"
        raise InputError(path, f"cannot read image ({first})") from None
    check_voxels(path, reader.GetSize())
    _check_spacing(path, reader.GetSpacing())


def read_image(path: str | os.PathLike[str], *, dims: int | None = 3) -> sitk.Image:
    """Read one image with SimpleITK after integrity checks.

    Args:
        path: a NIfTI, NRRD or MetaImage file.
        dims: required dimension (``None`` accepts any).

    Raises:
        InputError: unreadable, truncated, non-finite voxels, or the wrong dimension.
    """
    path = Path(path)
    parent = path.parent if path.parent != Path("") else Path(".")
    if parent.is_dir() and not os.access(parent, os.X_OK):
        raise InputError(path, f"permission denied (cannot enter the folder {parent})")
    if not path.exists():
        raise InputError(path, "file not found")
    if not path.is_file():
        raise InputError(path, "not a file")
    if not os.access(path, os.R_OK):
        raise InputError(path, "permission denied")
    if not path.name.lower().endswith(IMAGE_SUFFIXES):
        raise InputError(path, f"unsupported image format (MedSynth reads {', '.join(IMAGE_SUFFIXES)})")
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        _check_nifti_bytes(path)
    else:
        _check_header(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reader error"
        raise InputError(path, f"cannot read image ({first})") from None
    if dims is not None:
        size = image.GetSize()
        effective = image.GetDimension()
        if effective == 4 and size[3] == 1:
            effective = 3
        if effective != dims or image.GetNumberOfComponentsPerPixel() != 1:
            shape = "x".join(str(s) for s in size)
            comps = image.GetNumberOfComponentsPerPixel()
            extra = f" with {comps} components" if comps != 1 else ""
            raise InputError(path, f"expected a {dims}D image, got {image.GetDimension()}D ({shape}){extra}")
        if image.GetDimension() == 4:
            image = image[:, :, :, 0]
        if min(image.GetSize()) < 2:
            raise InputError(path, f"expected a 3D volume, got a single slice ({image.GetSize()})")
    check_finite(image, path)
    return image


def check_finite(image: sitk.Image, path: str | os.PathLike[str]) -> None:
    """Reject NaN/Inf voxels in floating-point images.

    A float image is float storage, or integers scaled by ``scl_slope`` (which can
    overflow to infinity): its values as read are checked.  SimpleITK reads NaN in
    a NIfTI's float storage back as 0, so float storage is also checked as stored.
    """
    path = Path(path)
    if image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        return
    arrays = [sitk.GetArrayViewFromImage(image)]
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        import nibabel as nib

        nii = nib.load(str(path))
        if nii.get_data_dtype().kind == "f":
            arrays.append(np.asanyarray(nii.dataobj))
    for data in arrays:
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise InputError(path, f"{bad} voxels are NaN or infinite")


# --- writing -------------------------------------------------------------------------------


def check_writable(paths: list[Path], overwrite: bool,
                   inputs: Sequence[str | os.PathLike[str]] = ()) -> None:
    """Fail before any work when an output exists (without overwrite) or cannot be written.

    Args:
        inputs: the command's input files and folders: an output that is one of them, or a folder holding one,
            is refused even with ``overwrite`` (a user's input is never replaced).
    """
    check_not_an_input(paths, inputs)
    for path in paths:
        if path.exists() and not overwrite:
            raise OutputExistsError(path)
        parent = path.parent if path.parent != Path("") else Path(".")
        existing = parent
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise InputError(existing, f"not a folder, cannot hold the output {path.name}")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise InputError(parent, "output folder is not writable")


def check_folder_argument(path: Path, what: str) -> None:
    """A folder argument that is a file, or under one, fails before any work with one line."""
    if path.exists() and not path.is_dir():
        raise InputError(path, f"{what}: not a folder")
    check_writable([path], overwrite=True)


def check_not_an_input(outputs: Sequence[str | os.PathLike[str]], inputs: Sequence[str | os.PathLike[str]]) -> None:
    """Refuse an output that is one of ``inputs`` or a folder that holds one (links resolved)."""
    resolved = [(Path(i), Path(i).resolve()) for i in inputs if i is not None]
    for output in outputs:
        target = Path(output).resolve()
        for given, source in resolved:
            if source == target or target in source.parents:
                what = "is also an input" if source == target else f"holds the input {given}"
                raise InputError(output, f"{what} of this command: write the output elsewhere")


def enclosing_folder(output: str | os.PathLike[str], folders: Sequence[str | os.PathLike[str]]) -> Path | None:
    """The one of ``folders`` that ``output`` lies inside (links resolved), else ``None``.

    :func:`check_not_an_input` refuses an output that is an input or holds one; this finds the other way round,
    for commands whose output must not land inside an input folder (a model's, a patient's case).
    """
    target = Path(output).resolve()
    return next((Path(folder) for folder in folders if Path(folder).resolve() in target.parents), None)


def folder_and_files(folder: str | os.PathLike[str] | None) -> list[Path]:
    """A folder input and the files directly in it (what a case reader may read), for :func:`check_not_an_input`."""
    if folder is None:
        return []
    path = Path(folder)
    return [path, *(p for p in path.iterdir() if p.is_file())] if path.is_dir() else [path]


def _tmp_affixes(path: Path) -> tuple[str, str]:
    """(prefix, suffix) common to every temporary file written beside ``path``: hidden, keeping its image suffix
    (older versions wrote ``.NAME.XXXX.tmp.SUFFIX``, without the writer's pid)."""
    suffix = path.name[len(strip_image_suffix(path.name)):] or path.suffix
    return f".{path.name}.", ".tmp" + suffix


def _tmp_sibling(path: Path) -> Path:
    """A fresh hidden file beside ``path`` that keeps its image suffix (writers go by suffix).

    It is named as a staging folder of ``path``, with this process's id, and the temporaries of ``path`` whose
    process is gone (killed between the write and its rename: kill -9 runs no cleanup) are removed first.
    """
    from .outputs import STAGE_MARK, clean_stale_staging

    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(path)
    suffix = _tmp_affixes(path)[1]
    fd, name = tempfile.mkstemp(prefix=f".{path.name}{STAGE_MARK}{os.getpid()}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the user's usual mode
    return Path(name)


def remove_temporaries(path: str | os.PathLike[str]) -> None:
    """Delete the temporary files an atomic write of ``path`` left when it was killed before its rename.

    Only for a caller that alone writes ``path``: a live write's temporary file would go too.
    """
    path = Path(path)
    prefix, suffix = _tmp_affixes(path)
    for stale in path.parent.glob(f"{glob.escape(prefix)}*{glob.escape(suffix)}"):
        stale.unlink(missing_ok=True)
    for stale in path.parent.glob(f"{glob.escape(prefix)}*{TMP_PAIR_SUFFIX}"):
        shutil.rmtree(stale, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def image_files(path: str | os.PathLike[str], *, compress: bool = True) -> list[Path]:
    """The files :func:`write_image` creates for ``path``: the image itself, then a header's separate data file
    (``a.mhd`` -> ``a.zraw``, ``a.nhdr`` -> ``a.raw.gz``; ``.raw`` uncompressed)."""
    path = Path(path)
    stem = strip_image_suffix(path.name)
    for suffix, (packed, plain) in PAIRED_SUFFIXES.items():
        if path.name.lower().endswith(suffix) and stem:
            return [path, path.with_name(stem + (packed if compress else plain))]
    return [path]


def write_image(image: sitk.Image, path: str | os.PathLike[str], *, overwrite: bool = False,
                compress: bool = True) -> Path:
    """Write an image atomically (temporary file in the same folder, then rename).

    A header with a separate data file (``.mhd``, ``.nhdr``) is written under its final names into a hidden
    folder beside ``path`` (so the header names the final data file), then the data file and the header are
    moved into place with Ctrl+C held off; a failure between the two moves puts back what was there.  An
    existing data file counts as an existing output.

    Returns:
        ``path`` (the header of a pair; :func:`image_files` lists all the files).
    """
    path = Path(path)
    files = image_files(path, compress=compress)
    for target in files:
        if (target.exists() or target.is_symlink()) and not overwrite:
            raise OutputExistsError(target)
    if len(files) > 1:
        _write_pair(image, path, compress)
        return path
    tmp = _tmp_sibling(path)
    try:
        sitk.WriteImage(image, str(tmp), useCompression=compress)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_pair(image: sitk.Image, path: Path, compress: bool) -> None:
    """Write a header and its data file in a hidden folder beside ``path``, then move both into place.

    The folder is named as a staging folder of ``path`` with this process's id, so the next write of ``path``
    removes it when this process was killed before it could (kill -9 runs no cleanup).
    """
    from .outputs import STAGE_MARK, clean_stale_staging, replace_as_one, signals_deferred

    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(path)
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}{STAGE_MARK}{os.getpid()}-", suffix=TMP_PAIR_SUFFIX,
                                  dir=path.parent))
    try:
        sitk.WriteImage(image, str(stage / path.name), useCompression=compress)
        names = sorted(p.name for p in stage.iterdir() if p.name != path.name) + [path.name]  # the header last
        with signals_deferred():
            replace_as_one({stage / name: path.parent / name for name in names})
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_nifti_like(values: np.ndarray, changed: np.ndarray, like: str | os.PathLike[str],
                     path: str | os.PathLike[str]) -> bool:
    """Write ``values`` as a copy of the NIfTI file ``like`` in which only the ``changed`` voxels differ.

    The header is ``like``'s own, byte for byte (type, scaling, units, qform and sform codes, description,
    extensions), and the stored voxels outside ``changed`` are ``like``'s stored voxels, so a reader sees the
    same file there, not only the same values.  The changed voxels are stored through ``like``'s scaling
    (rounded and clipped for an integer type).  The file is written atomically.

    Args:
        values: (k, j, i) the image as read (scanner units, SimpleITK's axis order).
        changed: (k, j, i) mask of the voxels that differ from ``like``.

    Returns:
        False, writing nothing, when ``like`` is not a 3D NIfTI file of this shape (the caller writes otherwise).
    """
    import nibabel as nib
    from nibabel.openers import ImageOpener
    from nibabel.volumeutils import array_to_file

    like, path = Path(like), Path(path)
    if not like.name.lower().endswith(NIFTI_SUFFIXES):
        return False
    try:
        with ImageOpener(str(like)) as handle:  # the header as stored (a loaded nibabel image moves its scaling out)
            header = nib.Nifti1Header.from_fileobj(handle)
    except nib.spatialimages.HeaderDataError:  # NIfTI-2, say
        return False
    if header["dim"][0] != 3 or tuple(int(n) for n in header["dim"][1:4]) != values.shape[::-1]:
        return False
    dtype = header.get_data_dtype()
    slope, inter = header.get_slope_inter()
    if slope is None and inter is None and values.dtype == dtype:
        stored = values.transpose(2, 1, 0)  # unscaled and already the stored type (a BraTS int16 scan): as it is
    else:
        stored = np.array(nib.load(str(like)).dataobj.get_unscaled(), copy=True)  # (i, j, k), as on disk
        at = np.nonzero(changed.transpose(2, 1, 0))
        wanted = (values.transpose(2, 1, 0)[at].astype(np.float64) - (inter or 0.0)) / (slope or 1.0)
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            wanted = np.clip(np.rint(wanted), info.min, info.max)
        stored[at] = wanted.astype(dtype)
    tmp = _tmp_sibling(path)  # keeps the suffix: the opener compresses a .gz name
    try:
        with ImageOpener(str(tmp), "wb") as handle:
            header.write_to(handle)
            array_to_file(stored, handle, dtype, offset=header.get_data_offset(), order="F")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def compact_intensities(array: np.ndarray) -> np.ndarray:
    """int16 (rounded) where that loses nothing that matters, else float32.

    That is when the largest magnitude lies in 256..32767, so rounding costs under
    0.2 % of it (finer than a bf16 network output resolves), or when the values are
    already integers that fit.  Tiny normalised ranges and values beyond int16 stay
    float32.  int16 halves the bytes to compress and write, as BraTS stores its scans.
    """
    values = np.asarray(array)
    # max/min instead of abs(): no temporary the size of the volume (this runs on every output).
    peak = max(float(values.max()), -float(values.min())) if values.size else 0.0
    if peak <= 32767 and (peak >= 256 or bool(np.array_equal(values, np.round(values)))):
        return np.round(values).astype(np.int16)
    return values.astype(np.float32)


def write_json(data: Any, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(path)
    tmp = _tmp_sibling(path)
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Build an output folder in a temporary sibling, then move it into place.

    On any exception the temporary folder is removed and ``path`` is untouched.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(path)
    check_writable([path], overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    from .outputs import STAGE_MARK, clean_stale_staging

    clean_stale_staging(path)  # what a killed run left (kill -9: no cleanup of its own ran)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{STAGE_MARK}{os.getpid()}-", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        from .outputs import signals_deferred

        with signals_deferred():  # between the two renames the folder would be gone
            if path.exists():
                # named with the pid as the staging folder is: killed between the renames, the next write removes it
                backup = Path(tempfile.mkdtemp(prefix=f".{path.name}{STAGE_MARK}{os.getpid()}-", suffix=".old",
                                               dir=path.parent))
                os.replace(path, backup / "old")
                os.replace(tmp, path)
                shutil.rmtree(backup, ignore_errors=True)
            else:
                os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
