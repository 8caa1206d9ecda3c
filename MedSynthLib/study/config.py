"""The study configuration: typed, and validated before anything is written.

``load_config`` reads a shipped config (``Resources/configs/study_NAME.json``) or a JSON
file; ``StudyConfig.from_json`` checks every option (unknown keys, ranges, the GAN's
``TrainConfig``, the segmenter's ``SegConfig``, the synthetic edits) and raises
:class:`InputError` naming the file, so a bad config fails before the study starts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..schema.errors import InputError
from .data import SYNTHETIC_KINDS
from .segmenter import SegConfig

CONFIG_NAMES = ("micro", "tiny", "cpu", "paper")


def configs_root() -> Path:
    return Path(__file__).resolve().parents[2] / "Resources" / "configs"


# --- configuration -----------------------------------------------------------------------------


@dataclass
class StudyConfig:
    """Everything that defines a study (stored in report.json)."""

    name: str = "custom"
    description: str = ""
    seed: int = 2018
    threads: int | None = None
    folds: int = 5
    test_cases: list[str] | None = None  # a fixed split: these cases are held out (one fold)
    grid: dict[str, Any] = field(default_factory=lambda: {"spacing_mm": 2.0, "margin_mm": 6.0, "size_multiple": 8,
                                                          "box_mm": None})
    gan: dict[str, Any] = field(default_factory=dict)  # a TrainConfig (val_cases is always emptied)
    gan_model: str | None = None  # reuse a trained model instead ("{fold}" is replaced by the fold number)
    synthetic: dict[str, Any] = field(default_factory=lambda: {"per_case": 2, "kinds": ["transform", "insert",
                                                                                        "template"]})
    extra_label_convention: str = "brats2021"
    segmenter: dict[str, Any] = field(default_factory=dict)
    bootstrap: int = 10000
    ci: float = 0.95
    memorisation: dict[str, Any] = field(default_factory=lambda: {"max_real_pairs": 2000})
    preload: bool = True

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str) -> "StudyConfig":
        from ..schema.labels import CONVENTIONS
        from ..training.train import TrainConfig

        from ..schema.jsonshape import check_fields, check_range, expect_object

        if not isinstance(data, dict):
            raise InputError(source, "a study config is a JSON object")
        check_fields(cls, data, source, "study")
        for key in ("gan", "synthetic", "segmenter", "memorisation"):
            if key in data:
                expect_object(data[key], source, f"study option {key!r}")
        config = cls(**data)
        check_range(source, "seed", config.seed, 0, 2 ** 32 - 1)
        if int(config.folds) < 2 and not config.test_cases:
            raise InputError(source, f"folds must be at least 2, got {config.folds}")
        grid = dict(cls().grid, **config.grid)
        if set(grid) - {"spacing_mm", "margin_mm", "size_multiple", "box_mm"}:
            raise InputError(source, f"unknown grid options {sorted(set(grid) - set(cls().grid))}")
        config.grid = _checked_grid(grid, source)
        TrainConfig.from_json(dict(config.gan, val_cases=[]), source)  # validates
        SegConfig.from_json(config.segmenter, source)
        config.synthetic = _checked_synthetic(config.synthetic, source)
        config.memorisation = _checked_memorisation(config.memorisation, source)
        if config.threads is not None:
            check_range(source, "threads", config.threads, 1, 4096)
        if config.extra_label_convention not in CONVENTIONS:
            raise InputError(source, f"unknown extra_label_convention {config.extra_label_convention!r}")
        if not 0 < config.ci < 1 or config.bootstrap < 100:
            raise InputError(source, "ci must lie in (0, 1) and bootstrap be at least 100")
        check_range(source, "bootstrap", config.bootstrap, 100, MAX_BOOTSTRAP)
        return config

    def with_options(self, options: dict[str, Any], source: str) -> "StudyConfig":
        """A copy with ``options`` set (the command line's ``--threads``, ...), checked as a config file's own values
        are: a value the file could not hold is refused in an :class:`InputError` naming ``source``."""
        return type(self).from_json({**self.to_json(), **options}, source)

    @property
    def train_config(self):
        from ..training.train import TrainConfig

        data = dict(self.gan, val_cases=[])
        if self.threads and not data.get("threads"):
            data["threads"] = self.threads
        return TrainConfig.from_json(data, "study config")

    @property
    def seg_config(self) -> SegConfig:
        return SegConfig.from_json(self.segmenter, "study config")


def load_config(name_or_path: str | os.PathLike[str] | None) -> StudyConfig:
    """``micro``, ``tiny``, ``paper`` (shipped in Resources/configs) or a JSON file."""
    text = os.fspath(name_or_path) if name_or_path is not None else "tiny"
    path = configs_root() / f"study_{text}.json" if text in CONFIG_NAMES else Path(text)
    if not path.is_file():
        raise InputError(path, f"study config not found (give {', '.join(CONFIG_NAMES)} or a JSON file)")
    from ..schema.jsonshape import read_json

    data = read_json(path, "study config")
    data.pop("$comment", None)
    config = StudyConfig.from_json(data, str(path))
    if text in CONFIG_NAMES:
        config.name = text
    return config


__all__ = ["CONFIG_NAMES", "StudyConfig", "configs_root", "load_config"]


# The study grid: every case is resampled onto it and kept in memory, so its spacing is bounded; a brain
# box of up to 256 mm at the finest spacing has (256 / 0.5)^3 = 134 M voxels per case (checked against
# the memory budget once the box is known).
MIN_STUDY_SPACING_MM = 0.5
MAX_STUDY_SPACING_MM = 10.0


def _checked_grid(grid: dict[str, Any], source: str) -> dict[str, Any]:
    """Types and ranges of the study grid's options."""
    from ..schema.jsonshape import check_range

    def number(key: str) -> float:
        value = grid[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(source, f"grid {key} must be a number, not {json.dumps(value)[:40]}")
        return float(value)

    check_range(source, "grid spacing_mm", number("spacing_mm"), MIN_STUDY_SPACING_MM, MAX_STUDY_SPACING_MM)
    check_range(source, "grid margin_mm", number("margin_mm"), 0, 100)
    if isinstance(grid["size_multiple"], bool) or not isinstance(grid["size_multiple"], int):
        raise InputError(source, "grid size_multiple must be a whole number")
    check_range(source, "grid size_multiple", grid["size_multiple"], 1, 64)
    box = grid.get("box_mm")
    if box is not None:
        if not (isinstance(box, list) and len(box) == 3 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
            raise InputError(source, "grid box_mm must be null or three numbers (mm)")
        for value in box:
            check_range(source, "grid box_mm", float(value), 1, 1000)
    return grid


# --- the nested sections ------------------------------------------------------------------------------

#: The bootstrap's resamples per interval (scipy keeps them in memory: 10^6 of a few dozen cases is ~1 GB).
MAX_BOOTSTRAP = 1_000_000
#: Synthetic label maps per training case: each is synthesized, kept and trained on in two arms.
MAX_PER_CASE = 100
#: What the study reads when an option is left out (``make_synthetic_labelmaps``, the synthesis engine);
#: filled in so that every reader sees the same value (``kinds`` left out trained on "template" cases without
#: ever preparing the template).
SYNTHETIC_DEFAULTS: dict[str, Any] = {"per_case": 1, "kinds": ["transform", "insert", "template"], "precision": "fp32"}
MEMORISATION_DEFAULTS: dict[str, Any] = {"max_real_pairs": 2000}
#: Edit options the study sets itself for each kind (``transform``: never parametric; ``parametric``: always).
EDIT_SET_BY_KIND = ("p_parametric",)


def _shown(value: Any) -> str:
    return json.dumps(value)[:60]


def _whole_number(value: Any, source: str, path: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(source, f"{path} must be a whole number in [{low}, {high}], not {_shown(value)}")
    if not low <= value <= high:
        raise InputError(source, f"{path} = {value} is outside [{low}, {high}]")
    return value


def _unknown(section: dict[str, Any], known: Any, source: str, path: str) -> None:
    unknown = sorted(set(section) - set(known))
    if unknown:
        raise InputError(source, f"unknown option {path}.{unknown[0]} (known: {', '.join(sorted(known))})")


def _checked_synthetic(synthetic: dict[str, Any], source: str) -> dict[str, Any]:
    """Every option of ``synthetic`` (types, ranges, allowed values, unknown keys), the defaults filled in."""
    import dataclasses

    from ..edits import RandomTumourEdit
    from ..schema.errors import EditError
    from ..schema.jsonshape import matches_annotation
    from ..synthesis.inference import PRECISIONS

    _unknown(synthetic, ("per_case", "kinds", "edit", "precision"), source, "synthetic")
    synthetic = dict(SYNTHETIC_DEFAULTS, **synthetic)
    _whole_number(synthetic["per_case"], source, "synthetic.per_case", 1, MAX_PER_CASE)
    kinds = synthetic["kinds"]
    if not isinstance(kinds, list) or not kinds or not all(isinstance(k, str) for k in kinds):
        raise InputError(source, f"synthetic.kinds must be a non-empty list of {', '.join(SYNTHETIC_KINDS)}, "
                                 f"not {_shown(kinds)}")
    bad = [k for k in kinds if k not in SYNTHETIC_KINDS]
    if bad:
        raise InputError(source, f"synthetic.kinds {bad[0]!r}: choose from {', '.join(SYNTHETIC_KINDS)}")
    precisions = ("auto",) + tuple(PRECISIONS)
    if not isinstance(synthetic["precision"], str) or synthetic["precision"] not in precisions:
        raise InputError(source, f"synthetic.precision {_shown(synthetic['precision'])}: choose from "
                                 f"{', '.join(precisions)}")
    if "edit" in synthetic:
        edit = synthetic["edit"]
        if not isinstance(edit, dict):
            raise InputError(source, f"synthetic.edit must be a JSON object, not {_shown(edit)}")
        fields = {f.name: f for f in dataclasses.fields(RandomTumourEdit)}
        _unknown(edit, fields, source, "synthetic.edit")
        for key in EDIT_SET_BY_KIND:
            if key in edit:
                raise InputError(source, f"synthetic.edit.{key} must not be given: each kind sets it (transform 0, "
                                         "parametric 1), so choose the kinds instead")
        for key, value in edit.items():
            annotation = str(fields[key].type)
            if not matches_annotation(value, annotation):
                raise InputError(source, f"synthetic.edit.{key}: expected {annotation}, got {_shown(value)}")
            try:
                RandomTumourEdit(**{key: tuple(value) if isinstance(value, list) else value})
            except EditError as exc:
                raise InputError(source, f"synthetic.edit.{key}: {exc}") from None
        try:
            RandomTumourEdit(**edit)
        except (EditError, TypeError) as exc:
            raise InputError(source, f"synthetic.edit: {exc}") from None
    return synthetic


def _checked_memorisation(memorisation: dict[str, Any], source: str) -> dict[str, Any]:
    """Every option of ``memorisation``, the defaults filled in."""
    _unknown(memorisation, MEMORISATION_DEFAULTS, source, "memorisation")
    memorisation = dict(MEMORISATION_DEFAULTS, **memorisation)
    _whole_number(memorisation["max_real_pairs"], source, "memorisation.max_real_pairs", 1, 10 ** 9)
    return memorisation
