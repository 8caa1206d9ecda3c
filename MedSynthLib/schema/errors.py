"""User-facing errors: one clear line that names the file and the problem."""

from __future__ import annotations

import os


class MedSynthError(Exception):
    """An error caused by the user's input or environment, not by a bug.

    The CLI prints ``str(error)`` as one line and exits with status 2; the Slicer
    module shows it in a message box.
    """


class InputError(MedSynthError):
    """A bad input file or folder."""

    def __init__(self, path: str | os.PathLike[str] | None, problem: str) -> None:
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class OutputExistsError(MedSynthError):
    """An output exists and ``--overwrite`` was not given."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        super().__init__(f"{self.path}: output already exists (use --overwrite to replace it)")


class EditError(MedSynthError):
    """A tumour edit cannot be carried out (it would leave the brain, no tumour to edit, ...)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM in the ``medsynth`` program, raised where the program is, so it leaves as a cancelled command
    does: every cleanup runs and no partial output stays (a plain SIGTERM ends the process at once)."""
