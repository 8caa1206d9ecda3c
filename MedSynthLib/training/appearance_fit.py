"""Fit the appearance prior of a trained model that has none (``medsynth appearance``).

Training fits it at export (``appearance_patches``); models trained before that carry none and synthesis
draws their codes from a standard normal. This gives such a model the prior its own export would have
fitted: the same training cases (checked against the content hashes the model records), the same patch
sampler and augmentation, the same patch seed. The weights are copied byte for byte; only ``config.json``
gains the ``"appearance"`` record and the command in ``training.commands``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..schema.errors import InputError
from ..synthesis.models import CONFIG_NAME, ModelCard, load_generator, resolve_model, write_model_copy


def refit_appearance(model: str | os.PathLike[str], data: list[Path], output: Path, *, patches: int | None = None,
                     cache_dir: Path | None = None, device: str = "cpu", overwrite: bool = False, command: str = "",
                     progress: bool = True) -> ModelCard:
    """Write a copy of ``model`` whose config records the appearance prior fitted on its training cases.

    Args:
        model: a registered name or a model folder, with an appearance code.
        data: the folders (case folders or prepared sets) holding the model's training cases.
        output: the new model folder (refused if it exists, unless ``overwrite``).
        patches: training patches to encode (default: the model's ``appearance_patches``, else 1000).
        cache_dir: where case folders are prepared (default: a temporary folder; prepared sets need none).
        device: where the encoder runs.
        command: recorded in the copy's ``training.commands``.
    """
    import dataclasses
    import tempfile

    import torch

    from ..cases.case_key import recorded_case_keys
    from ..cases.readers import read_case
    from ..schema.volume_io import check_writable
    from .data import cases_by_name, find_case_sources
    from .train import TrainConfig, _load_volume, fit_export_appearance, patch_sampler

    card = resolve_model(model)
    if not card.network.has_style:
        raise InputError(card.path, f"model {card.name} has no appearance code (style_dim 0): its seed draws nothing")
    training = card.config.get("training")
    if not isinstance(training, dict) or not isinstance(training.get("config"), dict):
        raise InputError(card.path / CONFIG_NAME, "model config records no training configuration")
    config = TrainConfig.from_json(training["config"], str(card.path / CONFIG_NAME))
    recorded = (training.get("data") or {}).get("case_sha256")
    if not isinstance(recorded, list) or not recorded:
        raise InputError(card.path / CONFIG_NAME, "model config records no training cases (a shared model?): the "
                                                  "prior must come from the cases it was trained on")
    count = patches if patches is not None else (config.appearance_patches or 1000)
    if count < 2:
        raise ValueError(f"patches {count}: at least 2 are needed for a covariance")
    check_writable([output], overwrite, inputs=list(data) + [card.path])

    label = " ".join(str(root) for root in data)
    sources = cases_by_name([s for root in data for s in find_case_sources(root, config.normalization)])
    # Each case under every key the record may name it by (a model trained before the cache version last changed
    # records the older scheme's), with the current key its prepared volume is cached under.  A prepared set records
    # the current key only: its scans, which an older key hashes, are not in it.
    by_key: dict[str, tuple[Any, str]] = {}
    for source in sources.values():
        keys = [source.key] if source.key is not None else recorded_case_keys(
            read_case(source.origin, require_segmentation=True))
        by_key.update((key, (source, keys[0])) for key in keys)
    missing = [key for key in recorded if key not in by_key]
    if missing:
        raise InputError(label, f"{len(missing)} of the model's {len(recorded)} training cases are not here "
                                f"(content sha256 {missing[0][:12]}...): give the folders it was trained on")
    with tempfile.TemporaryDirectory(prefix="medsynth-appearance-") as scratch:
        cache = cache_dir if cache_dir is not None else Path(scratch)
        # The model's own training order: the sampler picks a case by index, so the fit repeats the export's.
        volumes = [_load_volume(by_key[key][0], cache, config.normalization, by_key[key][1]) for key in recorded]
        # The export's own fit, with the count asked for: the same sampler, patch seed and progress bar.
        prior = fit_export_appearance(load_generator(card, device),
                                      dataclasses.replace(config, appearance_patches=count), patch_sampler(config),
                                      volumes, torch.device(device), progress)
    assert prior is not None  # the network has a code and count is at least 2
    new_config: dict[str, Any] = json.loads(json.dumps(card.config))
    new_config["appearance"] = prior.to_json()
    if command:
        new_config["training"]["commands"] = list(training.get("commands") or []) + [command]
    return write_model_copy(card, new_config, output, overwrite=overwrite)
