"""What a study's work folder holds: which cache version each stage result belongs to, who holds the
folder, and removing the synthetic cases and arm results a finished run superseded.

A work folder may serve studies of several configs (a researcher compares them in one folder), so a finished
run removes only older versions of its own results: a result whose record says it was made with the same
options and cases as one this run used for that stage and fold, by other code or from other GAN weights or
synthetic cases.  A result of other options stays, and so does one that does not say which options made it
(written by an older MedSynth, or an arm's unfinished training).

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
from typing import Any, Iterable, Iterator, List, Sequence, Tuple

from .stages import code_hash

LOCK_NAME = ".medsynth-study.lock"
KEY = re.compile(r"[0-9a-f]{16}")


def normalise(value: Any) -> Any:
    """``value`` as it reads back from JSON (what ``stage_key`` hashes: tuples as lists, paths as text)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def cache_record(inputs: Any, config: Any, modules: Sequence[str], options: Any = None) -> dict[str, Any]:
    """The ``"cache"`` field of a stage result: the identity ``stage_key(inputs, config, modules)`` hashes, and
    ``options`` the key does not hash but that tell whether another result was made with the same options (the
    GAN's, where the key holds only its weights' sha256)."""
    record = {"inputs": normalise(inputs), "config": normalise(config), "code": code_hash(modules),
              "written": time.time()}
    if options is not None:
        record["options"] = normalise(options)
    return record


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
# Where a result's record lies, by its key (its other entries, an unfinished training or fidelity's images, have none).
_RECORDS = {"synthetic": "{key}/index.json", "arms": "{key}.json", "fidelity": "{key}.json",
            "memorisation": "{key}.json", "baseline": "{key}.json"}
# The inputs of each stage's key that are versions of its result, not options: the GAN weights (their options are
# recorded apart, in "options"), the synthetic cases an arm or memorisation check used (linked to theirs), the
# template MedSynth ships, the study code's version.  Every other input and the config are the study's options.
_VERSIONS = {"synthetic": ("model", "template", "v"), "fidelity": ("model", "v"), "memorisation": ("synthetic", "v"),
             "arms": ("synthetic", "v"), "baseline": ("v",)}
SAME, OTHER, UNKNOWN = "same", "other", "unknown"


def _record_of(work: Path, folder: str, key: str) -> dict[str, Any] | None:
    try:
        data = json.loads((work / folder / _RECORDS[folder].format(key=key)).read_text())
    except (OSError, ValueError):
        return None
    record = data.get("cache") if isinstance(data, dict) else None
    return record if isinstance(record, dict) and isinstance(record.get("inputs"), dict) else None


def _compare(folder: str, record: dict[str, Any], used: dict[str, Any], synthetic: dict[str, str | None]) -> str:
    """Whether ``record`` was made with the options and cases of ``used`` (a record of this run's): SAME, OTHER,
    or UNKNOWN where its record cannot tell (no GAN options beside other GAN weights, synthetic cases of unknown
    options).  ``synthetic``: each synthetic key whose options are known, mapped to the key of this run's
    synthetic cases it is a version of (None: other options)."""
    versions = _VERSIONS[folder]
    have, want = record["inputs"], used["inputs"]
    if ({k: v for k, v in have.items() if k not in versions} != {k: v for k, v in want.items() if k not in versions}
            or record.get("config") != used["config"]):
        return OTHER
    if "model" in versions and have.get("model") != want.get("model"):
        if "options" not in record:
            return UNKNOWN
        if record["options"] != used.get("options"):
            return OTHER
    if "synthetic" in versions and have.get("synthetic") != want.get("synthetic"):
        older = have.get("synthetic")
        if older is None or older not in synthetic:
            return UNKNOWN if older is not None else OTHER
        if synthetic[older] != want.get("synthetic"):
            return OTHER
    return SAME


Result = Tuple[str, str, List[Path]]  # a stage folder, a result's key, the result's entries in it


def superseded(work: Path, used: dict[str, dict[str, dict[str, Any]]]) -> tuple[list[Result], list[Result]]:
    """The entries of ``work``'s stage folders (``synthetic``, ``arms``, ``fidelity``, ``memorisation``,
    ``baseline``) of the results that are older versions of this run's, and of those to keep because they do not
    say which options made them.  ``used[folder]``: the key and cache record of each result this finished run used.

    Superseded: a result whose record says it was made with the options and cases of a result this run used in
    that stage and fold (other code, GAN weights or synthetic cases of the same options), with all its entries
    (an arm's unfinished training, fidelity's images), and the staging folder of a synthesis that was killed
    (never read again).  Only entries named as the study names them, directly in those folders, and never a link:
    a file someone else put there, or anything outside the work folder, stays.  The GAN models stay (a given
    ``--gan-model`` may be one of them, and they are the costliest stage to make again).
    """
    work = Path(work)
    groups: dict[str, dict[str, list[Path]]] = {}
    old: list[Result] = []
    for folder, pattern in _ENTRIES.items():
        parent = work / folder
        if parent.is_symlink() or not parent.is_dir():
            continue
        for entry in sorted(parent.iterdir()):
            match = pattern.fullmatch(entry.name)
            if not match or entry.is_symlink():
                continue
            if match.group("key") is None:
                old.append((folder, match.group("staged"), [entry]))  # a killed synthesis's: never read again
            elif match.group("key") not in used.get(folder, {}):
                groups.setdefault(folder, {}).setdefault(match.group("key"), []).append(entry)
    unknown: list[Result] = []
    synthetic: dict[str, str | None] = {key: key for key in used.get("synthetic", {})}
    for folder in _ENTRIES:  # synthetic first: the arms and memorisation checks link to it
        for key, entries in groups.get(folder, {}).items():
            record = _record_of(work, folder, key)
            verdicts = {UNKNOWN} if record is None else {
                _compare(folder, record, mine, synthetic) for mine in used.get(folder, {}).values()}
            if SAME in verdicts:
                old.append((folder, key, entries))
                if folder == "synthetic":
                    synthetic[key] = next(k for k, mine in used["synthetic"].items()
                                          if _compare(folder, record, mine, synthetic) == SAME)
            elif UNKNOWN in verdicts:
                unknown.append((folder, key, entries))
            elif folder == "synthetic":
                synthetic[key] = None
    return old, unknown


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
