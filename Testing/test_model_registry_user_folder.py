"""Where ``medsynth models --register`` writes without ``MEDSYNTH_MODELS``: the user's registry, not the shipped one.

Registrations used to go into the installation's ``Resources/models/registry.json`` unless ``MEDSYNTH_MODELS`` was
set: a Slicer extension update replaces that folder (the registrations are lost), it may be read-only, on a shared
install one researcher's model lands in everyone's registry, and in a git checkout it dirties a tracked file.  The
user's registry is now ``MEDSYNTH_MODELS``, else ``models/`` in the user's MedSynth folder (``MEDSYNTH_HOME`` here);
a maintainer who ships a model names the shipped folder in ``MEDSYNTH_MODELS``.  The real ``Resources/models`` is
never written by these tests: each runs on a stand-in for it (its registry.json copied, its model folders linked).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import file_tree, one_line_refusal, run_cli
from MedSynthLib.synthesis import models
from MedSynthLib.synthesis.models import read_registry, resolve_model
from test_model_registry_layers import (REPO, SHIPPED, SHIPPED_DEFAULT, SHIPPED_NAMES, SHIPPED_REGISTRY,  # noqa: F401
                                        _blocks, tiny)
from test_synthesis_seed import synthetic_brain

pytestmark = pytest.mark.usefixtures("torch_threads")


@pytest.fixture()
def home(tmp_path: Path, monkeypatch) -> Path:
    """This test's own user MedSynth folder (MEDSYNTH_HOME), without MEDSYNTH_MODELS."""
    folder = tmp_path / "home"
    monkeypatch.setenv("MEDSYNTH_HOME", str(folder))
    monkeypatch.delenv("MEDSYNTH_MODELS", raising=False)
    return folder


@pytest.fixture(autouse=True)
def shipped(tmp_path: Path, monkeypatch) -> Path:
    """The shipped registry of these tests: a copy of Resources/models/registry.json beside links to its model folders,
    so that a registration landing in the shipped registry (the old behaviour) never writes the real one."""
    real_before = file_tree(SHIPPED)
    copy = tmp_path / "installed" / "Resources" / "models"
    copy.mkdir(parents=True)
    shutil.copyfile(SHIPPED_REGISTRY, copy / "registry.json")
    for folder in SHIPPED.iterdir():
        if folder.is_dir():
            (copy / folder.name).symlink_to(folder, target_is_directory=True)
    monkeypatch.setattr(models, "shipped_models_root", lambda: copy)
    yield copy
    assert file_tree(SHIPPED) == real_before


def test_register_without_MEDSYNTH_MODELS_writes_the_user_folder(tiny, home, shipped, capsys) -> None:
    shipped_before = file_tree(shipped)
    rc, out, err = run_cli(["models", "--register", tiny, "--name", "mine"], capsys)
    assert rc == 0, err
    user_registry = home / "models" / "registry.json"
    assert json.loads(user_registry.read_text())["models"]["mine"]["path"] == "mine"
    assert (home / "models" / "mine" / "weights.safetensors").is_file()
    assert file_tree(shipped) == shipped_before  # the installation is left as it was, byte for byte
    assert sorted(p.name for p in shipped.iterdir()) == sorted(SHIPPED_NAMES + ["registry.json"])
    assert f"in {user_registry}" in out, out  # the line says which registry it wrote
    assert resolve_model("mine").path == home / "models" / "mine"
    assert resolve_model(None).name == SHIPPED_DEFAULT  # no --default: the shipped default still runs


def test_a_model_registered_by_default_synthesizes_by_name(tiny, home, tmp_path, capsys) -> None:
    from MedSynthLib.schema.labelmap import write_label_map

    assert run_cli(["models", "--register", tiny, "--name", "mine"], capsys)[0] == 0
    labels = write_label_map(synthetic_brain(), tmp_path / "labels.nii.gz")
    rc, out, err = run_cli(["synthesize", labels, "-o", tmp_path / "out", "--model", "mine", "--device", "cpu"],
                           capsys)
    assert rc == 0, err
    provenance = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert provenance["model"]["name"] == "mine"
    assert read_registry()["models"]["mine"]["registry"] == str(home / "models" / "registry.json")


def test_the_listing_shows_the_users_models_with_the_shipped_ones(tiny, home, shipped, capsys) -> None:
    assert run_cli(["models", "--register", tiny, "--name", "mine", "--default"], capsys)[0] == 0
    rc, out, err = run_cli(["models"], capsys)
    assert rc == 0, err
    blocks = _blocks(out)
    assert "mine (default)" in blocks and set(SHIPPED_NAMES) <= {h.split(" ")[0] for h in blocks}
    assert f"registry {home / 'models' / 'registry.json'} (user)" in blocks["mine (default)"], out
    assert f"registry {shipped / 'registry.json'} (shipped, read-only)" in blocks[SHIPPED_NAMES[0]], out
    assert "status   ok" in blocks["mine (default)"]


def test_a_shipped_name_is_still_refused_in_the_user_folder(tiny, home, shipped, capsys) -> None:
    shipped_before = file_tree(shipped)
    line = one_line_refusal(*run_cli(["models", "--register", tiny, "--name", SHIPPED_DEFAULT], capsys))
    assert str(home / "models" / "registry.json") in line and str(shipped / "registry.json") in line, line
    assert not (home / "models" / "registry.json").exists()
    assert file_tree(shipped) == shipped_before


def test_MEDSYNTH_MODELS_still_chooses_the_users_registry(tiny, home, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("MEDSYNTH_MODELS", str(tmp_path / "project-models"))
    rc, out, err = run_cli(["models", "--register", tiny, "--name", "mine"], capsys)
    assert rc == 0, err
    assert f"in {tmp_path / 'project-models' / 'registry.json'}" in out, out
    assert resolve_model("mine").path == tmp_path / "project-models" / "mine"
    assert not (home / "models").exists()


def test_a_maintainer_registers_into_the_shipped_registry_by_naming_it(tiny, home, shipped, monkeypatch,
                                                                       capsys) -> None:
    """``MEDSYNTH_MODELS=Resources/models medsynth models --register ...``: how a model is added to those shipped."""
    monkeypatch.setenv("MEDSYNTH_MODELS", str(shipped))
    rc, out, err = run_cli(["models", "--register", tiny, "--name", "new-shipped"], capsys)
    assert rc == 0, err
    assert f"in {shipped / 'registry.json'}" in out, out
    registry = json.loads((shipped / "registry.json").read_text())
    assert registry["models"]["new-shipped"]["path"] == "new-shipped"
    assert registry["default"] == SHIPPED_DEFAULT
    assert not (home / "models").exists()
    monkeypatch.delenv("MEDSYNTH_MODELS")  # afterwards, for everyone: a shipped model
    entry = read_registry()["models"]["new-shipped"]
    assert entry["registry"] == str(shipped / "registry.json")
    assert resolve_model("new-shipped").path == shipped / "new-shipped"


def test_the_slicer_model_list_shows_a_model_registered_by_default(tiny, home, capsys) -> None:
    sys.path.insert(0, str(REPO / "MedSynth"))
    from MedSynthSlicerLib.generate import Synthesis

    assert run_cli(["models", "--register", tiny, "--name", "mine"], capsys)[0] == 0
    entries = {e["name"]: e for e in Synthesis.registered_models()}
    assert set(entries) == set(SHIPPED_NAMES) | {"mine"}
    assert entries["mine"]["kind"] == "synthesis" and not entries["mine"]["default"]
    assert (home / "models" / "mine" / "config.json").is_file()  # the panel lists it from the user's registry


def test_user_dir_lives_in_schema_and_generate_keys_uses_it(home) -> None:
    from MedSynthLib.generate import keys
    from MedSynthLib.schema import user_folder

    assert keys.user_dir is user_folder.user_dir and keys.HOME_ENV == user_folder.HOME_ENV == "MEDSYNTH_HOME"
    assert user_folder.user_dir() == home
    assert models.user_models_root() == home / "models"
