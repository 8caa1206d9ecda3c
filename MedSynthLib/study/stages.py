"""The one cached-stage helper of ``medsynth study``.

A stage's result is a JSON file in the work folder, named by a key that hashes the
stage's inputs, its configuration and the source code of the modules that compute it
(``code_hash``), so editing the segmenter re-runs the arms and nothing else, and a
finished study re-reports instantly.  Results are written atomically.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
from pathlib import Path
from typing import Any, Callable, Sequence

from ..schema.volume_io import write_json


def code_hash(modules: Sequence[str]) -> str:
    """sha256 of the source of the named modules (``MedSynthLib.study.segmenter``, ...)."""
    digest = hashlib.sha256()
    for name in sorted(modules):
        module = importlib.import_module(name)
        digest.update(name.encode())
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()


def stage_key(inputs: Any, config: Any, modules: Sequence[str]) -> str:
    """16 hex digits naming a stage result: inputs + config + code hash of ``modules``."""
    text = json.dumps({"inputs": inputs, "config": config, "code": code_hash(modules)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_stage(path: Path, compute: Callable[[], dict[str, Any]], *, write: bool = True
                 ) -> tuple[dict[str, Any], bool]:
    """The stored result at ``path``, or ``compute()`` stored there; returns (result, computed)."""
    try:
        return json.loads(Path(path).read_text()), False
    except (OSError, ValueError):
        pass
    result = compute()
    if write:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json(result, Path(path), overwrite=True)
    return result, True


__all__ = ["code_hash", "stage_key", "cached_stage"]
