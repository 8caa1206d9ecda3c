"""Plain parameter objects of the workflow (no Qt, no MRML).

The module's ``parameterNodeWrapper`` class (``MedSynth.py``) stores what the
user chose in the scene; the widget turns it into these dataclasses for the
Logic, and the tests build them directly.  The choice lists here are the
single source of the combo boxes' entries.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Optional

#: Every device ``medsynth synthesize`` knows ("cuda" is shown as GPU).
DEVICES: tuple[str, ...] = ("auto", "cuda", "mps", "cpu")
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
EXPORT_FORMATS: tuple[str, ...] = ("nifti", "dicom")
EXPORT_NAMINGS: tuple[str, ...] = ("brats2021", "brats2023")
#: Tumour-label conventions of an input segmentation (MedSynthLib.schema.labels.CONVENTIONS).
LABEL_CONVENTIONS: tuple[str, ...] = ("brats2021", "brats2023", "msd", "brats2015")


def platform_devices(system: Optional[str] = None) -> tuple[str, ...]:
    """The device choices the module offers on a platform (``platform.system()`` by default).

    PyTorch has no CUDA build for macOS and Apple's MPS exists only there, so a
    Mac is offered auto/MPS/CPU and every other platform auto/CUDA/CPU.
    """
    system = platform.system() if system is None else system
    return ("auto", "mps", "cpu") if system == "Darwin" else ("auto", "cuda", "cpu")


RATINGS: tuple[int, int] = (0, 5)  # 0 = not rated, 1 (poor) .. 5 (indistinguishable from real)
NOTE_MAX_CHARS = 500


@dataclass
class GenerateOptions:
    """How ``medsynth synthesize`` is run.

    Attributes:
        model: registered model name or model folder; ``None``/empty: the registry default.
        device: ``auto`` (CUDA, then MPS, then CPU), ``cuda``, ``mps`` or ``cpu``.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16``.
        seed: seed recorded in the provenance.
    """

    model: Optional[str] = None
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0

    def validate(self) -> None:
        from .errors import WorkflowError

        if self.device not in DEVICES:
            raise WorkflowError(f"unknown device {self.device!r} (choose from {', '.join(DEVICES)})")
        if self.precision not in PRECISIONS:
            raise WorkflowError(f"unknown precision {self.precision!r} (choose from {', '.join(PRECISIONS)})")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise WorkflowError(f"the seed must be a non-negative whole number, got {self.seed!r}")

    def cli_arguments(self) -> list[str]:
        args = ["--device", self.device, "--precision", self.precision, "--seed", str(self.seed)]
        if self.model:
            args += ["--model", str(self.model)]
        return args


@dataclass
class TumourParameters:
    """A parametric tumour (see :class:`MedSynthLib.edits.ParametricTumour`)."""

    radius_mm: float = 15.0
    radii_mm: Optional[tuple[float, float, float]] = None  # overrides radius_mm when given
    rim_mm: float = 2.0
    oedema_mm: float = 10.0
    irregularity: float = 0.3
    necrosis: bool = True
    seed: int = 0
    keep_existing: bool = False

    def radii(self) -> tuple[float, float, float]:
        if self.radii_mm is not None:
            return tuple(float(r) for r in self.radii_mm)  # type: ignore[return-value]
        return (float(self.radius_mm),) * 3  # type: ignore[return-value]
