"""A clinician's review of a synthetic case, stored in the case's ``provenance.json``.

One function for every front end (the Slicer module, ``medsynth review`` in a browser), so a
rating means the same wherever it was given and export (``export/package.py``) finds it in one place.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import InputError, MedSynthError
from .provenance import RATING_RANGE  # 0 = not rated, 1 (poor) .. 5; the Slicer panel and export share it
from .volume_io import write_json

NOTE_MAX_CHARS = 500
SYNTHETIC_KIND = "medsynth-synthetic-case"
#: A ``medsynth generate`` dataset: its run file, and the folder of one record per case (``generate/runner.py``'s
#: ``RUN_FILE`` and ``PROVENANCE_DIR``; schema may not import generate).  Its BraTS-layout case folders hold images
#: only.
GENERATE_RUN_FILE = "generate.json"
GENERATE_PROVENANCE_DIR = "provenance"
#: How a BraTS-layout case folder (``medsynth generate --layout``) names its files: modality -> file-name suffix.
BRATS_SUFFIXES = {
    "brats2021": {"t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "flair": "_flair", "seg": "_seg"},
    "brats2023": {"t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "flair": "-t2f", "seg": "-seg"},
}


def clean_note(note: Any) -> str:
    """The note without control characters (tabs and newlines kept), stripped; refused when too long."""
    text = "".join(ch for ch in str(note or "") if ch.isprintable() or ch in "\n\t").strip()
    if len(text) > NOTE_MAX_CHARS:
        raise MedSynthError(f"the review note is {len(text)} characters; keep it under {NOTE_MAX_CHARS}")
    return text


def check_rating(rating: Any) -> int:
    """The rating as an int in :data:`RATING_RANGE`, or a clear error."""
    low, high = RATING_RANGE
    if isinstance(rating, bool) or not isinstance(rating, int) or not low <= rating <= high:
        raise MedSynthError(f"the rating must be a whole number {low}-{high} (0 = not rated), got {rating!r}")
    return rating


def provenance_path(case_dir: str | os.PathLike[str]) -> Path:
    """Where a case folder's provenance is: its own ``provenance.json``, or for a case folder of a ``medsynth
    generate`` dataset (BraTS 2021/2023 layouts: images only) the dataset's ``provenance/<case id>.json``.
    The folder's own ``provenance.json`` (present or not) where neither is found."""
    folder = Path(case_dir)
    own = folder / "provenance.json"
    if own.exists():
        return own
    dataset = folder.resolve().parent  # resolved: a link to a case folder still finds its dataset
    generated = dataset / GENERATE_PROVENANCE_DIR / f"{folder.resolve().name}.json"
    if (dataset / GENERATE_RUN_FILE).is_file() and generated.is_file():
        return generated
    return own


def note_refusal(provenance: dict[str, Any]) -> str | None:
    """Why no note may be stored in this provenance (it is shared as it is), or None where one may."""
    if isinstance(provenance.get("export"), dict):
        return "an exported case's provenance.json is shared as it is and keeps no free text"
    if isinstance(provenance.get("generation"), dict):
        return "a generated dataset's case records are shared with the dataset and keep no free text"
    return None


def read_provenance(case_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The provenance of a synthetic case folder (:func:`provenance_path`; refused when absent or not a MedSynth
    case)."""
    path = provenance_path(case_dir)
    try:
        provenance = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "no provenance: not a MedSynth synthetic case folder") from None
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read the case provenance ({exc})") from None
    if not isinstance(provenance, dict) or provenance.get("kind") != SYNTHETIC_KIND:
        raise InputError(path, f"not the provenance of a MedSynth synthetic case (kind {SYNTHETIC_KIND!r} expected)")
    return provenance


def save_review(case_dir: str | os.PathLike[str], rating: int, note: str = "") -> dict[str, Any]:
    """Store a rating (1-5; 0 = not rated) and a note as ``review`` in the case's provenance.

    The provenance file is rewritten atomically; everything else in it is kept.

    A case written by ``medsynth export`` or ``medsynth generate`` takes a rating and no note
    (:func:`note_refusal`): its provenance is shared as it is, and a note is free text (which may name a patient)
    that export keeps local only.

    Returns:
        The review record: ``rating``, ``note``, ``reviewed_at`` (UTC, ISO 8601).
    """
    rating = check_rating(rating)
    note = clean_note(note)
    provenance = read_provenance(case_dir)
    path = provenance_path(case_dir)
    refusal = note_refusal(provenance)
    if note and refusal is not None:
        also = ", or review the synthetic case folder it was exported from" if "export" in provenance else ""
        raise InputError(path, f"{refusal}: save the rating without a note{also}")
    review = {"rating": rating, "note": note,
              "reviewed_at": datetime.now(timezone.utc).replace(microsecond=0).isoformat()}
    provenance["review"] = review
    write_json(provenance, path, overwrite=True)
    return review
