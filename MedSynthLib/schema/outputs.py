"""Safe output commits: one lock per output, staging beside it, and only MedSynth's own files replaced.

Every command that writes an output (a label map with its sidecar, a synthetic case
folder) builds it in a hidden staging folder beside the output, then commits it
while holding an exclusive ``fcntl`` lock on a lock file beside the output
(``.NAME.medsynth-lock``, removed again when the commit is done).  Under the lock it checks again whether the output exists
(another run may have finished meanwhile): without ``overwrite`` it refuses and
nothing of this run is left; with ``overwrite`` it replaces only the files it
writes, so a user's other files in an output folder stay.  Readers of a label map
take the same lock shared, so they never see one run's image with another's sidecar.
Staging folders and temporary files of runs that were killed are removed by the next run on that output.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from .errors import InputError, OutputExistsError
from .processes import pid_alive

LOCK_SUFFIX = ".medsynth-lock"
STAGE_MARK = ".medsynth-stage-"


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


@contextlib.contextmanager
def output_lock(target: str | os.PathLike[str], *, shared: bool = False, wait: bool = True) -> Iterator[None]:
    """Hold the lock of ``target`` (exclusive to write, shared to read); blocks until it is free.

    A writer creates the lock file and removes it before releasing, so no lock file is left
    beside an output.  Whoever locks checks that the file it locked is still the one at the
    path (a writer may have removed it meanwhile) and otherwise tries again.  A reader never
    creates the lock file: without one no write is in progress.  The kernel releases the lock of
    a process that died, so a lock file it left never blocks.

    Raises:
        BlockingIOError: ``wait`` is false and another process holds the lock.
    """
    target = Path(target)
    path = lock_path(target)
    if not shared:
        target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(path, os.O_RDONLY if shared else os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:
            if shared:
                yield
                return
            raise
        except OSError:
            if shared:  # unreadable lock file (another user's): read without it, the hash check still holds
                yield
                return
            raise
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # locked a file a finished writer had already removed: try again
    try:
        yield
    finally:
        if not shared:
            with contextlib.suppress(OSError):
                os.unlink(path)
        os.close(fd)  # closing releases the lock


def clean_stale_staging(target: Path) -> list[Path]:
    """Remove staging folders and temporary files of ``target`` whose process is gone.

    Both are named ``.NAME.medsynth-stage-PID-...`` beside ``target``; one of a running process (this one's
    other threads included) is left alone, so no lock is needed.  A reused pid only keeps a stale one longer.
    """
    removed: list[Path] = []
    prefix = f".{target.name}{STAGE_MARK}"
    pattern = re.compile(re.escape(prefix) + r"(\d+)-")
    try:  # every single-file write runs this: names only, no Path object for the folder's other files
        names = [name for name in os.listdir(target.parent) if name.startswith(prefix)]
    except OSError:  # no folder yet (nothing to clean), or not one
        return removed
    for name in names:
        match = pattern.match(name)
        if not match or int(match.group(1)) == os.getpid() or pid_alive(int(match.group(1))):
            continue
        entry = target.parent / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        removed.append(entry)
    return removed


@contextlib.contextmanager
def staging_folder(target: str | os.PathLike[str]) -> Iterator[Path]:
    """A fresh hidden folder beside ``target`` (same file system, so renames are atomic); removed on exit."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}{STAGE_MARK}{os.getpid()}-", dir=target.parent))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(stage, 0o777 & ~mask)
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM held until the block ends, then delivered.

    For the renames that replace an old output with a new one: interrupted between two of them, a folder
    would hold some new files beside old ones (or a model folder would be gone). The signal is recorded by a
    Python handler, not blocked in the kernel: another thread of the process may be the one that receives it.
    Outside the main thread (where handlers cannot be set) the block runs as it is.
    """
    import signal
    import threading

    watched = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not None]
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in watched}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if received:
            signal.raise_signal(received[0])  # its own handler now: KeyboardInterrupt, Terminated, or the default


def commit_files(moves: Mapping[Path, Path], *, overwrite: bool, lock_target: Path | None = None) -> None:
    """Move staged files onto their targets as one unit under the first target's lock.

    Args:
        moves: staged file -> target, in the order to move them (a sidecar last).
        overwrite: replace existing targets; otherwise any existing target refuses the whole unit.
        lock_target: the output whose lock to hold (default: the first target).

    Raises:
        OutputExistsError: a target exists (checked again under the lock) and ``overwrite`` is false.
    """
    targets = list(moves.values())
    with output_lock(lock_target or targets[0]), signals_deferred():
        clean_stale_staging(lock_target or targets[0])
        for target in targets:
            if (target.exists() or target.is_symlink()) and not overwrite:
                raise OutputExistsError(target)
        replace_as_one(moves)


def replace_as_one(moves: Mapping[Path, Path]) -> None:
    """Move staged files onto their targets in order, as one unit (the caller holds signals off).

    What a target held is kept beside its staged file until every move is done; a failure half way (a disk
    error, a folder among the targets) removes what was moved and puts the old files back, so a header never
    lies beside another image's data file.  A ``.mhd`` / ``.nhdr`` header replaced takes its old data file with it
    when the new files do not replace that one (``a.raw`` under a new ``a.mhd`` + ``a.zraw``): otherwise it would
    stay, data no header names.
    """
    from .image_files import own_data_file

    targets = set(moves.values())
    done: list[tuple[Path, Path | None]] = []  # (target or removed data file, the file it held, kept aside)
    try:
        for staged, target in moves.items():
            if target.is_dir() and not target.is_symlink():
                raise InputError(target, "exists and is a folder; not replaced")
            backup = stale = None
            if target.exists() or target.is_symlink():
                stale = own_data_file(target)  # read before the old header moves
                backup = staged.with_name(f"{staged.name}.old")
                os.replace(target, backup)
            done.append((target, backup))
            if stale is not None and stale not in targets and (stale.is_file() or stale.is_symlink()):
                aside = staged.with_name(f"{staged.name}.old-data")
                os.replace(stale, aside)
                done.append((stale, aside))
            os.replace(staged, target)
    except BaseException:
        for target, backup in reversed(done):
            if backup is None:
                target.unlink(missing_ok=True)
            else:
                os.replace(backup, target)
        raise
    for _, backup in done:
        if backup is not None:
            backup.unlink(missing_ok=True)


def commit_folder(stage: Path, target: Path, owned: Iterable[str], *, overwrite: bool) -> None:
    """Move a staged folder into place, or its files into an existing folder (only ``owned`` names).

    A new folder is one rename.  With ``overwrite`` an existing folder keeps every file
    MedSynth does not own (a user's notes); owned files the new output lacks are removed, the
    staged files are moved in, the file named last in ``owned`` (the provenance) last.
    """
    owned = list(owned)
    with output_lock(target), signals_deferred():
        clean_stale_staging(target)
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            raise InputError(target, "exists and is not a folder; not replaced")
        if not target.exists():
            os.rename(stage, target)
            return
        if not overwrite:
            raise OutputExistsError(target)
        staged = {p.name for p in stage.iterdir()}
        for name in owned:
            old = target / name
            if name not in staged and (old.is_file() or old.is_symlink()):
                old.unlink()
        order = [n for n in owned if n in staged] + sorted(staged - set(owned))
        last = [n for n in owned[-1:] if n in staged]
        for name in [n for n in order if n not in last] + last:
            destination = target / name
            if destination.is_dir() and not destination.is_symlink():
                raise InputError(destination, "is a folder where MedSynth writes a file; not replaced")
            os.replace(stage / name, destination)


__all__ = ["output_lock", "staging_folder", "commit_files", "replace_as_one", "commit_folder", "clean_stale_staging",
           "lock_path", "signals_deferred"]
