"""The content hash that names a real case: its prepared training volume, and a model's record of its training cases.

Here, below both training (which keys its cache and records its cases by it) and evaluation (which tells an
in-sample case by it), so neither imports the other.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

from ..schema.labels import SCHEMA_VERSION
from .anatomy import DEFAULT_ANATOMY_MODEL
from .readers import Case

#: Bump when the cached arrays change meaning (2: the anatomy of a case not stored LPS is derived in LPS order).
#: Add the old value to RECORDED_CACHE_VERSIONS when bumping: models keep the hashes of their training time.
CACHE_VERSION = 2

#: Every cache version a shipped or trained model's record of its cases (training.data.case_sha256) may have been
#: written with.  The record names no version, and a content hash cannot match by accident, so a case is looked for
#: under each.  1: the records of medsynth-spade27-cpu and medsynth-inpaint-brats27 (trained 2 Dec 2026, before
#: 1f4151c made it 2); the hash was otherwise the same (schema version, the default anatomy model's settings, the
#: files in name order).  Keys of version 1 written before 04be062 (27 Nov 2026) also lack the anatomy settings:
#: no model kept from then records cases, so that scheme is not looked for.
RECORDED_CACHE_VERSIONS = (1,)


def case_files_hashes(case: Case, cache_versions: Iterable[int]) -> dict[int, str]:
    """The case's content hash under each of ``cache_versions``, its files read once."""
    anatomy = json.dumps(DEFAULT_ANATOMY_MODEL.to_json(), sort_keys=True).encode()
    digests = {}
    for version in dict.fromkeys(cache_versions):
        digests[version] = hashlib.sha256(f"cache{version}-schema{SCHEMA_VERSION}".encode())
        digests[version].update(anatomy)
    for name in sorted(case.files):
        with open(case.files[name], "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                for digest in digests.values():
                    digest.update(block)
    return {version: digest.hexdigest() for version, digest in digests.items()}


def case_files_hash(case: Case) -> str:
    """The content hash of a read case's files: names its prepared volume; a model's training record keeps it."""
    return case_files_hashes(case, (CACHE_VERSION,))[CACHE_VERSION]


def recorded_case_keys(case: Case) -> list[str]:
    """Every hash under which a model's training record may list ``case``: the current key first, then the keys of
    the older schemes in :data:`RECORDED_CACHE_VERSIONS` (the files read once)."""
    return list(case_files_hashes(case, (CACHE_VERSION, *RECORDED_CACHE_VERSIONS)).values())


def in_training_record(case: Case, recorded: Iterable[str]) -> bool:
    """Whether a model's record of its training cases (``training.data.case_sha256``) lists ``case``, under the
    current key or the scheme the record was written with."""
    recorded = set(recorded)
    return bool(recorded) and any(key in recorded for key in recorded_case_keys(case))
