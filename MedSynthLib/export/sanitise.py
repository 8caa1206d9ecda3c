"""What may leave MedSynth: a synthetic case's provenance rebuilt from its typed record.

An export's ``provenance.json`` and the DICOM text fields are written only from a
:class:`~MedSynthLib.schema.provenance.SynthesisRecord` parsed from the case's
provenance: every field has a type (numbers, booleans, 3-vectors, hashes, versions,
strings from a closed set), fields that may name a real case (an inserted tumour's
``source``, the reviewer's free-text note) are local only, and anything else is
dropped and counted.  The model is named only when the model registry lists that name
with the same sha256 (and the same config sha256, where both record one); otherwise it is
``unregistered`` (its weights' and config's sha256 still identify it).
The CLI and the Slicer module export through this one path.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from .. import __version__
from ..schema.grid import Grid
from ..schema.provenance import PrivacyRecord, Redactions, SynthesisRecord

UNREGISTERED_MODEL = "unregistered"


def exported_model_name(name: Any, sha256: str | None, config_sha256: str | None = None) -> str:
    """The model's registry name when the registry lists it with this sha256 (and this config sha256, where the
    case and the registry both record one: a name re-registered with another config is another model), else
    ``unregistered``."""
    from ..schema.errors import MedSynthError
    from ..synthesis.models import read_registry

    if not isinstance(name, str) or sha256 is None:
        return UNREGISTERED_MODEL
    try:
        entry = read_registry().get("models", {}).get(name)
    except (MedSynthError, OSError, AttributeError):
        return UNREGISTERED_MODEL
    if not isinstance(entry, dict) or entry.get("sha256") != sha256:
        return UNREGISTERED_MODEL
    registered_config = entry.get("config_sha256")
    if config_sha256 is not None and registered_config is not None and registered_config != config_sha256:
        return UNREGISTERED_MODEL
    return name


def sanitise_provenance(raw: Mapping[str, Any], grid: Grid,
                        privacy: PrivacyRecord | None = None) -> tuple[dict[str, Any], int]:
    """Rebuild a synthetic case's provenance from its typed record (see the module docstring).

    Args:
        raw: the case's ``provenance.json``.
        grid: the case's grid (written instead of the recorded one).
        privacy: the privacy the export judged (:func:`~MedSynthLib.export.package.read_synthetic_case`: the
            recorded one, or the history's where that is stricter or nothing was recorded); without it, ``raw``'s.

    Returns:
        The clean provenance and the number of fields removed.
    """
    redacted = Redactions()
    record = SynthesisRecord.from_json(raw, redacted)
    out = record.to_json(for_export=True)
    for step in record.edits:  # local-only fields (a source case's name) are removed, and counted
        if step.params is not None:
            redacted.drop(sum(1 for name in step.params.local_only if getattr(step.params, name) is not None))
    if record.inpainting is not None:  # the hashes of the patient's case and of the map before the edit
        redacted.drop(sum(1 for name in record.inpainting.local_only if getattr(record.inpainting, name) is not None))
    if record.review is not None and record.review.note:
        redacted.drop()
    name = exported_model_name(record.model.name, record.model.sha256, record.model.config_sha256)
    if name == UNREGISTERED_MODEL and record.model.name is not None:
        redacted.drop()
    # The config's checksum names no one and is needed to make the case again: it leaves with the weights'.
    out["model"] = {"name": name, "sha256": record.model.sha256}
    if record.model.config_sha256 is not None:
        out["model"]["config_sha256"] = record.model.config_sha256
    out["grid"] = grid.to_json()
    privacy = privacy or record.privacy or PrivacyRecord()
    out["privacy"] = dict(privacy.to_json(), anonymous=privacy.anonymous()[0])
    return out, redacted.count


def exported_privacy(provenance: Mapping[str, Any]) -> PrivacyRecord:
    """The privacy record of sanitised provenance (:func:`sanitise_provenance` writes it with ``anonymous``)."""
    raw = provenance.get("privacy")
    record = PrivacyRecord.from_json({k: v for k, v in raw.items() if k != "anonymous"}) if isinstance(raw, dict) \
        else None
    return record or PrivacyRecord()


def label_map_source(privacy: PrivacyRecord) -> str:
    """What of a real patient a label map that is not anonymous carries, to follow "a label map whose ..."."""
    real_tumour = privacy.tumour_origin == "patient"
    maybe_tumour = privacy.tumour_origin in ("inserted", "segmentation", "mixed", "unknown")
    if privacy.anatomy == "patient":
        if real_tumour:
            return "brain anatomy and tumour are a real patient's"
        return "brain anatomy is a real patient's" + (" (its tumour may be too)" if maybe_tumour else "")
    if privacy.anatomy == "unknown":
        return "source is unknown: its brain anatomy and tumour may be a real patient's"
    if real_tumour:
        return "tumour is a real patient's"
    if maybe_tumour:
        return "tumour may be a real patient's"
    return "anatomy or tumour may be a real patient's"  # a record judged not anonymous on a measure alone


def provenance_summary(provenance: Mapping[str, Any], *, limit: int = 10240, with_params: bool = True) -> str:
    """One paragraph for DICOM text fields (Image Comments, Contribution Description), from sanitised provenance."""
    model = provenance.get("model", {})
    sha = model.get("sha256") or "unknown"
    edits = []
    for record in provenance.get("edits", []):
        params = record.get("params", {})
        if with_params and params:
            edits.append(f"{record['name']} {json.dumps(params, separators=(',', ':'), sort_keys=True)}")
        else:
            edits.append(record["name"])
    privacy = exported_privacy(provenance)
    if provenance.get("inpainting"):
        opening = (f"PARTLY SYNTHETIC IMAGE of a real patient: a region re-rendered by MedSynth {__version__} from an "
                   "edited label map (synthetic_mask), every other voxel the patient's scan. ")
    elif privacy.anonymous()[0]:
        opening = f"SYNTHETIC IMAGE, not a real patient: generated by MedSynth {__version__} from a label map. "
    else:
        opening = (f"SYNTHETIC IMAGE, NOT anonymous: generated by MedSynth {__version__} from a label map whose "
                   f"{label_map_source(privacy)}, which can identify that patient. ")
    text = (opening
            + f"{privacy.statement()} "
            f"Model {model.get('name')} sha256 {sha}; seed {provenance.get('seed')}; "
            f"labels sha256 {provenance.get('labels_sha256')}; edits: {'; '.join(edits) or 'none'}.")
    if len(text) > limit:
        text = text[: limit - 4] + " ..."
    return text


__all__ = ["sanitise_provenance", "provenance_summary", "exported_model_name", "exported_privacy", "label_map_source",
           "UNREGISTERED_MODEL"]
