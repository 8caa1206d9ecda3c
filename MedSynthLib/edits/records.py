"""Edit records back into edits, and a whole history replayed from them.

A record is ``{"name", "params", "schema_version"}`` (:meth:`~MedSynthLib.edits.base.Edit.to_record`).
Records written before a parameter was renamed are still read (``Edit.renamed_params``):
the British spelling ``centre_ras_mm`` replaced ``center_ras_mm``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from ..schema.errors import EditError
from ..schema.jsonshape import not_an_integer
from ..schema.grid import LabelMap
from ..schema.labels import SCHEMA_VERSION
from .base import EDITS, Edit
from .insert import InsertTumour

# EDITS is filled when the package imports each edit module (MedSynthLib/edits/__init__.py).


def edit_from_record(record: Mapping[str, Any]) -> Edit:
    """Rebuild an edit from its :meth:`Edit.to_record` record.

    Raises:
        EditError: unknown edit name, another schema version, or bad parameters.
    """
    try:
        name, params = record["name"], dict(record.get("params", {}))
    except (KeyError, TypeError, AttributeError):
        raise EditError(f"not an edit record: {record!r}") from None
    if name not in EDITS:
        raise EditError(f"unknown edit {name!r} (known: {', '.join(sorted(EDITS))})")
    version = record.get("schema_version", SCHEMA_VERSION)
    problem = not_an_integer(version)  # "1", 1.0 or true: a hand-edited record
    if problem:
        raise EditError(f"edit record {name!r}: schema_version {problem}")
    if version != SCHEMA_VERSION:
        raise EditError(f"edit record has label schema version {version}, this MedSynth uses {SCHEMA_VERSION}")
    cls = EDITS[name]
    params = {cls.renamed_params.get(key, key): value for key, value in params.items()}
    known = {f.name for f in dataclasses.fields(cls)} - set(cls._unrecorded)
    unknown = sorted(set(params) - known)
    if unknown:
        raise EditError(f"edit {name!r} has no parameter(s) {', '.join(unknown)}")
    return cls(**params)


def replay(labelmap: LabelMap, records: Sequence[Mapping[str, Any]],
           sources: Mapping[str, LabelMap] | None = None, *, check_draws: bool = True) -> LabelMap:
    """Apply edit records in order.

    Args:
        labelmap: the label map to start from.
        records: edit records (e.g. the tail of an edited map's ``history``).
        sources: source label maps of :class:`~MedSynthLib.edits.insert.InsertTumour`
            records, keyed by their recorded ``source`` identifier.

    Returns:
        The edited label map (its history extended by every record).

    Raises:
        EditError: a record that cannot be applied; a
            :class:`~MedSynthLib.edits.random_edits.DrawMismatch` where a random draw's seed and options,
            drawn again on the map before it, do not draw the edits recorded after it (``check_draws``).
    """
    records = list(records)
    position = 0
    while position < len(records):
        record = records[position]
        position += 1
        edit = edit_from_record(record)
        redraw = getattr(edit, "redraw", None)  # a random draw's record (random_edits imports this module)
        if redraw is not None and check_draws:
            # The draw made again gives the drawn edits' map as well: they need not be applied a second time.
            before = len(labelmap.history)
            labelmap = redraw(labelmap, records[position:])
            position += len(labelmap.history) - before - 1  # the drawn edits' records
        elif isinstance(edit, InsertTumour):
            source = (sources or {}).get(edit.source)
            if source is None:
                raise EditError(f"replaying insert_tumour needs the source label map {edit.source!r}")
            labelmap = edit(labelmap, source)
        else:
            labelmap = edit(labelmap)
    return labelmap
