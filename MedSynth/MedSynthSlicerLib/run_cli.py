"""Run the ``medsynth`` command line in a child process, with its progress bar on.

``python run_cli.py synthesize LABELS -o OUT ...`` is exactly ``medsynth
synthesize LABELS -o OUT ...`` (it calls :func:`MedSynthLib.cli.console_main`,
the entry point of the ``medsynth`` script), except that stderr reports itself as
a terminal: the CLI draws its tqdm step counter only on terminals, and the
Slicer module's process runner parses that counter for the progress bar.

This file is run by path (it imports nothing from the Slicer module), so it
works with any Python that can import MedSynthLib - the module passes the
MedSynthLib location on ``PYTHONPATH``.
"""

from __future__ import annotations

import sys
from typing import Any


class _TerminalStream:
    """A stream proxy that says it is a terminal (so tqdm draws its bar)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def isatty(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def main() -> None:
    sys.stderr = _TerminalStream(sys.stderr)
    from MedSynthLib.cli import console_main

    console_main()  # the medsynth program itself (with its fast exit after synthesize)


if __name__ == "__main__":
    main()
