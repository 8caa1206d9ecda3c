"""The interfaces the widget relies on (typing Protocols, as in SlicerNNUnet).

Any object with these members works with the MedSynth widget: the real
:class:`~MedSynthSlicerLib.process.ProcessRunner` and
:class:`~MedSynthSlicerLib.logic.WorkflowLogic`, or test doubles.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

from .signals import Signal


@runtime_checkable
class ProcessRunnerProtocol(Protocol):
    """A background process reporting through signals; :meth:`poll` is called from a GUI timer."""

    output: Signal
    progress: Signal
    finished: Signal

    def start(self, command: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | None = None) -> None: ...

    def poll(self) -> bool: ...

    def cancel(self, grace_s: float = 2.0, timeout_s: float = 10.0) -> bool: ...

    def is_running(self) -> bool: ...


@runtime_checkable
class JobProtocol(Protocol):
    """A running synthesis or export: poll until False, then finish (or cancel)."""

    runner: ProcessRunnerProtocol
    status: str

    def poll(self) -> bool: ...


@runtime_checkable
class WorkflowLogicProtocol(Protocol):
    """What the widget calls; every method raises WorkflowError with a message for the user."""

    log: Signal
    progress: Signal

    def load_case(self, folder: str, convention: str | None = None,
                  label_convention: str | None = None) -> dict[str, Any]: ...

    def load_template(self) -> Any: ...

    def prepare(self, t1: Any, tumour: Any = None, label_convention: str = "brats2021",
                others: Mapping[str, Any] | None = None, name: str | None = None,
                lock_anatomy: bool = True) -> Any: ...

    def add_parametric_tumour(self, segmentation: Any, center_ras: Sequence[float], params: Any = None) -> Any: ...

    def insert_tumour(self, segmentation: Any, source: Any, center_ras: Sequence[float] | None = None,
                      keep_existing: bool = False) -> Any: ...

    def random_tumour(self, segmentation: Any, seed: int, p_parametric: float = 0.25) -> Any: ...

    def begin_tumour_transform(self, segmentation: Any) -> Any: ...

    def apply_tumour_transform(self, segmentation: Any) -> Any: ...

    def cancel_tumour_transform(self, segmentation: Any) -> None: ...

    def undo(self, segmentation: Any) -> Any: ...

    def start_generate(self, segmentation: Any, options: Any = None) -> JobProtocol: ...

    def finish_generate(self, job: Any, name_prefix: str = ...) -> dict[str, Any]: ...

    def cancel_generate(self, job: Any) -> bool: ...

    def preview(self, segmentation: Any, options: Any = None, timeout_s: float = ...) -> dict[str, Any]: ...

    def set_review(self, outputs: Mapping[str, Any], rating: int, note: str = "") -> dict[str, Any]: ...

    def start_export(self, outputs: Mapping[str, Any], fmt: str, folder: str, naming: str = "brats2021") -> Any: ...

    def finish_export(self, job: Any) -> list[Path]: ...
