"""A model is a folder: ``config.json`` + ``weights.safetensors``.

``config.json`` holds the architecture, the label-schema version, the intensity
statistics that map outputs back to scanner units, a summary of the training
data, the command that trained it, validation metrics and the sha256 of the
weights.  Shipped models are listed in ``Resources/models/registry.json``
(name -> folder + sha256).  Loading checks the hash and the schema and refuses
a mismatch with a clear message; weights are never pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..schema.errors import InputError, MedSynthError
from ..schema.labels import SCHEMA_VERSION

MODEL_FORMAT = "medsynth-model"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "weights.safetensors"


def models_root() -> Path:
    """Folder of the shipped models (``MEDSYNTH_MODELS`` overrides it)."""
    env = os.environ.get("MEDSYNTH_MODELS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "Resources" / "models"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_registry(root: Path | None = None) -> dict[str, Any]:
    root = root or models_root()
    path = root / "registry.json"
    if not path.exists():
        return {"default": None, "models": {}}
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise InputError(path, f"unreadable model registry ({exc})") from None


@dataclass
class ModelFolder:
    """A verified model folder."""

    name: str
    path: Path
    config: dict[str, Any]
    sha256: str

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS_NAME


def resolve_model(name_or_path: str | os.PathLike[str] | None = None) -> ModelFolder:
    """Find and verify a model by registry name (default: the registry's default) or folder path.

    Raises:
        MedSynthError: unknown name, missing files, wrong hash, or another label schema.
    """
    registry = read_registry()
    expected_sha: str | None = None
    if name_or_path is None:
        name_or_path = registry.get("default")
        if not name_or_path:
            raise MedSynthError(f"{models_root()}: no default model is registered")
    text = os.fspath(name_or_path)
    if text in registry.get("models", {}):
        entry = registry["models"][text]
        folder = models_root() / entry["path"]
        expected_sha = entry["sha256"]
        name = text
    else:
        folder = Path(text)
        name = folder.name
        if not folder.exists():
            known = ", ".join(sorted(registry.get("models", {}))) or "none"
            raise InputError(folder, f"no such model folder or registered model (registered: {known})")
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise InputError(path, "model file missing")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise InputError(config_path, f"unreadable model config ({exc})") from None
    if config.get("format") != MODEL_FORMAT:
        raise InputError(config_path, f"not a MedSynth model config (format {config.get('format')!r})")
    schema = config.get("label_schema_version")
    if schema != SCHEMA_VERSION:
        raise InputError(config_path, f"model uses label schema version {schema}, this MedSynth uses "
                                      f"{SCHEMA_VERSION}: retrain or use a matching MedSynth")
    sha = file_sha256(weights_path)
    for source, wanted in (("registry", expected_sha), ("config.json", config.get("weights_sha256"))):
        if wanted is not None and wanted != sha:
            raise InputError(weights_path, f"sha256 {sha[:12]}... does not match the {source} "
                                           f"({str(wanted)[:12]}...): the weights are corrupt or were replaced")
    if config.get("weights_sha256") is None:
        raise InputError(config_path, "model config has no weights_sha256")
    if expected_sha is None:
        name = str(config.get("name") or name)
    return ModelFolder(name, folder, config, sha)


def write_model(folder: Path, state: dict[str, Any], config: dict[str, Any], *, overwrite: bool = False) -> Path:
    """Write a model folder atomically; ``config`` gets format, schema and weights hash."""
    from safetensors.torch import save_file

    from ..schema.volume_io import atomic_directory

    with atomic_directory(folder, overwrite=overwrite) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME))
        config = dict(config, format=MODEL_FORMAT, label_schema_version=SCHEMA_VERSION,
                      weights_sha256=file_sha256(tmp / WEIGHTS_NAME))
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        for path in tmp.iterdir():  # safetensors writes 0600; a model folder is meant to be shared
            path.chmod(0o644)
    return folder


def load_generator(model: ModelFolder, device: str = "cpu", backend: str = "torch"):
    """Build the generator of a verified model folder and load its weights.

    ``backend="torch"`` (inference) builds the MONAI-free copy of the U-Net; ``"monai"`` the training one.
    """
    from safetensors.torch import load_file

    from .networks import Generator, NetworkConfig

    net = Generator(NetworkConfig.from_json(model.config["network"]), backend=backend)
    state = load_file(str(model.weights), device=device)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(model.weights, f"weights do not fit the architecture in config.json "
                                        f"(missing {len(missing)}, unexpected {len(unexpected)} tensors)")
    return net.to(device).eval()


def register_model(source: str | os.PathLike[str], name: str, *, make_default: bool = False,
                   root: Path | None = None, overwrite: bool = False) -> ModelFolder:
    """Copy a verified model folder into the registry folder and list it (name -> folder + sha256)."""
    import re
    import shutil

    from ..schema.volume_io import atomic_directory, write_json

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise MedSynthError(f"model name {name!r}: use letters, digits, '.', '_' or '-'")
    model = resolve_model(source)
    root = root or models_root()
    with atomic_directory(root / name, overwrite=overwrite) as tmp:
        for file_name in (CONFIG_NAME, WEIGHTS_NAME):
            shutil.copy2(model.path / file_name, tmp / file_name)
    registry = read_registry(root)
    registry.setdefault("models", {})[name] = {"path": name, "sha256": model.sha256}
    if make_default or not registry.get("default"):
        registry["default"] = name
    write_json(registry, root / "registry.json", overwrite=True)
    return resolve_model(name) if root == models_root() else model
