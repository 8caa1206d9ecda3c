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


def read_provenance(case_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``provenance.json`` of a synthetic case folder (refused when absent or not a MedSynth case)."""
    path = Path(case_dir) / "provenance.json"
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

    A case written by ``medsynth export`` takes a rating and no note: its ``provenance.json`` is what is shared,
    and a note is free text (which may name a patient) that export keeps local only.

    Returns:
        The review record: ``rating``, ``note``, ``reviewed_at`` (UTC, ISO 8601).
    """
    rating = check_rating(rating)
    note = clean_note(note)
    provenance = read_provenance(case_dir)
    if note and isinstance(provenance.get("export"), dict):
        raise InputError(Path(case_dir) / "provenance.json",
                         "an exported case (medsynth export) is shared with its provenance, which keeps no free "
                         "text: save the rating without a note, or review the synthetic case folder it was "
                         "exported from")
    review = {"rating": rating, "note": note,
              "reviewed_at": datetime.now(timezone.utc).replace(microsecond=0).isoformat()}
    provenance["review"] = review
    write_json(provenance, Path(case_dir) / "provenance.json", overwrite=True)
    return review
