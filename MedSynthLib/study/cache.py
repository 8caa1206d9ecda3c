"""What a study's work folder holds: which cache version each stage result belongs to, who holds the
folder, and removing the synthetic cases and arm results a finished run superseded.

Every stage result the study writes records the identity its cache key hashes (``"cache"``: the stage's
inputs and configuration, the hash of its code, when it was written), so a reader that finds results by
content (:mod:`MedSynthLib.study.preview`) can tell a result of the running study from one of an older
version of MedSynth or of other options left in the same folder.  Results written before this record
existed carry none; a reader uses them only where they are the only candidate.

A study process holds its work folder with a shared POSIX lock on ``WORK/.medsynth-study.lock`` (one per
process, released by the kernel when the process dies); removing superseded files needs the lock alone,
so nothing is removed while a preview, a records save or another study uses the folder.  POSIX locks
(not ``flock``) because turning a process's shared lock into an exclusive one either succeeds or leaves
the shared lock in place: another process can never slip in between.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from .stages import code_hash

LOCK_NAME = ".medsynth-study.lock"
KEY = re.compile(r"[0-9a-f]{16}")


def normalise(value: Any) -> Any:
    """``value`` as it reads back from JSON (what ``stage_key`` hashes: tuples as lists, paths as text)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def cache_record(inputs: Any, config: Any, modules: Sequence[str]) -> dict[str, Any]:
    """The ``"cache"`` field of a stage result: the identity ``stage_key(inputs, config, modules)`` hashes."""
    return {"inputs": normalise(inputs), "config": normalise(config), "code": code_hash(modules),
            "written": time.time()}


def matches(record: dict[str, Any], inputs: Any, config: Any, ignore: Iterable[str] = ()) -> bool:
    """Whether a result's cache record was made from these inputs and this config (``ignore``: input fields
    a reader cannot know, such as the GAN's sha256 or the number of torchrun processes)."""
    skip = set(ignore)
    have = {k: v for k, v in (record.get("inputs") or {}).items() if k not in skip}
    want = {k: v for k, v in normalise(inputs).items() if k not in skip}
    return have == want and record.get("config") == normalise(config)


class WorkLock:
    """A study process's shared hold on its work folder (see the module's docstring)."""

    def __init__(self, work: Path) -> None:
        self.path = Path(work) / LOCK_NAME
        self.fd: int | None = None

    def __enter__(self) -> "WorkLock":
        for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):
            try:
                self.fd = os.open(self.path, flags, 0o666)
                break
            except OSError:
                continue
        if self.fd is not None:
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_SH)  # waits while another process removes superseded files
            except OSError:  # a file system without locks: the folder is not held
                os.close(self.fd)
                self.fd = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock
            self.fd = None

    @contextlib.contextmanager
    def alone(self) -> Iterator[bool]:
        """True inside while no other process holds the work folder (this one holds it exclusively)."""
        if self.fd is None:
            yield False
            return
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_SH)


# The entries a study writes in each stage folder, by the key of the result they belong to.
_ENTRIES = {
    "synthetic": re.compile(rf"(?P<key>{KEY.pattern})|\.(?P<staged>{KEY.pattern})\..+"),
    "arms": re.compile(rf"(?P<key>{KEY.pattern})\.(?:json|ckpt|nnunet)"),
    "fidelity": re.compile(rf"(?P<key>{KEY.pattern})(?:\.json|_.+_synthetic\.npy)"),
    "memorisation": re.compile(rf"(?P<key>{KEY.pattern})\.json"),
    "baseline": re.compile(rf"(?P<key>{KEY.pattern})\.json"),
}


def superseded(work: Path, keep: dict[str, Iterable[str]]) -> list[Path]:
    """The entries of ``work``'s stage folders (``synthetic``, ``arms``, ``fidelity``, ``memorisation``,
    ``baseline``) whose key is not in ``keep[folder]``: the results a finished run did not use.

    Only entries named as the study names them (a 16-hex-digit key, an arm's unfinished ``.ckpt`` / ``.nnunet``
    folder, the hidden staging folder of a synthesis that was killed) directly in those folders, and never a
    link: a file someone else put there, or anything outside the work folder, stays.  The GAN models stay
    (a given ``--gan-model`` may be one of them, and they are the costliest stage to make again).
    """
    work = Path(work)
    found: list[Path] = []
    for folder, pattern in _ENTRIES.items():
        parent = work / folder
        if parent.is_symlink() or not parent.is_dir():
            continue
        kept = set(keep.get(folder, ()))
        for entry in sorted(parent.iterdir()):
            match = pattern.fullmatch(entry.name)
            if match and not entry.is_symlink() and match.group("key") not in kept:
                found.append(entry)  # a staging folder has no key: none of them is in use by then
    return found


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def remove(paths: Sequence[Path]) -> int:
    """Remove files and folders; returns the bytes freed."""
    freed = 0
    for path in paths:
        with contextlib.suppress(OSError):
            freed += _size(path)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return freed


__all__ = ["LOCK_NAME", "WorkLock", "cache_record", "matches", "normalise", "remove", "superseded"]
