"""A model config without its checksum is no longer taken as a 'legacy' model on its own word.

Deleting ``config_sha256`` from an edited config made it load as a model written before the field existed: the
checksum was bypassed by removing it.  Now only the registry vouches for a config without it (an entry listing the
model's weights with the content checksum of its config, as every registration and every shipped entry records), and
``medsynth models --register --trust-config`` is the one way to adopt a model written before the field, on purpose.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from MedSynthLib.cli import main
from MedSynthLib.schema.errors import InputError
from MedSynthLib.synthesis.models import (config_sha256, read_registry, register_model, resolve_model,
                                          with_config_sha256, write_model)
from MedSynthLib.synthesis.networks import MODALITY_ORDER, Generator, NetworkConfig

NETWORK = NetworkConfig(channels=(4, 8), strides=(2,), num_res_units=1, disc_channels=4, disc_layers=2)


@pytest.fixture()
def model(tmp_path: Path) -> Path:
    torch.manual_seed(7)
    state = {k: v.detach().contiguous() for k, v in Generator(NETWORK).state_dict().items()}
    return write_model(tmp_path / "tiny", state, {"name": "tiny", "network": NETWORK.to_json(),
                                                  "intensity": {m: {"low": 0.0, "high": 1000.0}
                                                                for m in MODALITY_ORDER}})


@pytest.fixture()
def registry(tmp_path: Path, monkeypatch) -> Path:
    root = tmp_path / "registry"
    root.mkdir()
    monkeypatch.setenv("MEDSYNTH_MODELS", str(root))
    return root


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _write(folder: Path, config: dict) -> None:
    (folder / "config.json").write_text(json.dumps(config))


def _edited(config: dict) -> dict:
    """``config`` with one intensity statistic changed (every image it synthesises changes)."""
    edited = json.loads(json.dumps(config))
    stats = edited["intensity"]["t1"]
    key = "high" if "high" in stats else "mean"
    stats[key] = stats[key] * 5 + 1
    return edited


def _refused(folder_or_name, config_path: Path, *words: str) -> str:
    with pytest.raises(InputError) as caught:
        resolve_model(folder_or_name)
    message = str(caught.value)
    assert message.startswith(f"{config_path}: ") and "\n" not in message, message
    assert all(word in message for word in words), message
    return message


@pytest.mark.parametrize("edit", [True, False], ids=["edited statistics", "unchanged"])
def test_a_config_whose_checksum_was_removed_is_refused(model: Path, edit: bool) -> None:
    """The auditor's bypass: the edited config loaded once its checksum was deleted.  Nothing vouches for a config
    without its checksum (an unregistered folder), edited or not: refused in one line naming the file."""
    config = _config(model)
    stripped = {k: v for k, v in (_edited(config) if edit else config).items() if k != "config_sha256"}
    _write(model, stripped)
    message = _refused(model, model / "config.json", "config_sha256", "--trust-config")
    assert "nothing vouches" in message


def test_the_registry_pins_the_config_it_registered(model: Path, registry: Path) -> None:
    """A registered model's entry records its config's content checksum: an edit is refused by name even when the
    config was given a fresh checksum of its own (a sha256 anyone can recompute), or had it removed; the config as
    registered loads without its field, by name or by folder, as the registry vouches for it."""
    register_model(model, "tiny")
    entry = read_registry()["models"]["tiny"]
    folder = registry / "tiny"
    config = _config(folder)
    assert entry["config_sha256"] == config["config_sha256"] == config_sha256(config)

    _write(folder, with_config_sha256(_edited(config)))  # edited and resealed
    _refused("tiny", folder / "config.json", "registry")
    _write(folder, {k: v for k, v in _edited(config).items() if k != "config_sha256"})  # edited, checksum removed
    _refused("tiny", folder / "config.json", "registry")
    _refused(folder, folder / "config.json", "config_sha256")

    _write(folder, {k: v for k, v in config.items() if k != "config_sha256"})  # as registered, field removed
    assert resolve_model("tiny").config["intensity"] == config["intensity"]
    assert resolve_model(folder).sha256 == entry["sha256"]


def test_every_shipped_model_is_pinned_by_the_registry_and_loads() -> None:
    """The shipped registry lists each model's config checksum, and each shipped model loads against it; a shipped
    model's folder whose config lost its checksum field still loads (the registry vouches for its content)."""
    registry = read_registry()
    assert registry["models"]
    for name, entry in registry["models"].items():
        card = resolve_model(name)
        assert entry["config_sha256"] == config_sha256(card.config) == card.config["config_sha256"], name


def test_a_shipped_model_copied_without_its_checksum_field_loads_and_one_edited_is_refused(tmp_path: Path) -> None:
    name = "medsynth-inpaint-brats27-f0d"  # the smallest shipped weights
    shipped = resolve_model(name)
    copy = Path(shutil.copytree(shipped.path, tmp_path / name))
    config = {k: v for k, v in _config(copy).items() if k != "config_sha256"}
    _write(copy, config)
    assert resolve_model(copy).sha256 == shipped.sha256
    _write(copy, _edited(config))
    _refused(copy, copy / "config.json", "config_sha256")


def test_models_register_trust_config_adopts_a_model_written_before_the_checksum(model: Path, registry: Path,
                                                                              tmp_path: Path, capsys) -> None:
    """A model written before MedSynth recorded the checksum is adopted on purpose: ``--register ... --trust-config``
    registers it with its config as it is now (the copy gets its checksum, the registry pins it); without the option
    the registration is refused in one line that names it, and nothing is registered."""
    _write(model, {k: v for k, v in _config(model).items() if k != "config_sha256"})
    capsys.readouterr()
    assert main(["models", "--register", str(model), "--name", "old"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and str(model / "config.json") in err[0] and "--trust-config" in err[0], err
    assert not (registry / "old").exists() and "old" not in read_registry()["models"]

    assert main(["models", "--register", str(model), "--name", "old", "--trust-config"]) == 0
    assert "checksum" in capsys.readouterr().out
    registered = _config(registry / "old")
    assert registered["config_sha256"] == config_sha256(registered) == read_registry()["models"]["old"]["config_sha256"]
    assert resolve_model("old").sha256 == read_registry()["models"]["old"]["sha256"]
    assert "config_sha256" not in _config(model)  # the user's folder is left as it was

    assert main(["models", "--trust-config"]) == 2
    assert "--trust-config applies with --register only" in capsys.readouterr().err
