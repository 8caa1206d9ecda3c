"""The one contract between the Slicer module and its backend worker: typed JSON lines + arrays in files.

The worker (``worker.py``) reads one :class:`Request` per line on stdin and
writes :class:`Event` s, one per line, on stdout; nothing else is written there
(the worker points its own stdout at stderr, which is its free-text log).

Requests (``op``): ``generate`` (synthesise and write a case folder),
``preview`` (a session: the whole label map once, then only the region an edit
touched; the answer carries only the region rendered again), ``export``
(``MedSynthLib.export``), ``cancel`` (stop request ``target`` at its next
step), ``quit``.

Events (``type``): ``ready`` (once, after start), ``progress``, ``result``,
``error`` (one line, the backend's own message), ``cancelled``.

Arrays never travel in the JSON: the sender writes each as an uncompressed
``.npy`` file into the worker's exchange folder (in RAM, ``/dev/shm``, where the
system has one) and sends an :class:`ArrayRef`; the receiver loads it and
deletes the file.  Only numpy and the standard library are used here: both
sides (Slicer's Python and the backend's) import this module.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PROTOCOL_VERSION = 1
OPS = ("generate", "preview", "export", "cancel", "quit")
EVENT_TYPES = ("ready", "progress", "result", "error", "cancelled")


class ProtocolError(ValueError):
    """A line that is not a valid message of this protocol."""


@dataclass(frozen=True)
class ArrayRef:
    """An array passed beside the JSON: an ``.npy`` file, its dtype and shape."""

    path: str
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def from_json(cls, data: Any) -> "ArrayRef":
        if not isinstance(data, dict) or not {"path", "dtype", "shape"} <= set(data):
            raise ProtocolError(f"not an array reference: {data!r}")
        return cls(str(data["path"]), str(data["dtype"]), tuple(int(s) for s in data["shape"]))


@dataclass
class Request:
    """One request to the worker.

    Attributes:
        id: the client's number for it (events name it back).
        op: one of :data:`OPS`.
        params: JSON parameters of the operation.
        arrays: named arrays (see :class:`ArrayRef`).
    """

    id: int
    op: str
    params: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, ArrayRef] = field(default_factory=dict)


@dataclass
class Event:
    """One message from the worker.

    Attributes:
        type: one of :data:`EVENT_TYPES`.
        id: the request it answers (0 for ``ready``).
        fraction: progress in [0, 1] (``progress``).
        text: the step (``progress``) or the one-line message (``error``, ``cancelled``).
        data: JSON result (``result``, ``ready``).
        arrays: named arrays of a ``result``.
    """

    type: str
    id: int = 0
    fraction: float = 0.0
    text: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, ArrayRef] = field(default_factory=dict)


def encode(message: Request | Event) -> str:
    """One JSON line (no newline inside) for a request or an event."""
    payload = asdict(message)
    payload["kind"] = "request" if isinstance(message, Request) else "event"
    payload["protocol"] = PROTOCOL_VERSION
    return json.dumps(payload, separators=(",", ":"))


def decode(line: str) -> Request | Event:
    """The message of one line.

    Raises:
        ProtocolError: not JSON, another protocol version, or a field of the wrong type.
    """
    try:
        payload = json.loads(line)
    except ValueError:
        raise ProtocolError(f"not a JSON line: {line[:120]!r}") from None
    if not isinstance(payload, dict) or payload.get("protocol") != PROTOCOL_VERSION:
        raise ProtocolError(f"not a MedSynth worker message of protocol {PROTOCOL_VERSION}: {line[:120]!r}")
    try:
        arrays = {str(k): ArrayRef.from_json(v) for k, v in (payload.get("arrays") or {}).items()}
        if payload.get("kind") == "request":
            if payload.get("op") not in OPS:
                raise ProtocolError(f"unknown request {payload.get('op')!r}")
            params = payload.get("params") or {}
            if not isinstance(params, dict):
                raise ProtocolError("request params must be an object")
            return Request(int(payload["id"]), str(payload["op"]), params, arrays)
        if payload.get("kind") == "event":
            if payload.get("type") not in EVENT_TYPES:
                raise ProtocolError(f"unknown event {payload.get('type')!r}")
            data = payload.get("data") or {}
            if not isinstance(data, dict):
                raise ProtocolError("event data must be an object")
            return Event(str(payload["type"]), int(payload.get("id", 0)), float(payload.get("fraction", 0.0)),
                         str(payload.get("text", "")), data, arrays)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ProtocolError):
            raise
        raise ProtocolError(f"malformed message ({exc}): {line[:120]!r}") from None
    raise ProtocolError(f"neither a request nor an event: {line[:120]!r}")


def exchange_folder(prefix: str = "medsynth-worker-") -> Path:
    """A new private folder for array files: in RAM (``/dev/shm``) where there is one, else the temp folder."""
    ram = Path("/dev/shm")
    base = ram if ram.is_dir() and os.access(ram, os.W_OK | os.X_OK) else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def put_array(folder: Path, array: np.ndarray) -> ArrayRef:
    """Write ``array`` as an uncompressed ``.npy`` into ``folder`` (atomically: temp name, then rename)."""
    array = np.ascontiguousarray(array)
    name = uuid.uuid4().hex
    tmp = folder / f".{name}.npy"
    np.save(tmp, array, allow_pickle=False)
    final = folder / f"{name}.npy"
    os.replace(tmp, final)
    return ArrayRef(str(final), array.dtype.str, tuple(int(s) for s in array.shape))


def take_array(ref: ArrayRef) -> np.ndarray:
    """Load an array sent with :func:`put_array` and delete its file.

    Raises:
        ProtocolError: the file is missing or does not hold the announced dtype and shape.
    """
    path = Path(ref.path)
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ProtocolError(f"array {path.name} unreadable ({exc})") from None
    finally:
        path.unlink(missing_ok=True)
    if array.dtype.str != ref.dtype or tuple(array.shape) != tuple(ref.shape):
        raise ProtocolError(f"array {path.name}: {array.dtype.str} {array.shape}, announced {ref.dtype} {ref.shape}")
    return array
