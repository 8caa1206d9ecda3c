"""The user's MedSynth folder: what MedSynth keeps per user outside any dataset or installation.

Generate's source-id keys and anatomy cache, and the user's model registry, live there.  It is here, at the bottom
of the package, because both ``generate`` and ``synthesis`` need it and neither may import the other.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

#: Overrides :func:`user_dir` (a folder shared by the nodes of a multi-node run, a test's folder).
HOME_ENV = "MEDSYNTH_HOME"


def user_dir() -> Path:
    """The user's MedSynth folder: ``MEDSYNTH_HOME``, else the platform's per-user data folder."""
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local") / "MedSynth"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "MedSynth"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "medsynth"
