"""Checkpoint folders shared by the GAN's training and the study's segmenter: safetensors + JSON.

A checkpoint is a folder: one ``NAME.safetensors`` per module and per optimizer, and
``state.json`` with the step, the caller's own fields, each optimizer's non-tensor
state (param groups, scalar entries), the sha256 of every ``.safetensors`` file and the
label-schema version.  Nothing is pickled.  The folder is written under a
hidden temporary name and renamed into place (a folder of the same name is set aside
first and deleted last), so a kill leaves the previous checkpoint whole; loading checks
``state.json`` and turns any bad file into one clear line.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..schema.errors import InputError
from ..schema.jsonshape import not_an_integer
from ..schema.labels import SCHEMA_VERSION
from ..synthesis.models import file_sha256
from ..synthesis.networks import state_dict_unwrapped

STATE_NAME = "state.json"


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
                     optimizers: Mapping[str, torch.optim.Optimizer | None], **fields: Any) -> Path:
    """Write the checkpoint folder ``folder`` atomically (a temporary sibling renamed into place).

    ``None`` entries are skipped (a run without a discriminator); ``fields`` go into ``state.json``.
    """
    from safetensors.torch import save_file

    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta: dict[str, Any] = {"step": step, **fields}
    for name, module in modules.items():
        if module is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in state_dict_unwrapped(module).items()}
            save_file(state, str(tmp / f"{name}.safetensors"))
    for name, optimizer in optimizers.items():
        if optimizer is not None:
            tensors, meta[name] = optimizer_tensors(optimizer)
            save_file(tensors, str(tmp / f"{name}.safetensors"))
    # Like a model's config.json: a resume checks the bytes it loads and the label schema they were trained on.
    meta["label_schema_version"] = SCHEMA_VERSION
    meta["files_sha256"] = {p.name: file_sha256(p) for p in sorted(tmp.glob("*.safetensors"))}
    (tmp / STATE_NAME).write_text(json.dumps(meta, indent=1))
    # A name can be reused (a resume rewrites a step whose pointer was not yet updated; the segmenter
    # keeps one folder): the old folder is set aside, not deleted, until the new one is in place.
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    try:
        os.replace(tmp, folder)
    except BaseException:
        if old.exists():
            os.replace(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return folder


def read_checkpoint(folder: Path, modules: Mapping[str, nn.Module | None],
                    optimizers: Mapping[str, torch.optim.Optimizer | None], *, what: str = "") -> dict[str, Any]:
    """Load a checkpoint folder into ``modules`` and ``optimizers``; returns ``state.json``.

    Args:
        what: names the model in messages ("the segmenter"); empty for the GAN.

    Raises:
        InputError: a missing or malformed file, or weights of another shape (one line, naming the file).
    """
    from safetensors.torch import load_file

    from ..schema.jsonshape import read_json

    label = f"{what} checkpoint state" if what else "checkpoint state"
    meta = read_json(folder / STATE_NAME, label.strip())
    wanted = [name for name, optimizer in optimizers.items() if optimizer is not None]
    if not isinstance(meta.get("step"), int) or not all(isinstance(meta.get(name), dict) for name in wanted):
        raise InputError(folder / STATE_NAME, f"{label.strip()} needs an integer 'step' and "
                                              + " and ".join(f"'{name}'" for name in wanted))
    _check_recorded(folder, meta, [name for name, module in modules.items() if module is not None] + wanted, what)
    current = folder
    try:
        for name, module in modules.items():
            if module is not None:
                current = folder / f"{name}.safetensors"
                module.load_state_dict(load_file(str(current)))
        for name in wanted:
            current = folder / f"{name}.safetensors"
            load_optimizer(optimizers[name], load_file(str(current)), meta[name])
    except Exception as exc:  # safetensors' own error type, a shape mismatch, a malformed optimizer record
        message = " ".join(str(exc).split())[:160] or exc.__class__.__name__
        subject = f" {what}" if what else ""
        raise InputError(current, f"cannot resume{subject} from this checkpoint ({message})") from None
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
