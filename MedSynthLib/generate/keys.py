"""The secret key a generated dataset's source ids are made with, kept outside the dataset.

A source id made from the source files alone (a hash of their bytes) names the patient's file to anyone
who holds it: public BraTS, the hospital's archive.  Each run that reads patient sources therefore draws
a key, and a source's id is the HMAC-SHA256 of its content hash under that key: the same source gets the
same id throughout the dataset, and only the computer holding the key can tell which file it was, which
is what a resume needs to check that its sources are the ones the run began with.

The key lives in the user's MedSynth folder (:func:`user_dir`), one file per dataset named by a random
key id that the dataset's ``generate.json`` records.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from ..schema.errors import InputError
from ..schema.user_folder import HOME_ENV, user_dir

KEY_FOLDER = "generate-keys"
ID_PREFIX = "hmac-sha256:"
_KEY_ID = re.compile(r"[0-9a-f]{32}")


def key_path(key_id: str) -> Path:
    return user_dir() / KEY_FOLDER / f"{key_id}.key"


@dataclass(frozen=True)
class SourceKey:
    """A dataset's key: ``key_id`` is recorded in the dataset, ``secret`` never."""

    key_id: str
    secret: bytes

    def source_id(self, content_id: str) -> str:
        """The id a dataset records for the source whose content hash is ``content_id``."""
        return ID_PREFIX + hmac.new(self.secret, content_id.encode(), hashlib.sha256).hexdigest()[:16]

    @classmethod
    def new(cls) -> "SourceKey":
        """A fresh key, saved in the user's MedSynth folder (readable by this user only)."""
        key = cls(secrets.token_hex(16), secrets.token_bytes(32))
        path = key_path(key.key_id)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(key.secret.hex() + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)  # never a half-written key under its name
        except OSError as exc:
            raise InputError(path.parent, f"cannot save the key of the dataset's source ids ({exc.strerror}); "
                                          f"set {HOME_ENV} to a folder you can write") from None
        return key

    @classmethod
    def recorded(cls, key_id: object, run_file: Path) -> "SourceKey":
        """The key ``run_file`` (a dataset's ``generate.json``) names; refused in one line when it is not here."""
        if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
            raise InputError(run_file, "unreadable source_key (use --overwrite to start again)")
        path = key_path(key_id)
        try:
            secret = bytes.fromhex(path.read_text().strip())
        except FileNotFoundError:
            raise InputError(run_file, f"the key its source ids were made with is not on this computer ({path}): "
                                       "resume where the run began (or copy that file here), or start again "
                                       "with --overwrite") from None
        except (OSError, ValueError):
            raise InputError(path, "unreadable key of a dataset's source ids") from None
        if len(secret) != 32:
            raise InputError(path, "unreadable key of a dataset's source ids")
        return cls(key_id, secret)
