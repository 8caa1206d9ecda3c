"""Carry a long ``medsynth study`` across machines: save and restore its finished stages.

A study on a CPU takes longer than one working session, and a session's scratch disk may
not survive to the next one.  The stages that cost hours are small to keep: every arm and
baseline result is one JSON file, and each fold's GAN is one model folder whose sha256 the
synthetic cases (and so the arms that train on them) are keyed by.  ``save`` copies exactly
those from a study's work folder into a records folder (which can be committed or copied
anywhere) with a manifest of sha256 sums; ``restore`` puts them back into a fresh work
folder, checking every sum, so rerunning the same ``medsynth study`` command with the same
code recomputes only the cheap stages (case preparation, synthesis, fidelity) and the arms
not yet done.  Stage keys hash the code, so records only help a run of the same commit.

Usage::

    python -m MedSynthLib.study.records save WORK RECORDS
    python -m MedSynthLib.study.records restore RECORDS WORK
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from ..schema.errors import InputError, MedSynthError
from ..schema.provenance import file_sha256 as _sha256
from ..schema.volume_io import write_json
from .cache import WorkLock

MANIFEST = "records.json"
RECORDS_VERSION = 1


def _finished_json(path: Path) -> bool:
    """A stage result is finished when it parses (results are written atomically)."""
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def stage_files(work: Path) -> list[Path]:
    """The finished stage files of a work folder worth keeping, relative to ``work``, sorted.

    Arm and baseline results (``arms/*.json``, ``baseline/*.json``) and the folds' trained GAN
    models (every file of ``gan/<key>/model/``, once its ``config.json`` exists: the model folder
    is written last by training).
    """
    work = Path(work)
    found: list[Path] = []
    for folder in ("arms", "baseline"):
        found += [p for p in (work / folder).glob("*.json") if p.is_file() and _finished_json(p)]
    for model in (work / "gan").glob("*/model"):
        if (model / "config.json").is_file():
            found += [p for p in model.rglob("*") if p.is_file()]
    return sorted(p.relative_to(work) for p in found)


def save(work: Path, records: Path) -> dict[str, str]:
    """Copy the finished stages of ``work`` into ``records`` (adds; never deletes); returns the manifest.

    Raises:
        InputError: ``work`` is not a folder, or a file already in ``records`` differs from the work
            folder's (two different runs must not be mixed in one records folder).
    """
    work, records = Path(work), Path(records)
    if not work.is_dir():
        raise InputError(work, "not a study work folder")
    manifest = read_manifest(records) if (records / MANIFEST).exists() else {}
    new: dict[str, str] = {}
    with WorkLock(work):  # a study in this folder removes no superseded result while it is copied
        for rel in stage_files(work):  # check everything before writing anything
            digest = _sha256(work / rel)
            if manifest.get(rel.as_posix(), digest) != digest:
                raise InputError(records / rel, f"differs from {work / rel}; the records belong to another run")
            if rel.as_posix() not in manifest:
                new[rel.as_posix()] = digest
        for key, digest in new.items():
            rel = Path(key)
            target = records / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)[1])
            shutil.copyfile(work / rel, tmp)
            os.replace(tmp, target)
            manifest[key] = digest
    records.mkdir(parents=True, exist_ok=True)
    write_json({"version": RECORDS_VERSION, "files": dict(sorted(manifest.items()))}, records / MANIFEST,
               overwrite=True)
    return manifest


def read_manifest(records: Path) -> dict[str, str]:
    """The ``{relative path: sha256}`` of a records folder, every file checked against its sum.

    Raises:
        InputError: no readable manifest, an unknown version, a missing file or a wrong sum.
    """
    records = Path(records)
    path = records / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(path, f"not a readable study records manifest ({exc.__class__.__name__})") from None
    if not isinstance(data, dict) or data.get("version") != RECORDS_VERSION or not isinstance(data.get("files"), dict):
        raise InputError(path, f"not a study records manifest of version {RECORDS_VERSION}")
    files: dict[str, str] = data["files"]
    for rel, digest in files.items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise InputError(path, f"the entry {rel!r} leaves the records folder")
        if not (records / rel).is_file():
            raise InputError(records / rel, f"listed in {MANIFEST} but missing")
        if _sha256(records / rel) != digest:
            raise InputError(records / rel, f"its sha256 does not match {MANIFEST}")
    return files


def restore(records: Path, work: Path) -> list[str]:
    """Copy the checked records into ``work`` where absent; returns the paths copied.

    Raises:
        InputError: the records fail their check, or a file already in ``work`` differs from its record.
    """
    records, work = Path(records), Path(work)
    files = read_manifest(records)
    missing: list[str] = []
    for rel, digest in sorted(files.items()):  # check everything before writing anything
        target = work / rel
        if not target.exists():
            missing.append(rel)
        elif _sha256(target) != digest:
            raise InputError(target, f"differs from its record in {records}; not overwritten")
    copied: list[str] = []
    for rel in missing:
        target = work / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)[1])
        shutil.copyfile(records / rel, tmp)
        os.replace(tmp, target)
        copied.append(rel)
    return copied


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m MedSynthLib.study.records",
                                     description="Save or restore the finished stages of a medsynth study.")
    sub = parser.add_subparsers(dest="action", required=True)
    p_save = sub.add_parser("save", help="copy finished stages from a work folder into a records folder")
    p_save.add_argument("work", type=Path)
    p_save.add_argument("records", type=Path)
    p_restore = sub.add_parser("restore", help="copy checked records into a (fresh) work folder")
    p_restore.add_argument("records", type=Path)
    p_restore.add_argument("work", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.action == "save":
            manifest = save(args.work, args.records)
            print(f"{args.records}: {len(manifest)} file(s) recorded")
        else:
            copied = restore(args.records, args.work)
            print(f"{args.work}: {len(copied)} file(s) restored")
    except MedSynthError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
