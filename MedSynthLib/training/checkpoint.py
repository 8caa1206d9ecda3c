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
removed by the next write and by a resume.  Loading checks ``state.json`` and turns any bad file
into one clear line.
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
from ..synthesis.networks import state_dict_unwrapped

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
        InputError: a missing or malformed file, or weights of another shape (one line, naming the file).
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
