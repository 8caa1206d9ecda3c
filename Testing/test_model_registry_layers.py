"""The shipped registry and the user's (``MEDSYNTH_MODELS``) together, and where a registered spread limit comes from.

``MEDSYNTH_MODELS`` used to replace the shipped registry: pointing it at a new folder hid every shipped model (the
default synthesis model too) and made the first model registered there the default.  The user's registry adds to the
shipped one (read-only): its ``--default`` choices override the shipped ones, kind by kind, a name of a shipped model
is refused, and ``medsynth models`` says which registry each model comes from.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import file_tree, one_line_refusal, rewrite_model_config, run_cli, write_random_model
from MedSynthLib.schema.errors import InputError
from MedSynthLib.synthesis.appearance import AppearancePrior
from MedSynthLib.synthesis.models import file_sha256, read_registry, resolve_model
from MedSynthLib.synthesis.networks import MODALITY_ORDER
from test_synthesis_seed import STYLED, _model, synthetic_brain

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "Resources" / "models"
SHIPPED_REGISTRY = SHIPPED / "registry.json"
SHIPPED_NAMES = sorted(json.loads(SHIPPED_REGISTRY.read_text())["models"])
SHIPPED_DEFAULT = json.loads(SHIPPED_REGISTRY.read_text())["default"]
SHIPPED_INPAINTING = json.loads(SHIPPED_REGISTRY.read_text())["default_inpainting"]

pytestmark = pytest.mark.usefixtures("torch_threads")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_random_model(tmp_path_factory.mktemp("models") / "tiny",
                              {m: {"low": 0.0, "high": 1000.0} for m in MODALITY_ORDER}, seed=3)


@pytest.fixture(scope="module")
def tiny_inpainting(tmp_path_factory) -> Path:
    from test_inpainting import write_tiny_inpainting_model

    return write_tiny_inpainting_model(tmp_path_factory.mktemp("models") / "inp")


@pytest.fixture()
def user(tmp_path: Path, monkeypatch) -> Path:
    """A new, empty user registry folder named by MEDSYNTH_MODELS (as the README suggests, per user or project)."""
    root = tmp_path / "my-models"
    monkeypatch.setenv("MEDSYNTH_MODELS", str(root))
    return root


def _blocks(out: str) -> dict[str, str]:
    """``medsynth models``'s listing: heading line -> its indented lines."""
    blocks: dict[str, str] = {}
    for line in out.splitlines():
        if line and not line.startswith(" "):
            current = line
            blocks[current] = ""
        elif line.strip():
            blocks[current] += line.strip() + "\n"
    return blocks


def test_a_user_registry_adds_to_the_shipped_models(tiny, user, capsys) -> None:
    """Registering into a new MEDSYNTH_MODELS folder keeps every shipped model listed and the shipped defaults; the
    listing says which registry each model comes from; nothing is written into the installation."""
    shipped_before = file_tree(SHIPPED)
    rc, out, err = run_cli(["models", "--register", tiny, "--name", "mine"], capsys)
    assert rc == 0, err
    assert json.loads((user / "registry.json").read_text()).get("default") is None  # no --default: not the default
    rc, out, err = run_cli(["models"], capsys)
    assert rc == 0, err
    blocks = _blocks(out)
    assert set(blocks) == ({n for n in SHIPPED_NAMES if n not in (SHIPPED_DEFAULT, SHIPPED_INPAINTING)}
                           | {f"{SHIPPED_DEFAULT} (default)", f"{SHIPPED_INPAINTING} (default inpainting)", "mine"})
    assert f"registry {user / 'registry.json'} (MEDSYNTH_MODELS)" in blocks["mine"]
    assert f"folder   {user / 'mine'}" in blocks["mine"]
    shipped_block = blocks[f"{SHIPPED_DEFAULT} (default)"]
    assert f"registry {SHIPPED_REGISTRY} (shipped, read-only)" in shipped_block
    assert f"folder   {SHIPPED / SHIPPED_DEFAULT}" in shipped_block and "status   ok" in shipped_block
    assert resolve_model(None).name == SHIPPED_DEFAULT
    assert resolve_model(None, kind="inpainting").name == SHIPPED_INPAINTING
    assert resolve_model("mine").path == user / "mine"
    assert file_tree(SHIPPED) == shipped_before


def test_synthesize_with_the_default_finds_the_shipped_model(user, tmp_path, capsys) -> None:
    """The auditor's case: MEDSYNTH_MODELS on a folder of one's own, then ``synthesize`` without --model."""
    from MedSynthLib.schema.labelmap import write_label_map

    labels = write_label_map(synthetic_brain(), tmp_path / "labels.nii.gz")
    rc, out, err = run_cli(["synthesize", labels, "-o", tmp_path / "out", "--device", "cpu"], capsys)
    assert rc == 0, err
    provenance = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert provenance["model"]["name"] == SHIPPED_DEFAULT


def test_a_users_default_overrides_the_shipped_one_kind_by_kind(tiny, tiny_inpainting, user, capsys) -> None:
    assert run_cli(["models", "--register", tiny, "--name", "mine", "--default"], capsys)[0] == 0
    assert resolve_model(None).name == "mine"
    assert resolve_model(None, kind="inpainting").name == SHIPPED_INPAINTING  # the other kind keeps the shipped one
    assert run_cli(["models", "--register", tiny_inpainting, "--name", "my-inp", "--default"], capsys)[0] == 0
    assert resolve_model(None, kind="inpainting").name == "my-inp" and resolve_model(None).name == "mine"
    assert run_cli(["models", "--register", tiny, "--name", "other"], capsys)[0] == 0  # no --default: unchanged
    assert resolve_model(None).name == "mine"
    rc, out, err = run_cli(["models"], capsys)
    assert rc == 0, err
    headings = set(_blocks(out))
    assert {"mine (default)", "my-inp (default inpainting)", "other", SHIPPED_DEFAULT, SHIPPED_INPAINTING} <= headings


@pytest.mark.parametrize("overwrite", [False, True])
def test_registering_under_a_shipped_name_is_refused_naming_both(tiny, user, capsys, overwrite) -> None:
    argv = ["models", "--register", tiny, "--name", SHIPPED_DEFAULT] + (["--overwrite"] if overwrite else [])
    line = one_line_refusal(*run_cli(argv, capsys))
    assert str(user / "registry.json") in line and str(SHIPPED_REGISTRY) in line and SHIPPED_DEFAULT in line, line
    assert not user.exists() or list(user.iterdir()) == []  # nothing written
    assert resolve_model(SHIPPED_DEFAULT).path == SHIPPED / SHIPPED_DEFAULT


def test_a_user_registry_listing_a_shipped_name_is_refused_naming_both(tiny, user, capsys) -> None:
    """A registry written before (by hand, or when MEDSYNTH_MODELS replaced the shipped one) with another model under
    a shipped name: which one a name means is ambiguous, so it is refused, not silently chosen."""
    shutil.copytree(tiny, user / "clash")
    entry = {"path": "clash", "sha256": file_sha256(user / "clash" / "weights.safetensors")}
    (user / "registry.json").write_text(json.dumps({"models": {SHIPPED_DEFAULT: entry}}))
    line = one_line_refusal(*run_cli(["models"], capsys))
    assert str(user / "registry.json") in line and str(SHIPPED_REGISTRY) in line and SHIPPED_DEFAULT in line, line
    with pytest.raises(InputError, match="shipped"):
        resolve_model(None)


def test_a_copy_of_a_shipped_entry_in_the_user_registry_is_the_same_model(user, capsys) -> None:
    """Under the old behaviour, keeping the shipped models meant copying them into one's own registry: the same
    weights and config under the same name are one model, not a clash."""
    shutil.copytree(SHIPPED / SHIPPED_INPAINTING, user / SHIPPED_INPAINTING)
    shipped = json.loads(SHIPPED_REGISTRY.read_text())
    (user / "registry.json").write_text(json.dumps({"models": {SHIPPED_INPAINTING:
                                                               shipped["models"][SHIPPED_INPAINTING]}}))
    assert resolve_model(None, kind="inpainting").name == SHIPPED_INPAINTING
    assert sorted(read_registry()["models"]) == SHIPPED_NAMES


def test_share_a_shipped_model_with_a_user_registry(user, tmp_path, capsys) -> None:
    rc, out, err = run_cli(["models", "--share", "medsynth-brats21-cpu", "-o", tmp_path / "give"], capsys)
    assert rc == 0, err
    assert file_sha256(tmp_path / "give" / "weights.safetensors") == file_sha256(
        SHIPPED / "medsynth-brats21-cpu" / "weights.safetensors")


def test_an_exported_case_keeps_a_shipped_models_name_with_a_user_registry(user) -> None:
    from MedSynthLib.export.sanitise import exported_model_name

    entry = json.loads(SHIPPED_REGISTRY.read_text())["models"][SHIPPED_DEFAULT]
    assert exported_model_name(SHIPPED_DEFAULT, entry["sha256"], entry["config_sha256"]) == SHIPPED_DEFAULT


def test_the_slicer_model_list_shows_shipped_and_user_models(tiny, user, capsys) -> None:
    sys.path.insert(0, str(REPO / "MedSynth"))
    from MedSynthSlicerLib.generate import Synthesis

    assert run_cli(["models", "--register", tiny, "--name", "mine"], capsys)[0] == 0
    entries = {e["name"]: e for e in Synthesis.registered_models()}
    assert set(entries) == set(SHIPPED_NAMES) | {"mine"}
    assert entries[SHIPPED_DEFAULT]["default"] and not entries["mine"]["default"]
    assert entries[SHIPPED_INPAINTING]["kind"] == "inpainting" and entries[SHIPPED_INPAINTING]["default"]


# --- the appearance spread limit of a registered model -------------------------------------------------------------


@pytest.fixture(scope="module")
def styled(tmp_path_factory) -> Path:
    return _model(tmp_path_factory.mktemp("models") / "styled", STYLED)


def _with_record(styled: Path, folder: Path, limit: float | None) -> Path:
    shutil.copytree(styled, folder)
    config = json.loads((folder / "config.json").read_text())
    prior = AppearancePrior((0.0,) * STYLED.style_dim, tuple(tuple(float(i == j) for j in range(STYLED.style_dim))
                                                             for i in range(STYLED.style_dim)), 10, 0,
                            1.0 if limit is None else limit)
    config["appearance"] = prior.to_json()
    rewrite_model_config(folder, config)
    return folder


@pytest.mark.parametrize("recorded, flag, limit, source", [
    (1.2, None, 1.2, "as its config records"),  # the trainer's own measurement, carried with the model folder
    (1.5, 1.1, 1.1, "--appearance-spread-limit"),  # the flag overrides the record
    (None, None, 1.0, "none recorded"),  # neither: 1
])
def test_a_registered_spread_limit_comes_from_the_flag_else_the_models_record_else_1(
        styled, user, tmp_path, capsys, recorded, flag, limit, source) -> None:
    model = _with_record(styled, tmp_path / "model", recorded)
    argv = ["models", "--register", model, "--name", "m"] + ([] if flag is None else
                                                              ["--appearance-spread-limit", flag])
    rc, out, err = run_cli(argv, capsys)
    assert rc == 0, err
    assert resolve_model("m").appearance.spread_limit == limit
    assert f"appearance spread up to {limit:g} ({source})" in out, out
    rc, out, err = run_cli(["models"], capsys)
    assert f"spread   0 to {limit:g} (--appearance-spread)" in _blocks(out)["m"], out


def test_the_spread_limit_help_says_where_the_default_comes_from(capsys) -> None:
    with pytest.raises(SystemExit):
        run_cli(["models", "--help"], capsys)
    text = " ".join(capsys.readouterr().out.split())
    assert "default 1)" not in text
    assert "default: the limit the model folder's config records, else 1" in text, text
