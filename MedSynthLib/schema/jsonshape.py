"""JSON files MedSynth reads: read them safely and check their shape before using a value.

Every JSON MedSynth reads (label-map sidecars, model configs, the model registry,
training and study configs, checkpoints) comes from a file a user can edit, so a
list where an object belongs, a string where a number belongs, or a NaN must end
in one line naming the file, not a traceback deep inside the code that used it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from .errors import InputError

_JSON_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
                    bool: "true/false", type(None): "null"}


def json_type_name(value: Any) -> str:
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def not_an_integer(value: Any) -> str | None:
    """What is wrong with a recorded whole number such as a schema version, or None.

    ``true``, ``1.0`` and ``"1"`` would pass a compare with 1, so they are named rather than accepted.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return None
    shown = repr(value) if isinstance(value, str) else json.dumps(value)[:40]
    return f"is not an integer (got {shown})"


def read_json(path: str | os.PathLike[str], what: str = "JSON file", expect: type | None = dict) -> Any:
    """Read a JSON file; with ``expect``, its top level must be of that type.

    Raises:
        InputError: missing, unreadable (permission, a folder), not UTF-8, not JSON, or of the wrong shape.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise InputError(path, f"{what} not found") from None
    except PermissionError:
        raise InputError(path, f"permission denied (cannot read the {what})") from None
    except IsADirectoryError:
        raise InputError(path, f"{what} is a folder, not a file") from None
    except OSError as exc:
        raise InputError(path, f"cannot read the {what} ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise InputError(path, f"{what} is not UTF-8 text") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InputError(path, f"{what} is not valid JSON ({exc})") from None
    if expect is not None and not isinstance(data, expect):
        raise InputError(path, f"{what} must be {_JSON_TYPE_NAMES.get(expect, expect.__name__)}, "
                               f"not {json_type_name(data)}")
    return data


def expect_object(value: Any, source: Any, what: str) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an :class:`InputError` naming ``source``."""
    if not isinstance(value, dict):
        raise InputError(source, f"{what} must be a JSON object, not {json_type_name(value)}")
    return value


# --- dataclass fields from JSON ----------------------------------------------------------------------


def matches_annotation(value: Any, annotation: str) -> bool:
    """Whether a JSON value fits a (string) type annotation such as ``int | None`` or ``tuple[int, ...]``."""
    for option in (part.strip() for part in _split_union(annotation)):
        if option in ("Any", "object"):
            return True
        if option == "None":
            if value is None:
                return True
        elif option == "bool":
            if isinstance(value, bool):
                return True
        elif option == "int":
            if isinstance(value, int) and not isinstance(value, bool):
                return True
        elif option == "float":
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                return True
        elif option == "str":
            if isinstance(value, str):
                return True
        else:
            match = re.fullmatch(r"(tuple|list|dict|Sequence)\[(.*)\]", option)
            base = match.group(1) if match else option
            if base == "dict" or base.startswith("dict"):
                if isinstance(value, dict):
                    return True
            elif base in ("tuple", "list", "Sequence"):
                if isinstance(value, (list, tuple)):
                    inner = [p.strip() for p in _split_top(match.group(2))] if match else ["Any"]
                    if inner and inner[-1] == "...":
                        if all(matches_annotation(v, inner[0]) for v in value):
                            return True
                    elif base == "tuple" and len(inner) > 1:
                        if len(value) == len(inner) and all(matches_annotation(v, t) for v, t in zip(value, inner)):
                            return True
                    elif all(matches_annotation(v, inner[0]) for v in value):
                        return True
            else:
                return True  # a type this checker does not know: left to the dataclass's own checks
    return False


def _split_top(text: str, separator: str = ",") -> list[str]:
    """Split at ``separator`` outside brackets."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char == "["
        depth -= char == "]"
        if char == separator and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def _split_union(annotation: str) -> list[str]:
    text = annotation.strip()
    if text.startswith("Optional[") and text.endswith("]"):
        return [text[9:-1], "None"]
    return _split_top(text, "|")


def check_fields(cls: type, data: Any, source: Any, what: str) -> dict[str, Any]:
    """Check a JSON object against a dataclass: an object, known keys only, each value of its field's type.

    Returns the object (unchanged).  Raises :class:`InputError` naming ``source`` and the key.
    """
    expect_object(data, source, what)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise InputError(source, f"unknown {what} options {sorted(unknown)}")
    for key, value in data.items():
        annotation = fields[key].type if isinstance(fields[key].type, str) else getattr(
            fields[key].type, "__name__", "Any")
        if not matches_annotation(value, annotation):
            raise InputError(source, f"{what} option {key!r}: expected {annotation}, got {json.dumps(value)[:60]}")
    return data


def check_range(source: Any, name: str, value: float, low: float | None = None, high: float | None = None,
                *, low_open: bool = False) -> None:
    """Refuse a value outside ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high or (isinstance(value, float) and not math.isfinite(value)):
        bounds = f"{'(' if low_open else '['}{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise InputError(source, f"{name} = {value} is outside {bounds}")
