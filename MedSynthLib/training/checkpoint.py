"""Checkpoint folders shared by the GAN's training and the study's segmenter: safetensors + JSON.

A checkpoint is a folder: one ``NAME.safetensors`` per module and per optimizer, and
``state.json`` with the step, the caller's own fields, each optimizer's non-tensor
state (param groups, scalar entries), the sha256 of every ``.safetensors`` file and the
label-schema version.  Nothing is pickled.  The folder is written under a
hidden temporary name and renamed into place (a folder of the same name is set aside
first and deleted last), so a kill leaves the previous checkpoint whole.  The rename and the
caller's pointer to the new folder (``on_placed``) run with Ctrl+C and SIGTERM held back, so an
interruption never leaves a checkpoint in place that the pointer does not name yet.  An interruption inside
the write (Ctrl+C, or SIGTERM, which the CLI raises as ``Terminated``) removes the staging folder; what
a hard kill leaves (``.step_N.tmp``, ``.step_N.old`` beside a training run's ``step_N`` folders) is
removed by the next write and by a resume.  ``state.json`` also records the network of each module built from a
:class:`~MedSynthLib.synthesis.networks.NetworkConfig` (the generator).  Loading checks ``state.json`` and turns any
bad file into one clear line: a checkpoint of another network names the fields that differ (from the record, or
for a checkpoint without one, from its tensor shapes), and weights or optimizer state holding NaN or infinity
are refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..schema.errors import InputError
from ..schema.jsonshape import not_an_integer
from ..schema.labels import SCHEMA_VERSION
from ..schema.outputs import signals_deferred
from ..synthesis.models import file_sha256
from ..synthesis.networks import NetworkConfig, state_dict_unwrapped

STATE_NAME = "state.json"
#: What a hard kill (SIGKILL, power loss) inside :func:`write_checkpoint` can leave beside a training run's
#: ``step_NNNNNNN`` checkpoints: a staging folder, or the set-aside copy of a step being rewritten.
STALE_STAGING = re.compile(r"\.step_\d{7}\.(tmp|old)")
#: A training run's checkpoint folder (``train.CHECKPOINT_NAME``): named after the step it holds.
STEP_FOLDER = re.compile(r"step_(\d{7})")


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state split into tensors (for safetensors) and the rest (for JSON)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().clone().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """The inverse of :func:`optimizer_tensors`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def write_checkpoint(folder: Path, step: int, modules: Mapping[str, nn.Module | None],
                     optimizers: Mapping[str, torch.optim.Optimizer | None], *,
                     on_placed: Callable[[Path], Any] | None = None, **fields: Any) -> Path:
    """Write the checkpoint folder ``folder`` atomically (a temporary sibling renamed into place).

    ``None`` entries are skipped (a run without a discriminator); ``fields`` go into ``state.json``.
    ``on_placed(folder)`` runs right after the rename, under the same hold on Ctrl+C and SIGTERM (a training
    run points ``latest.json`` at the new folder there).
    """
    from safetensors.torch import save_file

    tmp = folder.with_name(f".{folder.name}.tmp")
    old = folder.with_name(f".{folder.name}.old")
    remove_stale_staging(folder.parent)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    placed = False
    try:
        tmp.mkdir(parents=True)
        meta: dict[str, Any] = {"step": step, **fields}
        networks = {name: network.to_json() for name, network in
                    ((name, network_of(module)) for name, module in modules.items()) if network is not None}
        if networks:  # a resume names what differs in a checkpoint of another network (read_checkpoint)
            meta["networks"] = networks
        for name, module in modules.items():
            if module is not None:
                state = {k: v.detach().cpu().contiguous() for k, v in state_dict_unwrapped(module).items()}
                save_file(state, str(tmp / f"{name}.safetensors"))
        for name, optimizer in optimizers.items():
            if optimizer is not None:
                tensors, meta[name] = optimizer_tensors(optimizer)
                save_file(tensors, str(tmp / f"{name}.safetensors"))
        # Like a model's config.json: a resume checks the bytes it loads and the label schema it was trained on.
        meta["label_schema_version"] = SCHEMA_VERSION
        meta["files_sha256"] = {p.name: file_sha256(p) for p in sorted(tmp.glob("*.safetensors"))}
        (tmp / STATE_NAME).write_text(json.dumps(meta, indent=1))
        # A name can be reused (a resume rewrites a step whose pointer was not yet updated; the segmenter
        # keeps one folder): the old folder is set aside, not deleted, until the new one is in place.
        with signals_deferred():  # an interruption lands before the rename or after the pointer names it
            if folder.exists():
                os.replace(folder, old)
            os.replace(tmp, folder)
            placed = True
            if on_placed is not None:
                on_placed(folder)
    except BaseException:  # Ctrl+C, SIGTERM (the CLI's Terminated), a failed write: no staging folder stays
        if not placed and old.exists() and not folder.exists():
            os.replace(old, folder)  # the checkpoint set aside goes back in place
        shutil.rmtree(tmp, ignore_errors=True)
        if placed:  # a signal held back during the rename arrives here: the new folder is in place
            shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return folder


def remove_stale_staging(checkpoints: Path) -> None:
    """Remove what a hard kill inside :func:`write_checkpoint` left in a run's ``checkpoints/`` folder.

    Only ``.step_NNNNNNN.tmp`` and ``.step_NNNNNNN.old`` folders: the pointer never names them (it is
    updated after the rename), so they are never a checkpoint a run resumes from.
    """
    try:
        entries = list(Path(checkpoints).iterdir())
    except OSError:
        return
    for entry in entries:
        if STALE_STAGING.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


def read_checkpoint(folder: Path, modules: Mapping[str, nn.Module | None],
                    optimizers: Mapping[str, torch.optim.Optimizer | None], *, what: str = "") -> dict[str, Any]:
    """Load a checkpoint folder into ``modules`` and ``optimizers``; returns ``state.json``.

    Args:
        what: names the model in messages ("the segmenter"); empty for the GAN.

    Raises:
        InputError: a missing or malformed file, weights of another network, or NaN or infinite values (one line,
            naming the file).
    """
    from safetensors.torch import load_file

    from ..schema.jsonshape import read_json

    label = f"{what} checkpoint state" if what else "checkpoint state"
    meta = read_json(folder / STATE_NAME, label.strip())
    # Checked before the caller writes anything (a resume's train_config.json, its tensorboard file):
    # true would pass as step 1 (bool is an int), a negative step ended in a numpy traceback.
    step = meta.get("step")
    problem = not_an_integer(step) if "step" in meta else "is missing"
    if problem is None and step < 0:
        problem = f"is negative (got {step})"
    if problem:
        raise InputError(folder / STATE_NAME, f"{label.strip()} 'step' {problem}: it must be a whole number >= 0")
    # A training run's step_NNNNNNN folder is named after the step it holds: another step (99 in a 4-step
    # run's step_0000002) would resume past the end and export step 2's weights as the finished model.
    named = STEP_FOLDER.fullmatch(folder.name)
    if named and int(named.group(1)) != step:
        raise InputError(folder / STATE_NAME, f"{label.strip()} 'step' is {step}, but its folder {folder.name} holds "
                                              f"step {int(named.group(1))}: the file was changed after it was written")
    wanted = [name for name, optimizer in optimizers.items() if optimizer is not None]
    if not all(isinstance(meta.get(name), dict) for name in wanted):
        raise InputError(folder / STATE_NAME, f"{label.strip()} needs "
                                              + " and ".join(f"'{name}'" for name in wanted))
    _check_recorded(folder, meta, [name for name, module in modules.items() if module is not None] + wanted, what)
    subject = f" {what}" if what else ""
    networks = {name: network_of(module) for name, module in modules.items() if module is not None}
    recorded = _recorded_networks(folder / STATE_NAME, meta)
    for name, ours in networks.items():
        if ours is not None and name in recorded:
            differ = network_differences(recorded[name], ours.to_json(), "the checkpoint", "this run's config")
            if differ:
                raise InputError(folder / f"{name}.safetensors",
                                 f"cannot resume{subject} from this checkpoint: it holds another network ({differ})")
    for name in [*networks, *wanted]:
        current = folder / f"{name}.safetensors"
        try:
            tensors = load_file(str(current))
        except Exception as exc:  # safetensors' own error type (truncated, garbage, a pickle)
            message = " ".join(str(exc).split())[:160] or exc.__class__.__name__
            raise InputError(current, f"cannot resume{subject} from this checkpoint (not a valid safetensors file: "
                                      f"{message})") from None
        bad = next((key for key, value in tensors.items()
                    if value.is_floating_point() and not bool(torch.isfinite(value).all())), None)
        if bad is not None:  # a run resumed from it would train on NaN and stop later, blaming training
            raise InputError(current, f"cannot resume{subject} from this checkpoint: it holds NaN or infinite values "
                                      f"(tensor {bad})")
        if name in networks:
            problem = _shape_problem(modules[name], tensors, networks)
            if problem:
                raise InputError(current, f"cannot resume{subject} from this checkpoint: {problem}")
        try:
            if name in networks:
                modules[name].load_state_dict(tensors)
            else:
                load_optimizer(optimizers[name], tensors, meta[name])
        except Exception as exc:  # a malformed optimizer record (another optimizer, other parameter groups)
            message = " ".join(str(exc).split())[:160] or exc.__class__.__name__
            raise InputError(current, f"cannot resume{subject} from this checkpoint ({message})") from None
    remove_stale_staging(folder.parent)  # a resume: a hard kill's leftovers go before the run writes again
    return meta


def _check_recorded(folder: Path, meta: dict[str, Any], names: list[str], what: str = "") -> None:
    """The label-schema version and each file's sha256 that ``state.json`` records (checkpoints written
    before they were recorded carry neither and load as before)."""
    state = folder / STATE_NAME
    version = meta.get("label_schema_version")
    problem = None if version is None else not_an_integer(version)
    if problem:
        raise InputError(state, f"'label_schema_version' {problem}")
    if version is not None and version != SCHEMA_VERSION:
        raise InputError(state, f"checkpoint uses label schema version {version}, this MedSynth uses "
                                f"{SCHEMA_VERSION}: resume it with a matching MedSynth")
    hashes = meta.get("files_sha256")
    if hashes is None:
        return
    if not isinstance(hashes, dict) or not all(isinstance(v, str) for v in hashes.values()):
        raise InputError(state, "'files_sha256' must map each .safetensors file to its sha256")
    for name in names:
        path = folder / f"{name}.safetensors"
        wanted = hashes.get(path.name)
        if wanted is None:
            raise InputError(state, f"records no sha256 for {path.name}")
        if not path.is_file():
            raise InputError(path, "checkpoint file missing")
        actual = file_sha256(path)
        if actual != wanted:
            subject = f" {what}" if what else ""
            raise InputError(path, f"cannot resume{subject} from this checkpoint (sha256 {actual[:12]}... does not "
                                   f"match its state.json, {wanted[:12]}...: the file is corrupt or was replaced)")


def _recorded_networks(state: Path, meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``state.json``'s network of each module, with the fields a later MedSynth added at their defaults."""
    recorded = meta.get("networks", {})
    if not isinstance(recorded, dict) or not all(isinstance(v, dict) for v in recorded.values()):
        raise InputError(state, "'networks' must map each module to its network's fields")
    try:
        return {name: NetworkConfig.from_json(fields).to_json() for name, fields in recorded.items()}
    except (TypeError, ValueError) as exc:
        raise InputError(state, f"'networks' records a network that cannot be built ({exc})") from None


def network_of(module: nn.Module | None) -> NetworkConfig | None:
    """The network config a module was built from (the generator's; a DistributedDataParallel wrapper looked
    through), or None (the discriminator, the study's segmenter)."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        module = module.module
    config = getattr(module, "config", None)
    return config if isinstance(config, NetworkConfig) else None


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def network_differences(theirs: Mapping[str, Any], ours: Mapping[str, Any], their_name: str, our_name: str) -> str:
    """The fields of two networks' JSON that differ, in the network's field order: "channels [4, 8, 16] in the
    checkpoint, [4, 8, 8] in this run's config; ..." (empty when none does)."""
    names = list(ours) + [k for k in theirs if k not in ours]
    return "; ".join(f"{k} {_show(theirs.get(k))} in {their_name}, {_show(ours.get(k))} in {our_name}"
                     for k in names if theirs.get(k) != ours.get(k))


def _shape_problem(module: nn.Module, tensors: Mapping[str, torch.Tensor],
                   networks: Mapping[str, NetworkConfig | None]) -> str | None:
    """Why ``tensors`` do not fit ``module`` (None when they do): the network fields that differ where the
    checkpoint's network can be told from its shapes, else how many tensors differ, with one example."""
    from ..synthesis.models import network_shapes

    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    stored = {k: tuple(v.shape) for k, v in tensors.items()}
    if stored == expected:
        return None
    ours = network_of(module)
    if ours is not None and network_shapes(ours) == expected:  # the search below builds this module's tensors
        theirs = infer_network(ours, stored)
        if theirs is not None:
            differ = network_differences(theirs.to_json(), ours.to_json(), "the checkpoint", "this run's config")
            return f"it holds another network ({differ}, as its tensor shapes show)"
    elif ours is None:
        # The discriminator's shapes follow the generator's config (disc_channels, disc_layers).
        for network in (n for n in networks.values() if n is not None):
            theirs = _infer_discriminator(network, stored)
            if theirs is not None:
                differ = network_differences(theirs.to_json(), network.to_json(), "the checkpoint",
                                             "this run's config")
                return f"it holds another network ({differ}, as its tensor shapes show)"
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    wrong = sorted(k for k in set(stored) & set(expected) if stored[k] != expected[k])
    example = (f"; e.g. {wrong[0]} is {list(stored[wrong[0]])} in the checkpoint, {list(expected[wrong[0]])} in "
               "this run's network" if wrong else "")
    return (f"its weights are of another network than this run's config ({len(wrong)} tensors of another shape, "
            f"{len(missing)} missing, {len(unexpected)} not in this run's network{example})")


#: Widths no real network has: a field set to one shows which tensor dimensions it sets.
_MARKERS = (1009, 1013, 1019, 1021, 1031, 1033, 1039, 1049, 1051, 1061, 1063, 1069)


def _with(network: NetworkConfig, **changes: Any) -> NetworkConfig | None:
    from dataclasses import replace

    try:
        return replace(network, **changes)
    except (TypeError, ValueError):
        return None


def _marked_fields(network: NetworkConfig) -> list[tuple[str, int | None]]:
    """The integer fields whose value sets tensor widths: (name, index into a tuple field or None)."""
    fields: list[tuple[str, int | None]] = [("channels", i) for i in range(len(network.channels))]
    return fields + [(name, None) for name in ("in_channels", "out_channels", "spade_hidden", "style_dim")]


def _read_widths(network: NetworkConfig, stored: Mapping[str, tuple[int, ...]], shapes_of: Callable[
        [NetworkConfig], dict[str, tuple[int, ...]] | None]) -> NetworkConfig | None:
    """``network`` with each width field set to the value the stored tensors hold where a marker shows it sits;
    None when the positions disagree or the result does not build those exact shapes."""
    values: dict[str, Any] = {}
    channels = list(network.channels)
    for (name, index), marker in zip(_marked_fields(network), _MARKERS):
        if name == "style_dim" and network.style_dim == 0:
            continue  # no style encoder to read a width from
        if index is None:
            marked = _with(network, **{name: marker})
        else:
            marked = _with(network, channels=tuple(marker if i == index else c for i, c in enumerate(channels)))
        shapes = shapes_of(marked) if marked is not None else None
        if shapes is None:
            continue
        seen = {stored[key][d] for key, shape in shapes.items() for d, size in enumerate(shape)
                if size == marker and key in stored and len(stored[key]) == len(shape)}
        if len(seen) > 1:
            return None
        if seen:
            if index is None:
                values[name] = seen.pop()
            else:
                channels[index] = seen.pop()
    found = _with(network, channels=tuple(channels), **values)
    return found if found is not None and shapes_of(found) == dict(stored) else None


def infer_network(ours: NetworkConfig, stored: Mapping[str, tuple[int, ...]]) -> NetworkConfig | None:
    """The generator network whose tensors have the ``stored`` shapes, searched near ``ours``: its number of
    levels (channels and strides), then each width; None when none is found (a checkpoint too unlike this run's
    network to say more than that its tensors differ)."""
    from ..synthesis.models import network_shapes

    def shapes_of(network: NetworkConfig) -> dict[str, tuple[int, ...]] | None:
        try:
            return network_shapes(network)
        except Exception:  # a combination the network cannot be built with
            return None

    stride = ours.strides[0] if ours.strides else 2
    for levels in [len(ours.channels)] + [n for n in range(2, 8) if n != len(ours.channels)]:
        channels = tuple(ours.channels[i] if i < len(ours.channels) else ours.channels[-1] for i in range(levels))
        candidate = _with(ours, channels=channels, strides=tuple(ours.strides[:levels - 1])
                          + (stride,) * max(0, levels - 1 - len(ours.strides)))
        shapes = shapes_of(candidate) if candidate is not None else None
        if shapes is not None and set(shapes) == set(stored):
            return _read_widths(candidate, stored, shapes_of)
    return None


def _infer_discriminator(ours: NetworkConfig, stored: Mapping[str, tuple[int, ...]]) -> NetworkConfig | None:
    """``ours`` with the discriminator's fields (layers, then width) whose PatchGAN has the ``stored`` shapes."""
    from ..synthesis.networks import build_discriminator

    def shapes_of(network: NetworkConfig) -> dict[str, tuple[int, ...]] | None:
        try:
            with torch.device("meta"):
                return {k: tuple(v.shape) for k, v in build_discriminator(network).state_dict().items()}
        except Exception:  # a combination the network cannot be built with
            return None

    for layers in [ours.disc_layers] + [n for n in range(1, 7) if n != ours.disc_layers]:
        candidate = _with(ours, disc_layers=layers)
        shapes = shapes_of(candidate) if candidate is not None else None
        if shapes is None or set(shapes) != set(stored):
            continue
        marked = shapes_of(_with(candidate, disc_channels=_MARKERS[0]))
        seen = {stored[key][d] for key, shape in (marked or {}).items() for d, size in enumerate(shape)
                if size == _MARKERS[0] and len(stored[key]) == len(shape)}
        if len(seen) == 1:
            found = _with(candidate, disc_channels=seen.pop())
            if found is not None and shapes_of(found) == dict(stored):
                return found
    return None
