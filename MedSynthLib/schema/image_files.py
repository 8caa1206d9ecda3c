"""Image file names and the data files of two-file images, known to every module that reads or writes them.

Kept apart from :mod:`.volume_io` so that :mod:`.outputs`, which moves a header and its data file as one unit,
can tell which data file a header owns without importing the reader and writer.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InputError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + (".nrrd", ".nhdr", ".mha", ".mhd")
#: Headers whose voxels SimpleITK writes to a separate data file beside them: header suffix -> the data file's
#: suffix (compressed, uncompressed).  Analyze/NIfTI pairs (.hdr/.img) are not among MedSynth's formats.
PAIRED_SUFFIXES = {".mhd": (".zraw", ".raw"), ".nhdr": (".raw.gz", ".raw")}


def strip_image_suffix(name: str) -> str:
    """``"a_t1.nii.gz"`` -> ``"a_t1"``."""
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def metaimage_data_file(path: Path) -> Path | None:
    """The ``ElementDataFile`` of a MetaImage header when it names one file (else ``None``)."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(1 << 16)
    except OSError as exc:
        raise InputError(path, f"cannot read ({exc.strerror or exc})") from None
    for raw in head.split(b"\n"):
        key, _, value = raw.decode("latin-1").partition("=")
        if key.strip().lower() == "elementdatafile":
            name = value.strip()
            if name.upper() == "LOCAL" or name.upper().startswith("LIST") or "%" in name or " " in name:
                return None
            return (path.parent / name) if not os.path.isabs(name) else Path(name)
    return None


def nrrd_data_file(path: Path) -> Path | None:
    """The ``data file`` of a detached NRRD header when it names one file (else ``None``)."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(1 << 16)
    except OSError:
        return None
    for raw in head.split(b"\n")[1:]:
        line = raw.decode("latin-1").strip()
        if not line:
            break  # the end of the header
        key, sep, value = line.partition(":")
        if sep and not value.startswith("=") and key.strip().lower() in ("data file", "datafile"):
            name = value.strip()
            if not name or name.upper().startswith("LIST") or "%" in name or " " in name:
                return None
            return (path.parent / name) if not os.path.isabs(name) else Path(name)
    return None


def named_data_file(header: Path) -> Path | None:
    """The one data file a MetaImage or detached NRRD header names (``None``: none, several, or unreadable)."""
    try:
        return nrrd_data_file(header) if header.name.lower().endswith(".nhdr") else metaimage_data_file(header)
    except InputError:
        return None


def own_data_file(header: Path) -> Path | None:
    """The data file an existing ``.mhd`` / ``.nhdr`` header names when it is the header's own: beside it, named
    as the header with a data suffix (``a.mhd`` -> ``a.raw`` or ``a.zraw``), and named by no other header there.
    ``None`` for anything else (another image's data file, one elsewhere, an unreadable header): no other file
    is ever taken for the header's."""
    stem = strip_image_suffix(header.name)
    suffix = header.name[len(stem):].lower()
    if suffix not in PAIRED_SUFFIXES or not stem or header.is_symlink() or not header.is_file():
        return None
    named = named_data_file(header)
    if named is None or named.parent != header.parent or named.name not in {stem + d for d in PAIRED_SUFFIXES[suffix]}:
        return None
    for other in header.parent.iterdir():  # a second header on the same data (a.nhdr beside a.mhd) keeps it
        if other != header and other.name.lower().endswith((".mhd", ".mha", ".nhdr")) and other.is_file() \
                and named_data_file(other) == named:
            return None
    return named
