"""One provenance record that flows from label map to edit to synthesis to export.

A label map written by MedSynth carries a JSON sidecar (``labels.nii.gz`` ->
``labels.json``) with the schema version and the ordered history of the steps
that made it: how its anatomy was derived and every tumour edit with its exact
parameters, so the map can be replayed.  Records never hold file paths or
source-patient identifiers.
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from .labels import SCHEMA_VERSION


def sidecar_path(image_path: str | Path) -> Path:
    """``out/labels.nii.gz`` -> ``out/labels.json``."""
    from .volume_io import strip_image_suffix

    path = Path(image_path)
    return path.with_name(strip_image_suffix(path.name) + ".json")


def array_sha256(array: np.ndarray) -> str:
    """Content hash of a label map (shape, dtype and voxels)."""
    digest = hashlib.sha256()
    digest.update(str((array.shape, array.dtype.str)).encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def software_versions() -> dict[str, str]:
    import importlib.metadata as metadata

    versions = {"medsynth": __version__, "python": platform.python_version()}
    for package in ("numpy", "scipy", "SimpleITK", "torch", "monai", "nilearn"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def label_map_record(history: list[dict[str, Any]], array: np.ndarray) -> dict[str, Any]:
    """The sidecar written beside a label map."""
    return {
        "kind": "medsynth-label-map",
        "schema_version": SCHEMA_VERSION,
        "labels_sha256": array_sha256(array),
        "history": history,
        "software": software_versions(),
    }
