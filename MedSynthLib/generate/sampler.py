"""The sampler config and the draw of case i's label map.

A config (JSON) gives the probability of each kind of case and the ranges of its edits::

    {"kinds": {"transform": 0.25, "insert_brain": 0.35, "insert_template": 0.2, "parametric": 0.2},
     "transform": {"translate_mm": 20, "rotate_deg": 30, "scale_range": [0.7, 1.3],
                   "p_flip": 0.5, "flip_about": "tumour"},
     "p_transform_after_insert": 1.0,
     "parametric": {"radius_fraction": [0.08, 0.2], "p_template": 0.5},
     "max_tries": 10}

* ``transform``: a real case's own tumour moved, rotated, scaled, flipped;
* ``insert_brain``: a real tumour (another case's or a tumour-only label map's) inserted into a
  real case's brain, then transformed with probability ``p_transform_after_insert``;
* ``insert_template``: the same into the healthy template;
* ``parametric``: a new parametric tumour, in the template with probability ``p_template``.

The config is checked completely (:func:`load_config`) before anything is written.  Case i
draws from ``numpy.random.SeedSequence(seed, spawn_key=(i,))`` (the i-th child that
``SeedSequence(seed).spawn`` would give), so it is the same whatever the number of workers;
random edits draw their parameters and then call the deterministic edits of
:mod:`MedSynthLib.edits`, whose records in the label map's history replay the case exactly
(:func:`replay_case`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..schema.errors import EditError, MedSynthError
from ..schema.grid import Grid, LabelMap, lps_to_ras
from ..schema.labels import Label
from .sources import Source, load_source

KINDS = ("transform", "insert_brain", "insert_template", "parametric")

DEFAULT_CONFIG: dict[str, Any] = {
    "kinds": {"transform": 0.25, "insert_brain": 0.35, "insert_template": 0.2, "parametric": 0.2},
    "transform": {"translate_mm": 20.0, "rotate_deg": 30.0, "scale_range": [0.7, 1.3], "p_flip": 0.5,
                  "flip_about": "tumour"},
    "p_transform_after_insert": 1.0,
    "parametric": {"radius_fraction": [0.08, 0.2], "p_template": 0.5},
    "max_tries": 10,
}

_TRANSFORM_KEYS = {"translate_mm", "rotate_deg", "scale_range", "p_flip", "flip_about"}
_PARAMETRIC_KEYS = {"radius_fraction", "p_template"}


class ConfigError(MedSynthError):
    """A sampler config that cannot be used (one line: the file and the problem)."""


def _number(value: Any, where: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a number, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{where} must lie in [{lo:g}, {hi:g}], got {value!r}")
    return float(value)


def _range(value: Any, where: str, lo: float, hi: float) -> list[float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"{where} must be [low, high], got {value!r}")
    a, b = (_number(v, where, lo, hi) for v in value)
    if a > b:
        raise ValueError(f"{where} low {a:g} is above high {b:g}")
    return [a, b]


def _known(section: Mapping[str, Any], keys: set[str], where: str) -> None:
    if not isinstance(section, Mapping):
        raise ValueError(f"{where} must be an object, got {section!r}")
    unknown = sorted(set(section) - keys)
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(keys))})")


def validate_config(raw: Any) -> dict[str, Any]:
    """The complete config (defaults filled in), or ``ValueError`` naming the first problem."""
    if not isinstance(raw, Mapping):
        raise ValueError("the sampler config must be a JSON object")
    _known(raw, set(DEFAULT_CONFIG), "config")
    config = copy.deepcopy(DEFAULT_CONFIG)
    if "kinds" in raw:
        _known(raw["kinds"], set(KINDS), "kinds")
        config["kinds"] = {k: _number(v, f"kinds.{k}", 0.0, 1e6) for k, v in raw["kinds"].items()}
    if sum(config["kinds"].values()) <= 0:
        raise ValueError("kinds: at least one kind needs a probability above 0")
    transform = dict(raw.get("transform", {}))
    _known(transform, _TRANSFORM_KEYS, "transform")
    t = config["transform"]
    for key, lo, hi in (("translate_mm", 0.0, 500.0), ("rotate_deg", 0.0, 180.0), ("p_flip", 0.0, 1.0)):
        if key in transform:
            t[key] = _number(transform[key], f"transform.{key}", lo, hi)
    if "scale_range" in transform:
        t["scale_range"] = _range(transform["scale_range"], "transform.scale_range", 0.05, 20.0)
    if "flip_about" in transform:
        if transform["flip_about"] not in ("tumour", "brain"):
            raise ValueError(f"transform.flip_about must be 'tumour' or 'brain', got {transform['flip_about']!r}")
        t["flip_about"] = transform["flip_about"]
    if "p_transform_after_insert" in raw:
        config["p_transform_after_insert"] = _number(raw["p_transform_after_insert"], "p_transform_after_insert",
                                                     0.0, 1.0)
    parametric = dict(raw.get("parametric", {}))
    _known(parametric, _PARAMETRIC_KEYS, "parametric")
    if "radius_fraction" in parametric:
        config["parametric"]["radius_fraction"] = _range(parametric["radius_fraction"], "parametric.radius_fraction",
                                                         0.01, 1.0)
    if "p_template" in parametric:
        config["parametric"]["p_template"] = _number(parametric["p_template"], "parametric.p_template", 0.0, 1.0)
    if "max_tries" in raw:
        tries = raw["max_tries"]
        if isinstance(tries, bool) or not isinstance(tries, int) or not 1 <= tries <= 100:
            raise ValueError(f"max_tries must be an integer in [1, 100], got {tries!r}")
        config["max_tries"] = tries
    return config


def load_config(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """Read and validate a sampler config file (``None``: the defaults).

    Raises:
        ConfigError: unreadable JSON or any invalid entry, as one line naming the file.
    """
    if path is None:
        return copy.deepcopy(DEFAULT_CONFIG)
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the sampler config ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    try:
        return validate_config(raw)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def check_config_fits_sources(config: dict[str, Any], sources: Sequence[Source], where: str,
                              drop_unavailable: bool = False) -> dict[str, Any]:
    """Refuse a config that asks for a kind of case the sources cannot give.

    With ``drop_unavailable`` (the built-in default config) such kinds are switched off instead.
    Returns the config (a copy when changed).
    """
    brains = [s for s in sources if s.kind == "case"]
    tumours = [s for s in sources if s.has_tumour]
    template = any(s.kind == "template" for s in sources)
    needs = {
        "transform": (bool([s for s in brains if s.has_tumour]), "a real case with a tumour (--labels-from)"),
        "insert_brain": (bool(brains) and len(tumours) >= 1 and _insert_pairs_exist(brains, tumours),
                         "a real case and a tumour of another patient (--labels-from)"),
        "insert_template": (template and bool(tumours), "--template and a real tumour (--labels-from)"),
        "parametric": (template or bool(brains), "a brain (--labels-from cases or --template)"),
    }
    config = copy.deepcopy(config)
    for kind, weight in config["kinds"].items():
        ok, what = needs[kind]
        if weight > 0 and not ok:
            if not drop_unavailable:
                raise ConfigError(f"{where}: kind {kind!r} has probability {weight:g} but needs {what}")
            config["kinds"][kind] = 0.0
    if sum(config["kinds"].values()) <= 0:
        raise ConfigError(f"{where}: no kind of case can be made from these sources")
    return config


def _same_patient(a: Source, b: Source) -> bool:
    return a.source_id == b.source_id or (a.tumour_sha256 is not None and a.tumour_sha256 == b.tumour_sha256)


def _insert_pairs_exist(brains: Sequence[Source], tumours: Sequence[Source]) -> bool:
    return any(not _same_patient(b, t) for b in brains for t in tumours)


@dataclass
class Sources:
    """The sources of a run, sorted by content hash (the draw must depend neither on folder listing order nor on
    the key of the dataset's source ids)."""

    all: list[Source]

    def __post_init__(self) -> None:
        self.all = sorted(self.all, key=lambda s: s.sort_key or s.source_id)
        self.by_id = {s.source_id: s for s in self.all}
        self.cases = [s for s in self.all if s.kind == "case"]
        self.cases_with_tumour = [s for s in self.cases if s.has_tumour]
        self.tumours = [s for s in self.all if s.has_tumour]
        self.template = next((s for s in self.all if s.kind == "template"), None)

    def placement_brain(self, tumour: Source) -> Source | None:
        """For a tumour-only label map: the first real case on its grid (its brain box places the tumour)."""
        if tumour.kind != "tumour":
            return None
        return next((c for c in self.cases if c.output_grid == tumour.grid), None)


def case_rng(seed: int, index: int) -> np.random.Generator:
    """Case ``index``'s generator: the ``index``-th spawned child of ``SeedSequence(seed)``."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(int(index),)))


def _random_edit(config: dict[str, Any], parametric: bool):
    from ..edits import RandomTumourEdit

    t = config["transform"]
    return RandomTumourEdit(translate_mm=t["translate_mm"], rotate_deg=t["rotate_deg"],
                            scale_range=tuple(t["scale_range"]), p_flip=t["p_flip"], flip_about=t["flip_about"],
                            p_parametric=1.0 if parametric else 0.0,
                            radius_fraction=tuple(config["parametric"]["radius_fraction"]), max_tries=1)


def tumour_source_map(tumour: Source, placement: Source | None) -> LabelMap:
    """The label map an insertion reads its tumour from.

    A tumour-only label map is given the brain of ``placement`` (a real case on its grid)
    so that :class:`~MedSynthLib.edits.InsertTumour` places it at the same relative position
    inside the target brain as in its own; the tumour voxels are the file's own.
    """
    if placement is None:
        return load_source(tumour)
    cached = _placed_tumour_file(tumour, placement)
    if cached is not None and cached.exists():
        # Memory-mapped: the pages are shared by every worker through the page cache.
        return LabelMap(np.load(cached, mmap_mode="r"), Grid.from_json(tumour.grid), [])
    source = load_source(tumour)
    brain = placement.to_full(load_source(placement).array) > Label.BACKGROUND
    array = np.where(source.array >= Label.NCR, source.array, np.where(brain, Label.WM, 0)).astype(np.uint8)
    if cached is not None:
        from .sources import _save_npy

        _save_npy(array, cached)  # atomic: another worker may write the same file at the same time
    return LabelMap(array, source.grid, [])


def _placed_tumour_file(tumour: Source, placement: Source) -> Path | None:
    """Beside the tumour's cached array: the map with its placement brain (building one reads two
    full volumes, 0.15-0.2 s of CPU; reading it back memory-mapped costs almost nothing)."""
    if tumour.cache_file is None or placement.cache_file is None:
        return None
    # The placement's cache file name carries its anatomy key: a new anatomy model gives a new file.
    brain_key = hashlib.sha256(Path(placement.cache_file).name.encode()).hexdigest()[:16]
    return Path(tumour.cache_file).with_name(f"{Path(tumour.cache_file).stem}-placed-{brain_key}.npy")


def _random_wm_centre(labelmap: LabelMap, rng: np.random.Generator) -> tuple[float, float, float]:
    candidates = np.flatnonzero(labelmap.array == Label.WM)
    if candidates.size == 0:
        candidates = np.flatnonzero(labelmap.array > Label.BACKGROUND)
    kji = np.array(np.unravel_index(candidates[rng.integers(candidates.size)], labelmap.array.shape), float)
    return tuple(float(v) for v in lps_to_ras(labelmap.grid.index_to_lps(kji[::-1])))  # type: ignore[return-value]


def _pick(items: Sequence[Source], rng: np.random.Generator) -> Source:
    return items[int(rng.integers(len(items)))]


def _draw_once(kind: str, config: dict[str, Any], sources: Sources, rng: np.random.Generator
               ) -> tuple[LabelMap, dict[str, Any]]:
    from ..edits import InsertTumour, tumour_centre

    edit_seed = int(rng.integers(2**31 - 1))
    info: dict[str, Any] = {"kind": kind, "base": None, "tumour_source": None, "placement_brain": None,
                            "edit_seed": edit_seed}
    if kind == "transform":
        base = _pick(sources.cases_with_tumour, rng)
        info.update(base=base.source_id, tumour_source=base.source_id)
        return _random_edit(config, False)(load_source(base), edit_seed), info
    if kind == "parametric":
        use_template = sources.template is not None and (
            not sources.cases or rng.random() < config["parametric"]["p_template"])
        base = sources.template if use_template else _pick(sources.cases, rng)
        assert base is not None
        info.update(base=base.source_id)
        return _random_edit(config, True)(load_source(base), edit_seed), info
    # insert_brain / insert_template
    if kind == "insert_template":
        assert sources.template is not None
        base = sources.template
        tumour = _pick(sources.tumours, rng)
    else:
        base = _pick(sources.cases, rng)
        others = [t for t in sources.tumours if not _same_patient(base, t)]
        if not others:
            raise EditError("no tumour of another patient to insert into this brain")
        tumour = _pick(others, rng)
    target = load_source(base)
    placement = sources.placement_brain(tumour)
    source_map = tumour_source_map(tumour, placement)
    centre = None
    if tumour.kind == "tumour" and placement is None:
        centre = _random_wm_centre(target, rng)  # no brain to place it relative to: a random white-matter point
    info.update(base=base.source_id, tumour_source=tumour.source_id,
                placement_brain=None if placement is None else placement.source_id)
    edited = InsertTumour(centre_ras_mm=centre, source=tumour.source_id)(target, source_map)
    tumour_centre(edited)  # raises EditError when nothing of the tumour is left
    if rng.random() < config["p_transform_after_insert"]:
        edited = _random_edit(config, False)(edited, edit_seed)
    return edited, info


def draw_case(index: int, seed: int, config: dict[str, Any], sources: Sources) -> tuple[LabelMap, dict[str, Any]]:
    """Case ``index``'s label map and its generation record (replayable, see :func:`replay_case`).

    A draw that cannot be carried out (a tumour pushed out of the brain, ...) is drawn again
    from the same generator, up to ``max_tries`` times; the record's notes say why.

    Raises:
        EditError: no valid draw in ``max_tries``.
    """
    kinds = [k for k in KINDS if config["kinds"].get(k, 0.0) > 0]
    weights = np.array([config["kinds"][k] for k in kinds], float)
    weights /= weights.sum()
    rng = case_rng(seed, index)
    notes: list[str] = []
    for attempt in range(config["max_tries"]):
        kind = kinds[int(rng.choice(len(kinds), p=weights))]
        try:
            labelmap, info = _draw_once(kind, config, sources, rng)
        except EditError as exc:
            notes.append(f"attempt {attempt} ({kind}): {exc}")
            continue
        record = {"index": index, "seed": int(seed), "attempt": attempt, **info, "notes": notes,
                  "edits": labelmap.history}
        return labelmap, record
    raise EditError(f"case {index}: no valid draw in {config['max_tries']} tries (last: {notes[-1]})")


def replay_case(record: Mapping[str, Any], sources: Sources) -> LabelMap:
    """Rebuild a generated label map from its record: the base, the tumour source and the edits."""
    from ..edits import replay

    base = load_source(sources.by_id[record["base"]])
    inserts: dict[str, LabelMap] = {}
    if record.get("tumour_source") and record["tumour_source"] != record["base"]:
        placement = sources.by_id.get(record.get("placement_brain") or "")
        inserts[record["tumour_source"]] = tumour_source_map(sources.by_id[record["tumour_source"]], placement)
    return replay(base, record["edits"], inserts)


def privacy(record: Mapping[str, Any], labelmap: LabelMap, sources: Sources) -> dict[str, Any]:
    """How close a generated case stays to the real patients it came from.

    The measures are the label map's own privacy record
    (:class:`~MedSynthLib.schema.provenance.PrivacyRecord`), started by :func:`.sources.load_source`
    and updated by every edit as it was made: ``anatomy`` (patient or template),
    ``brain_dice_to_source`` and ``tumour_dice_to_source`` (against the patient whose brain it is
    and that patient's own tumour), ``tumour_origin``, and ``anonymous`` with its ``reason`` (the
    record's rule, which ``medsynth export --anonymous`` applies too: only a parametric tumour in
    the template).  Added from the generation record, without measuring anything:
    ``derived_from_patient``, ``brain_from_patient``, ``tumour_from_patient`` and
    ``patients_own_tumour`` (the tumour source is the base patient, also when it arrives from two
    folders).
    """
    from ..schema.provenance import privacy_of

    base = sources.by_id[record["base"]]
    tumour = sources.by_id.get(record.get("tumour_source") or "")
    measured = privacy_of(labelmap)
    anonymous, reason = measured.anonymous()
    return {"derived_from_patient": base.is_patient or (tumour is not None and tumour.is_patient),
            "brain_from_patient": base.is_patient, "tumour_from_patient": tumour is not None and tumour.is_patient,
            "patients_own_tumour": tumour is not None and _same_patient(base, tumour),
            **measured.to_json(), "anonymous": anonymous, "reason": reason}
