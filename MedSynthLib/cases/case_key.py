"""The content hash that names a real case: its prepared training volume, and a model's record of its training cases.

Here, below both training (which keys its cache and records its cases by it) and evaluation (which tells an
in-sample case by it), so neither imports the other.
"""

from __future__ import annotations

import hashlib
import json

from ..schema.labels import SCHEMA_VERSION
from .anatomy import DEFAULT_ANATOMY_MODEL
from .readers import Case

#: Bump when the cached arrays change meaning (2: the anatomy of a case not stored LPS is derived in LPS order).
CACHE_VERSION = 2


def case_files_hash(case: Case) -> str:
    """The content hash of a read case's files: names its prepared volume; a model's training record keeps it."""
    digest = hashlib.sha256(f"cache{CACHE_VERSION}-schema{SCHEMA_VERSION}".encode())
    digest.update(json.dumps(DEFAULT_ANATOMY_MODEL.to_json(), sort_keys=True).encode())
    for name in sorted(case.files):
        with open(case.files[name], "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
