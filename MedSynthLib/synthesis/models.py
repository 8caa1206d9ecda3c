"""A model is a folder: ``config.json`` + ``weights.safetensors``.

``config.json`` holds the architecture, the label-schema version, the intensity
statistics that map outputs back to scanner units, a summary of the training
data, the command that trained it, validation metrics and the sha256 of the
weights.  Shipped models are listed in ``Resources/models/registry.json``
(name -> folder + sha256 of the weights + ``config_sha256`` of the config's
content).  Loading checks the hashes and the schema and refuses a mismatch with
a clear message; weights are never pickled.
A user's registry (``MEDSYNTH_MODELS``, else ``models/`` in the user's MedSynth folder) adds to the shipped one, which
stays read-only, and is where registrations go: see :func:`read_registry` and :func:`user_models_root`.

:func:`resolve_model` parses a folder once into a :class:`ModelCard`: the
network, the normalisers that map outputs back to scanner units, and the
weights, read from disk once and hashed from the same bytes.  Everything that
runs a model (synthesize, generate, export, the study, the Slicer worker) takes
the card; nothing re-reads ``config.json`` or the weights file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..schema.errors import InputError, MedSynthError
from ..schema.labels import SCHEMA_VERSION

if TYPE_CHECKING:  # networks imports torch: only for annotations here
    import torch

    from .appearance import AppearancePrior
    from .networks import NetworkConfig
    from .normalize import Normalizer

MODEL_FORMAT = "medsynth-model"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "weights.safetensors"
REGISTRY_NAME = "registry.json"
# What a model does.  A config without "kind" is a label-map -> four-MRI generator ("synthesis"),
# which is every model written so far; other kinds add their name here and their own checks.
SYNTHESIS_KIND = "synthesis"


#: The environment variable naming the user's registry folder, which adds to the shipped one.
MODELS_ENV = "MEDSYNTH_MODELS"
#: The user's registry folder in the user's MedSynth folder, where ``MEDSYNTH_MODELS`` is not set.
USER_MODELS_FOLDER = "models"


def shipped_models_root() -> Path:
    """Folder of the models shipped with MedSynth (``Resources/models``)."""
    return Path(__file__).resolve().parents[2] / "Resources" / "models"


def user_models_root() -> Path | None:
    """The user's registry folder: ``MEDSYNTH_MODELS``, else ``models`` in the user's MedSynth folder.

    None where that is the shipped folder: ``MEDSYNTH_MODELS=Resources/models`` is how a maintainer registers a model
    to ship, and the shipped registry is then the only one.  Registering into the installation by default would put
    one user's models in everyone's registry, and an extension update (which replaces the folder) would lose them.
    """
    from ..schema.user_folder import user_dir

    env = os.environ.get(MODELS_ENV)
    root = Path(env).expanduser() if env else user_dir() / USER_MODELS_FOLDER
    return None if _same_folder(root, shipped_models_root()) else root


def models_root() -> Path:
    """Folder that ``medsynth models --register`` writes to: the user's registry (the shipped one where it is that)."""
    return user_models_root() or shipped_models_root()


def user_registry_origin() -> str:
    """What chose the user's registry folder, for listings: ``MEDSYNTH_MODELS`` or ``user`` (the MedSynth folder)."""
    return MODELS_ENV if os.environ.get(MODELS_ENV) else "user"


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


#: The config's own checksum: the sha256 of its content without this field (:func:`config_sha256`).
CONFIG_SHA_KEY = "config_sha256"


def config_sha256(config: dict[str, Any]) -> str:
    """sha256 of a model config's content (canonical JSON, sorted keys, without :data:`CONFIG_SHA_KEY`).

    The weights hash does not cover the config, yet its intensity statistics map the network's output back to
    scanner units and its appearance prior draws the seeds: an edited number there changes every image.
    """
    body = {key: value for key, value in config.items() if key != CONFIG_SHA_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def with_config_sha256(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with its checksum (recomputed): what every writer of a model config stores."""
    return dict(config, **{CONFIG_SHA_KEY: config_sha256(config)})


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_registry(root: Path | None = None) -> dict[str, Any]:
    """The registered models: the shipped registry and the user's (:func:`user_models_root`) together.

    Without ``root``, the merged view that every reader uses: ``models`` maps each name to its entry with ``path``
    the model folder (absolute) and ``registry`` the ``registry.json`` listing it; a default the user's registry
    names overrides the shipped one of its kind, and ``default_from`` maps each default key to the registry that
    set it.  A name both registries list with other weights or config is refused (which model it means is
    ambiguous); the same entry in both (a copy of a shipped model) is the shipped one.  With ``root``: that
    folder's own ``registry.json`` as stored (relative paths), which registration rewrites.
    """
    if root is not None:
        return _read_registry_file(root)
    shipped_root, user_root = shipped_models_root(), user_models_root()
    layers = [(shipped_root, _read_registry_file(shipped_root))]
    if user_root is not None:
        layers.append((user_root, _read_registry_file(user_root)))
    merged: dict[str, Any] = {"models": {}, "default_from": {}}
    for key in DEFAULT_KEYS.values():
        merged[key] = None
    for layer_root, registry in layers:
        path = layer_root / REGISTRY_NAME
        for name, entry in registry["models"].items():
            here = dict(entry, path=str(layer_root / entry["path"]), registry=str(path))
            there = merged["models"].get(name)
            if there is not None:
                if (there["sha256"], there.get(CONFIG_SHA_KEY)) != (entry["sha256"], entry.get(CONFIG_SHA_KEY)):
                    raise InputError(path, f"lists {name!r}, which is also a shipped model ({there['registry']}) "
                                           "with other weights or config: rename yours (its entry and folder)")
                continue  # a copy of the shipped entry: the same model
            merged["models"][name] = here
        for key in DEFAULT_KEYS.values():
            if registry.get(key):
                merged[key], merged["default_from"][key] = registry[key], str(path)
    return merged


def registry_path_of_default(registry: dict[str, Any], kind: str) -> Path:
    """The ``registry.json`` that set the default of ``kind`` in a merged registry (the user's where unset)."""
    key = DEFAULT_KEYS[kind]
    return Path(registry.get("default_from", {}).get(key) or models_root() / REGISTRY_NAME)


def _read_registry_file(root: Path) -> dict[str, Any]:
    """One registry folder's ``registry.json`` (name -> folder + sha256), its shape checked; absent: empty."""
    from ..schema.jsonshape import json_type_name, read_json

    path = root / REGISTRY_NAME
    if not path.exists():
        return {"default": None, "models": {}}
    registry = read_json(path, "model registry")
    models = registry.setdefault("models", {})
    if not isinstance(models, dict):
        raise InputError(path, f"model registry: 'models' must be an object, not {json_type_name(models)}")
    for key in DEFAULT_KEYS.values():
        default = registry.get(key)
        if default is not None and not isinstance(default, str):
            raise InputError(path, f"model registry: {key!r} must be a model name, not {json_type_name(default)}")
    for name, entry in models.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("path"), str)
                and isinstance(entry.get("sha256"), str)):
            raise InputError(path, f"model registry: entry {name!r} must be an object with 'path' and 'sha256'")
        if not isinstance(entry.get(CONFIG_SHA_KEY), (str, type(None))):
            raise InputError(path, f"model registry: entry {name!r}: {CONFIG_SHA_KEY!r} must be a string")
        folder = Path(entry["path"])
        if folder.is_absolute() or ".." in folder.parts or not folder.parts:
            raise InputError(path, f"model registry: entry {name!r} has path {entry['path']!r}, which leaves "
                                   "the registry folder")
    return registry


@dataclass(frozen=True, eq=False)
class ModelCard:
    """A verified model folder, parsed once.

    Attributes:
        name: the registry name, else the config's ``name``, else the folder name.
        path: the model folder.
        config: ``config.json`` as read (training record, validation metrics, software versions).
        sha256: sha256 of the weights file, computed from the bytes the tensors were loaded from.
        network: the generator architecture.
        normalizers: per modality, the map from the network's [-1, 1] back to scanner units.
        tensors: the generator's weights (CPU), checked against ``network``'s shapes and finite.
        kind: what the model does (``synthesis``: label map -> T1, T1ce, T2, FLAIR).
        appearance: where a seed's appearance code comes from (models with one that record it; ``None``: a
            standard normal).
    """

    name: str
    path: Path
    config: dict[str, Any]
    sha256: str
    network: "NetworkConfig"
    normalizers: dict[str, "Normalizer"]
    tensors: dict[str, "torch.Tensor"] = field(repr=False)
    kind: str = SYNTHESIS_KIND
    appearance: "AppearancePrior | None" = None

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS_NAME

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.network.modalities)


# The former name of the card (a verified model folder).
ModelFolder = ModelCard

#: Registry key of each model kind's default (``medsynth synthesize --context`` takes an inpainting model).
DEFAULT_KEYS = {"synthesis": "default", "inpainting": "default_inpainting"}


def default_problem(registry: dict[str, Any], kind: str, model_kind: str | None = None) -> str | None:
    """What is wrong with the registry's default of ``kind`` (given its model's kind once known), else None."""
    key = DEFAULT_KEYS[kind]
    name = registry.get(key)
    if not name:
        return None
    if name not in registry.get("models", {}):
        return f"{key!r} names {name!r}, which is not a registered model"
    if model_kind is not None and model_kind != kind:
        return f"{key!r} names {name!r}, {_a(model_kind)} model, not {_a(kind)} model"
    return None


def _a(kind: str) -> str:
    return f"{'an' if kind[:1] in ('a', 'e', 'i', 'o', 'u') else 'a'} {kind}"


def resolve_model(name_or_path: str | os.PathLike[str] | None = None, kind: str = "synthesis", *,
                  trust_config: bool = False) -> ModelCard:
    """Find, verify and parse a model by registry name (default: the registry's default of ``kind``) or folder path.

    The weights file is read once: its sha256 is computed from the bytes the tensors are loaded from.  The config's
    content must match its own ``config_sha256`` and, for a registered model, the checksum its registry entry
    records.  A config without ``config_sha256`` loads only where the registry vouches for it (an entry with these
    weights and this content checksum): deleting the field must not turn an edited config into an accepted one.

    Args:
        kind: ``synthesis`` (label map -> images) or ``inpainting`` (a region of a real case); picks the default.
        trust_config: accept a config without ``config_sha256`` that nothing vouches for (a model written before
            MedSynth recorded it): only for ``medsynth models --register --trust-config``, which then records it.

    Raises:
        MedSynthError: unknown name, missing files, wrong hash, or another label schema.
    """
    registry = read_registry()
    if name_or_path is None:  # the registry's default: a registered name, never a folder path
        name = registry.get(DEFAULT_KEYS[kind])
        if not name:
            what = "default model" if kind == "synthesis" else f"default {kind} model"
            where = " or ".join(str(root) for root in dict.fromkeys((shipped_models_root(), models_root())))
            raise MedSynthError(f"{where}: no {what} is registered (give --model)")
        registry_path = registry_path_of_default(registry, kind)
        problem = default_problem(registry, kind)
        if problem:
            raise InputError(registry_path, f"the registry's {problem} (give --model)")
        try:
            card = resolve_model(name, kind)
        except InputError as exc:
            raise InputError(exc.path, f"{exc.problem} (the registry's {DEFAULT_KEYS[kind]!r} model "
                                       f"{name!r})") from None
        problem = default_problem(registry, kind, card.kind)
        if problem:
            raise InputError(registry_path, f"the registry's {problem} (give --model)")
        return card
    expected_sha: str | None = None
    pinned_config: str | None = None
    text = os.fspath(name_or_path)
    if text in registry.get("models", {}):
        entry = registry["models"][text]
        folder = Path(entry["path"])  # the merged view's entries hold the folder itself
        expected_sha = entry["sha256"]
        pinned_config = entry.get(CONFIG_SHA_KEY)
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
    from ..schema.jsonshape import json_type_name, not_an_integer, read_json

    config = read_json(config_path, "model config")
    if config.get("format") != MODEL_FORMAT:
        got = f"format {config['format']!r}" if "format" in config else "'format' is missing"
        raise InputError(config_path, f"not a MedSynth model config ({got})")
    if "label_schema_version" not in config:
        raise InputError(config_path, "model config: 'label_schema_version' is missing")
    schema = config["label_schema_version"]
    problem = not_an_integer(schema)
    if problem:
        raise InputError(config_path, f"model config: 'label_schema_version' {problem}")
    if schema != SCHEMA_VERSION:
        raise InputError(config_path, f"model uses label schema version {schema}, this MedSynth uses "
                                      f"{SCHEMA_VERSION}: retrain or use a matching MedSynth")
    if not isinstance(config.get("weights_sha256"), (str, type(None))):
        raise InputError(config_path, "model config: 'weights_sha256' must be a string")
    card_kind = config.get("kind", SYNTHESIS_KIND)
    if not isinstance(card_kind, str):
        raise InputError(config_path, f"model config: 'kind' must be a string, not {json_type_name(card_kind)}")
    data = _read_weights_file(weights_path)
    sha = hashlib.sha256(data).hexdigest()
    for source, wanted in (("registry", expected_sha), ("config.json", config.get("weights_sha256"))):
        if wanted is not None and wanted != sha:
            raise InputError(weights_path, f"sha256 {sha[:12]}... does not match the {source} "
                                           f"({str(wanted)[:12]}...): the weights are corrupt or were replaced")
    if config.get("weights_sha256") is None:
        raise InputError(config_path, "model config has no weights_sha256")
    network, normalizers, appearance = _check_model_config(config, config_path)
    tensors = _load_weights(weights_path, data, network)
    # Last, so that a malformed config or weights get their own message first.
    content = config_sha256(config)
    if pinned_config is not None and pinned_config != content:
        raise InputError(config_path, f"content does not match the {CONFIG_SHA_KEY} the registry records for "
                                      f"{name!r}: the config was edited after the model was registered (its "
                                      "statistics or appearance prior may no longer be the model's); restore it or "
                                      "register the model again")
    recorded = config.get(CONFIG_SHA_KEY)
    if recorded is not None and recorded != content:
        raise InputError(config_path, f"content does not match its {CONFIG_SHA_KEY}: the config was edited after "
                                      "the model was written (its statistics or appearance prior may no longer be "
                                      "the model's); restore it or write the model again")
    if recorded is None and not trust_config and not _registry_vouches(registry, sha, content):
        # The field may have been removed from an edited config, or predate MedSynth's recording it: only the
        # registry can tell, and where it cannot, adopting the config is the user's explicit act.
        raise InputError(config_path, f"model config has no {CONFIG_SHA_KEY} and nothing vouches for its "
                                      "statistics (the field was removed, or the model predates it); if you trust "
                                      "this config as the model's, adopt it with medsynth models --register "
                                      "MODEL_DIR --name NAME --trust-config")
    del data
    if expected_sha is None:
        name = str(config.get("name") or name)
    if network.kind == "inpainting":
        card_kind = "inpainting"  # an inpainting network says what the card is
    return ModelCard(name, folder, config, sha, network, normalizers, tensors, card_kind, appearance)


def _registry_vouches(registry: dict[str, Any], weights_sha: str, content: str) -> bool:
    """Whether a registry entry lists these weights with this config content checksum."""
    return any(entry.get("sha256") == weights_sha and entry.get(CONFIG_SHA_KEY) == content
               for entry in registry.get("models", {}).values())


def _read_weights_file(path: Path) -> bytes:
    """The weights file's bytes, read once (hashed and parsed from this copy); its size checked first."""
    from ..schema.budget import MAX_NETWORK_PARAMETERS

    # float64 is the widest dtype a MedSynth network stores; the header is small JSON.
    limit = 8 * MAX_NETWORK_PARAMETERS + (16 << 20)
    size = path.stat().st_size
    if size > limit:
        raise InputError(path, f"weights file of {size:,} bytes is larger than any MedSynth network "
                               f"({limit:,} bytes at most)")
    return path.read_bytes()


# Bounds of a network MedSynth builds (the shipped one: channels 16-256, strides 2, 1 residual unit).
MAX_CHANNELS = 4096
MAX_DEPTH = 8


def check_network_config(data: Any, source: Any) -> "NetworkConfig":
    """A generator architecture from JSON, its types, values and size checked before anything is built.

    Keys this MedSynth does not know are ignored (a model config may come from a newer version).
    """
    from ..schema.budget import MAX_NETWORK_PARAMETERS
    from ..schema.jsonshape import check_fields, expect_object
    from ..schema.labels import NUM_CLASSES
    from .networks import INPAINTING_IN_CHANNELS, MODALITY_ORDER, NetworkConfig

    expect_object(data, source, "network")
    known = {k: v for k, v in data.items() if k in NetworkConfig.__dataclass_fields__}
    check_fields(NetworkConfig, known, source, "network")
    try:
        network = NetworkConfig.from_json(known)
    except ValueError as exc:
        raise InputError(source, f"network: {exc}") from None
    problems = []
    if network.spatial_dims != 3:
        problems.append(f"spatial_dims {network.spatial_dims} (MedSynth is 3D)")
    if network.kind == "inpainting":
        if network.in_channels != INPAINTING_IN_CHANNELS:
            problems.append(f"in_channels {network.in_channels} (an inpainting network sees {NUM_CLASSES} label "
                            f"classes + 4 contrasts + the region mask = {INPAINTING_IN_CHANNELS})")
        if network.style_dim:
            problems.append(f"style_dim {network.style_dim} (an inpainting network takes its appearance from the "
                            "real images: 0)")
    elif network.in_channels != NUM_CLASSES:
        problems.append(f"in_channels {network.in_channels} (the label schema has {NUM_CLASSES} classes)")
    if sorted(network.modalities) != sorted(MODALITY_ORDER) or network.out_channels != len(network.modalities):
        problems.append(f"modalities {list(network.modalities)} with out_channels {network.out_channels} "
                        f"(MedSynth synthesises {', '.join(MODALITY_ORDER)})")
    if not 2 <= len(network.channels) <= MAX_DEPTH or not all(1 <= c <= MAX_CHANNELS for c in network.channels):
        problems.append(f"channels {list(network.channels)} (2-{MAX_DEPTH} levels of 1-{MAX_CHANNELS})")
    if len(network.strides) != len(network.channels) - 1 or not all(1 <= s <= 4 for s in network.strides):
        problems.append(f"strides {list(network.strides)} (one of 1-4 per level after the first)")
    if not 0 <= network.num_res_units <= MAX_DEPTH:
        problems.append(f"num_res_units {network.num_res_units} (0-{MAX_DEPTH})")
    if not 1 <= network.disc_channels <= MAX_CHANNELS or not 0 <= network.disc_layers <= MAX_DEPTH:
        problems.append(f"disc_channels {network.disc_channels} / disc_layers {network.disc_layers}")
    if network.kind in ("spade", "inpainting"):
        from .spade_generator import UPSAMPLE_MODES

        if not 0 <= network.bottleneck_blocks <= MAX_DEPTH:
            problems.append(f"bottleneck_blocks {network.bottleneck_blocks} (0-{MAX_DEPTH})")
        if not 1 <= network.spade_hidden <= MAX_CHANNELS:
            problems.append(f"spade_hidden {network.spade_hidden} (1-{MAX_CHANNELS})")
        if not 0 <= network.style_dim <= MAX_CHANNELS:
            problems.append(f"style_dim {network.style_dim} (0-{MAX_CHANNELS})")
        if network.upsample not in UPSAMPLE_MODES:
            problems.append(f"upsample {network.upsample!r} (one of {', '.join(UPSAMPLE_MODES)})")
    if problems:
        raise InputError(source, "network: " + "; ".join(problems))
    parameters = sum(shape_numel(shape) for shape in network_shapes(network).values())
    if parameters > MAX_NETWORK_PARAMETERS:
        raise InputError(source, f"network of {parameters:,} parameters is over MedSynth's limit of "
                                 f"{MAX_NETWORK_PARAMETERS:,}")
    return network


def shape_numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def network_shapes(network: "NetworkConfig", backend: str = "torch") -> dict[str, tuple[int, ...]]:
    """The generator's tensor shapes, from a network built on torch's meta device (nothing allocated)."""
    import torch

    from .networks import Generator

    with torch.device("meta"):
        generator = Generator(network, backend=backend)
    return {k: tuple(v.shape) for k, v in generator.state_dict().items()}


def check_model_config(config: dict[str, Any], source: Path) -> "NetworkConfig":
    """The parts of a model config that inference reads: network, intensity statistics, appearance, hashes, name."""
    return _check_model_config(config, source)[0]


def _check_model_config(config: dict[str, Any], source: Path) -> tuple[
        "NetworkConfig", dict[str, "Normalizer"], "AppearancePrior | None"]:
    """:func:`check_model_config`, also returning the normalisers and appearance prior it built while checking."""
    from ..schema.jsonshape import json_type_name
    from .normalize import HealthyTissueZScore, normalizer_from_json

    if "network" not in config:
        raise InputError(source, "model config has no 'network'")
    network = check_network_config(config["network"], source)
    if not isinstance(config.get("weights_sha256"), str):
        raise InputError(source, "model config: 'weights_sha256' must be a string")
    if "name" in config and not isinstance(config["name"], str):
        raise InputError(source, f"model config: 'name' must be a string, not {json_type_name(config['name'])}")
    intensity = config.get("intensity")
    if not isinstance(intensity, dict):
        raise InputError(source, "model config: 'intensity' must be an object of per-modality statistics")
    normalizers = {}
    for modality in network.modalities:
        entry = intensity.get(modality)
        try:
            if not isinstance(entry, dict):
                raise TypeError("missing")
            normaliser = normalizer_from_json(entry)
            values = [v for k, v in normaliser.to_json().items() if k != "kind"]  # every statistic, a floor too
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                       for v in values):
                raise ValueError("not finite numbers")
            if getattr(normaliser, "high", 1.0) <= getattr(normaliser, "low", 0.0) or min(
                    getattr(normaliser, "std", 1.0), getattr(normaliser, "scale", 1.0)) <= 0:
                raise ValueError("an empty range")
            if isinstance(normaliser, HealthyTissueZScore) and normaliser.floor is not None and not (
                    0 <= normaliser.floor < normaliser.mean + normaliser.std * normaliser.scale):
                raise ValueError("a floor outside the intensity range")
        except (TypeError, ValueError) as exc:
            raise InputError(source, f"model config: intensity statistics of {modality} are invalid ({exc}): "
                                     f"{json.dumps(entry)[:80]}") from None
        normalizers[modality] = normaliser
    appearance = None
    if config.get("appearance") is not None:
        from .appearance import AppearancePrior

        appearance = AppearancePrior.from_json(config["appearance"], source, network.style_dim)
    return network, normalizers, appearance


def check_weights(path: Path, network: "NetworkConfig") -> None:
    """The weights file is safetensors, fits the network's shapes exactly, and holds finite values."""
    _load_weights(path, _read_weights_file(path), network)


def _load_weights(path: Path, data: bytes, network: "NetworkConfig") -> dict[str, "torch.Tensor"]:
    """The tensors of a safetensors file's bytes, checked: the network's shapes exactly, finite values.

    ``path`` only names the file in messages; the bytes are the ones that were hashed.
    """
    import torch
    from safetensors.torch import load as load_safetensors

    expected = network_shapes(network)
    try:
        tensors = load_safetensors(data)
    except Exception as exc:  # safetensors raises its own error type for any malformed file
        message = " ".join(str(exc).split()) or exc.__class__.__name__
        raise InputError(path, f"not a valid safetensors file ({message[:160]})") from None
    stored = {k: tuple(v.shape) for k, v in tensors.items()}
    if stored != expected:
        missing = sorted(set(expected) - set(stored))
        unexpected = sorted(set(stored) - set(expected))
        wrong = sorted(k for k in set(stored) & set(expected) if stored[k] != expected[k])
        detail = (f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} of another shape"
                  + (f", e.g. {wrong[0]} {stored[wrong[0]]} vs {expected[wrong[0]]}" if wrong else ""))
        raise InputError(path, f"weights do not fit the network in config.json ({detail})")
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InputError(path, f"weights hold NaN or infinite values (tensor {key})")
    return tensors


def write_model(folder: Path, state: dict[str, Any], config: dict[str, Any], *, overwrite: bool = False) -> Path:
    """Write a model folder atomically; ``config`` gets format, schema and weights hash."""
    from safetensors.torch import save_file

    from ..schema.volume_io import atomic_directory

    with atomic_directory(folder, overwrite=overwrite) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME))
        config = with_config_sha256(dict(config, format=MODEL_FORMAT, label_schema_version=SCHEMA_VERSION,
                                         weights_sha256=file_sha256(tmp / WEIGHTS_NAME)))
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        for path in tmp.iterdir():  # safetensors writes 0600; a model folder is meant to be shared
            path.chmod(0o644)
    return folder


def load_generator(model: ModelCard, device: str = "cpu", backend: str = "torch"):
    """Build the generator of a model card and load its weights (already read and checked; no file I/O).

    ``backend="torch"`` (inference) builds the MONAI-free copy of the U-Net; ``"monai"`` the training one.
    """
    from .networks import Generator

    net = Generator(model.network, backend=backend)
    missing, unexpected = net.load_state_dict(model.tensors, strict=False)
    if missing or unexpected:
        raise InputError(model.weights, f"weights do not fit the architecture in config.json "
                                        f"(missing {len(missing)}, unexpected {len(unexpected)} tensors)")
    return net.to(device).eval()


def check_model_name(name: str) -> None:
    """A registered or shared model's name is a folder name: letters, digits, '.', '_' or '-'."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise MedSynthError(f"model name {name!r}: use letters, digits, '.', '_' or '-'")
    if name.lower() in RESERVED_NAMES:  # lower: a registry folder may be on a case-insensitive disk
        raise MedSynthError(f"model name {name!r} is reserved (a file of the registry folder)")


#: Names in a registry folder that are not model folders.
RESERVED_NAMES = (REGISTRY_NAME,)


#: What a shared model keeps of its ``training`` record: no command (paths), file hash or case name.
SHARED_TRAINING_KEYS = ("steps", "training_seconds", "precision", "device", "world_size", "final_losses")
#: Training-config fields that name cases: a shared model keeps only how many (a list of counts per fold).
CASE_NAME_KEYS = ("val_cases", "cv_folds")


def _shared_training(training: dict[str, Any]) -> dict[str, Any]:
    """The training record without identifiers: hyperparameters and counts, no names, paths, commands or hashes."""
    out: dict[str, Any] = {k: training[k] for k in SHARED_TRAINING_KEYS if k in training}
    config = training.get("config")
    if isinstance(config, dict):
        kept = {k: v for k, v in config.items() if k != "init_from" and k not in CASE_NAME_KEYS}
        if isinstance(config.get("val_cases"), list):
            kept["val_cases"] = len(config["val_cases"])
        if isinstance(config.get("cv_folds"), list):
            kept["cv_folds"] = [len(fold) if isinstance(fold, list) else 0 for fold in config["cv_folds"]]
        out["config"] = kept
    data = training.get("data")
    if isinstance(data, dict):  # a case's file sha256 tells whoever holds that file that the patient was in it
        out["data"] = {k: data[k] for k in ("cases", "tumour_voxels") if k in data}
    out["fine_tuned"] = bool(training.get("init_from"))
    return out


def share_model(source: str | os.PathLike[str], output: str | os.PathLike[str], *, name: str | None = None,
                overwrite: bool = False) -> ModelCard:
    """Write a copy of a model to give away: the same weights, a config that names none of its training cases.

    A model trained on a hospital's patients records how it was made (the training commands with their
    folder paths, the case names of its validation and cross-validation splits, each case file's sha256),
    so whoever receives it could learn who was in the training set.  The copy keeps what running and
    judging the model needs (architecture, label schema, intensity statistics, hyperparameters, counts,
    validation summary) and records what was removed.  The weights are copied byte for byte, so the copy
    synthesises the same images and has the same sha256.

    Raises:
        MedSynthError: ``source`` is not a valid model, ``output`` exists (without ``overwrite``), a bad name.
        InputError: ``output`` is the source model's folder, a folder holding it (the training run around it) or a
            path inside it (links, relative paths and a registered name's folder resolved), even with ``overwrite``.
    """
    from ..schema.volume_io import check_not_an_input, enclosing_folder

    model = resolve_model(source)
    output = Path(output)
    check_not_an_input([output], [model.path])  # the model folder itself, or a folder that holds it
    if enclosing_folder(output, [model.path]) is not None:
        raise InputError(output, f"lies inside the input model folder {model.path} of this command: "
                                 "write the output elsewhere")
    name = name or output.name
    check_model_name(name)
    config = {k: v for k, v in model.config.items() if k not in ("name", "training", "validation")}
    config["name"] = name
    if isinstance(model.config.get("training"), dict):
        config["training"] = _shared_training(model.config["training"])
    validation = model.config.get("validation")
    if isinstance(validation, dict):
        config["validation"] = {k: v for k, v in validation.items() if isinstance(v, (int, float))}
    config["shared"] = {"identifiers_removed": ["training.commands", "training.config.val_cases (names)",
                                                "training.config.cv_folds (names)", "training.data.case_sha256",
                                                "training.init_from", "validation.per_case"]}
    return write_model_copy(model, config, output, overwrite=overwrite)


def write_model_copy(model: ModelCard, config: dict[str, Any], output: Path, *, overwrite: bool = False) -> ModelCard:
    """A new model folder: ``model``'s weights file byte for byte (the same sha256) beside ``config``, atomically."""
    import shutil

    from ..schema.volume_io import atomic_directory

    with atomic_directory(output, overwrite=overwrite) as tmp:
        shutil.copyfile(model.weights, tmp / WEIGHTS_NAME)
        (tmp / CONFIG_NAME).write_text(json.dumps(with_config_sha256(config), indent=2) + "\n")
        for path in tmp.iterdir():  # a model folder is meant to be shared
            path.chmod(0o644)
    return resolve_model(output)


def register_model(source: str | os.PathLike[str], name: str, *, make_default: bool = False,
                   root: Path | None = None, overwrite: bool = False,
                   spread_limit: float | None = None, trust_config: bool = False) -> ModelCard:
    """Copy a verified model folder into the registry folder and list it (name -> folder + sha256 of the weights +
    ``config_sha256`` of the registered config's content, which loading checks from then on).

    ``root`` defaults to :func:`models_root`; a name the shipped registry lists is refused in any other registry.
    Only ``make_default`` makes the model its kind's default (of ``root``'s registry, which overrides the shipped).

    ``spread_limit`` (models with an appearance prior) is written into the registered copy's appearance record: the
    widest appearance spread synthesis will accept with it, as measured for its model card (the source folder is
    left as it is).  Without it the copy keeps the limit the model's own record carries (what its trainer
    measured), else 1.  ``trust_config`` adopts a model whose config has no ``config_sha256`` (written before MedSynth
    recorded it): its config as it is now is registered as the model's, and the copy gets its checksum."""
    import shutil

    from ..schema.volume_io import atomic_directory, write_json

    check_model_name(name)
    model = resolve_model(source, trust_config=trust_config)
    if spread_limit is not None:
        from .appearance import check_spread_limit

        if model.appearance is None:
            raise InputError(model.path, "--appearance-spread-limit applies to a model with an appearance prior "
                                         "(config 'appearance'); this one has none")
        try:
            spread_limit = check_spread_limit(spread_limit)
        except MedSynthError as exc:
            raise InputError(model.path, f"--appearance-spread-limit: {exc}") from None
    root = root or models_root()
    registry = read_registry(root)  # read (and checked) before anything is written
    shipped = shipped_models_root()
    if not _same_folder(root, shipped) and name in read_registry(shipped)["models"]:
        # The shipped registry is read-only and listed beside the user's: one name must mean one model.
        raise InputError(root / REGISTRY_NAME, f"{name!r} is a shipped model ({shipped / REGISTRY_NAME}), which "
                                               "this registry cannot replace: register yours under another name")
    for kind, default_key in DEFAULT_KEYS.items():  # a default keeps its kind
        if registry.get(default_key) == name and model.kind != kind:
            raise InputError(root / REGISTRY_NAME, f"{name!r} is the registry's default {kind} model "
                                                   f"({default_key!r}); {os.fspath(source)} is {_a(model.kind)} model: "
                                                   "register it under another name")
    key = DEFAULT_KEYS.get(model.kind)
    if make_default and key is None:
        raise InputError(model.path, f"{_a(model.kind)} model cannot be a registry default")
    with atomic_directory(root / name, overwrite=overwrite) as tmp:
        for file_name in (CONFIG_NAME, WEIGHTS_NAME):
            shutil.copy2(model.path / file_name, tmp / file_name)
        config = json.loads((tmp / CONFIG_NAME).read_text())
        if spread_limit is not None or CONFIG_SHA_KEY not in config:
            if spread_limit is not None:
                config["appearance"]["spread_limit"] = spread_limit
            config = with_config_sha256(config)
            write_json(config, tmp / CONFIG_NAME, overwrite=True)
    registry.setdefault("models", {})[name] = {"path": name, "sha256": model.sha256,
                                               CONFIG_SHA_KEY: config[CONFIG_SHA_KEY]}
    if key is not None and make_default:  # only --default changes what runs without --model
        registry[key] = name
    write_json(registry, root / REGISTRY_NAME, overwrite=True)
    return resolve_model(name) if root == models_root() else model
