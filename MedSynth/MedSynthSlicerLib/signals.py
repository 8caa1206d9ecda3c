"""A pure-Python signal: the Logic reports to the widget without Qt.

The widget connects Qt slots (or any callables) to these signals; the tests
connect plain lists.  Emission is synchronous, in the emitting thread: the
worker client emits only from :meth:`~MedSynthSlicerLib.jobs.WorkerClient.poll`,
which the widget calls from a ``QTimer`` in the GUI thread.
"""

from __future__ import annotations

from typing import Any, Callable


class Signal:
    """Connect callables with :meth:`connect`; call :meth:`emit` (or the signal itself) to notify them."""

    def __init__(self, *types: str) -> None:
        self.types = types
        self._slots: list[Callable[..., Any]] = []

    def connect(self, slot: Callable[..., Any]) -> None:
        if slot not in self._slots:
            self._slots.append(slot)

    def disconnect(self, slot: Callable[..., Any] | None = None) -> None:
        """Disconnect one slot, or every slot when ``slot`` is ``None``."""
        if slot is None:
            self._slots.clear()
        elif slot in self._slots:
            self._slots.remove(slot)

    def emit(self, *args: Any) -> None:
        for slot in list(self._slots):
            slot(*args)

    __call__ = emit

    def __len__(self) -> int:
        return len(self._slots)
