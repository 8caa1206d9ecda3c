"""Plain parameter objects of the workflow (no Qt, no MRML).

The module's ``parameterNodeWrapper`` class (``MedSynth.py``) stores what the
user chose in the scene; the widget turns it into these dataclasses for the
Logic, and the tests build them directly.  The choice lists here are the
single source of the combo boxes' entries.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence



def _from_medsynthlib(read: Callable[[], Sequence[str]], fallback: tuple[str, ...]) -> tuple[str, ...]:
    """A choice list read from MedSynthLib; ``fallback`` only while MedSynthLib cannot be imported yet.

    The module is loaded by Slicer before the extension's Python dependencies are
    installed, so the panel needs its choices without them; a test checks that the
    fallbacks equal MedSynthLib's lists.
    """
    try:
        return tuple(str(v) for v in read())
    except ImportError:
        return fallback


def _conventions() -> Sequence[str]:
    from MedSynthLib.schema.labels import CONVENTIONS

    return list(CONVENTIONS)


def _export_formats() -> Sequence[str]:
    from MedSynthLib.export import FORMATS

    return FORMATS


def _export_namings() -> Sequence[str]:
    from MedSynthLib.export import NAMINGS

    return list(NAMINGS)


def _spread_range() -> tuple[float, float]:
    try:
        from MedSynthLib.synthesis.appearance import SPREAD_RANGE
    except ImportError:
        return FALLBACK_APPEARANCE_SPREAD_RANGE
    return SPREAD_RANGE


#: Every device ``medsynth synthesize`` knows ("cuda" is shown as GPU).
DEVICES: tuple[str, ...] = ("auto", "cuda", "mps", "cpu")
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
#: The four synthesised contrasts and their titles in the panel and the views.
MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
MODALITY_TITLES = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "FLAIR"}
FALLBACK_EXPORT_FORMATS = ("nifti", "dicom")
FALLBACK_EXPORT_NAMINGS = ("brats2021", "brats2023")
FALLBACK_LABEL_CONVENTIONS = ("brats2021", "brats2023", "msd", "brats2015")
FALLBACK_APPEARANCE_SPREAD_RANGE = (0.0, 2.0)
#: The appearance spreads any model may accept (MedSynthLib.synthesis.appearance.SPREAD_RANGE); each model accepts up
#: to its own limit within them, checked where the worker loads it.
APPEARANCE_SPREAD_RANGE: tuple[float, float] = _spread_range()
EXPORT_FORMATS: tuple[str, ...] = _from_medsynthlib(_export_formats, FALLBACK_EXPORT_FORMATS)
EXPORT_NAMINGS: tuple[str, ...] = _from_medsynthlib(_export_namings, FALLBACK_EXPORT_NAMINGS)
#: Tumour-label conventions of an input segmentation (MedSynthLib.schema.labels.CONVENTIONS).
LABEL_CONVENTIONS: tuple[str, ...] = _from_medsynthlib(_conventions, FALLBACK_LABEL_CONVENTIONS)
#: How a tumour segmentation file given to Insert is read: "detect" reads its convention from its values and
#: shape (the file's own, which need not be the loaded case's); the others name it.
DETECT_CONVENTION = "detect"
INSERT_LABEL_CONVENTIONS: tuple[str, ...] = (DETECT_CONVENTION,) + LABEL_CONVENTIONS


def platform_devices(system: Optional[str] = None) -> tuple[str, ...]:
    """The device choices the module offers on a platform (``platform.system()`` by default).

    PyTorch has no CUDA build for macOS and Apple's MPS exists only there, so a
    Mac is offered auto/MPS/CPU and every other platform auto/CUDA/CPU.
    """
    system = platform.system() if system is None else system
    return ("auto", "mps", "cpu") if system == "Darwin" else ("auto", "cuda", "cpu")


def device_parameter(device: str) -> str:
    """How the parameter node stores a device choice: its member name in MedSynth.py's ``Device`` enum."""
    return device.upper()


def repaired_device(stored: str, system: Optional[str] = None) -> Optional[str]:
    """The device parameter to store instead of ``stored``, or ``None`` when this platform offers it.

    A scene saved on another platform may hold a device this one lacks (CUDA in a scene opened on a
    Mac, MPS elsewhere): the panel could not read it, so it falls back to auto.  Empty (never set) is kept.
    """
    if not stored or stored in {device_parameter(d) for d in platform_devices(system)}:
        return None
    return device_parameter("auto")


RATINGS: tuple[int, int] = (0, 5)  # 0 = not rated, 1 (poor) .. 5 (indistinguishable from real)
NOTE_MAX_CHARS = 500


@dataclass
class GenerateOptions:
    """How the worker synthesises (generate and preview).

    Attributes:
        model: registered model name or model folder; ``None``/empty: the registry default.
        device: ``auto`` (CUDA, then MPS, then CPU), ``cuda``, ``mps`` or ``cpu``.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16``.
        seed: draws the appearance of a model with an appearance code; recorded in the provenance.
        appearance_spread: how far the seed's appearance reaches from the model's mean appearance (1: the training
            cases' spread; 0: the mean appearance for every seed); past 1 only as far as the model accepts (its
            record's limit, checked where the worker loads it).
        inpaint: when the input is a real case, Generate keeps the patient's images and re-renders only the
            edited tumour region (an inpainting model); False: a whole synthetic case (images all synthetic, anatomy
            still the patient's: anonymous only from the template brain with a parametric tumour).
        inpainting_model: inpainting model name or folder; ``None``/empty: the registry's default.
        mirror_average: average the network's pass with its pass on the left-right mirrored label map (the command
            line's default; off is ``--no-mirror-average``: one pass, about half the network time); recorded in the
            provenance.
    """

    model: Optional[str] = None
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    appearance_spread: float = 1.0
    inpaint: bool = True
    inpainting_model: Optional[str] = None
    mirror_average: bool = True

    def validate(self) -> None:
        from .errors import WorkflowError

        if self.device not in DEVICES:
            raise WorkflowError(f"unknown device {self.device!r} (choose from {', '.join(DEVICES)})")
        if self.precision not in PRECISIONS:
            raise WorkflowError(f"unknown precision {self.precision!r} (choose from {', '.join(PRECISIONS)})")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise WorkflowError(f"the seed must be a non-negative whole number, got {self.seed!r}")
        low, high = APPEARANCE_SPREAD_RANGE
        if isinstance(self.appearance_spread, bool) or not isinstance(self.appearance_spread, (int, float)) \
                or not low <= self.appearance_spread <= high:  # NaN fails the comparison
            raise WorkflowError(f"the appearance spread must be a number from {low:g} to {high:g}, "
                                f"got {self.appearance_spread!r}")
        if not isinstance(self.mirror_average, bool):
            raise WorkflowError(f"mirror averaging is on or off (True/False), got {self.mirror_average!r}")

    def worker_params(self) -> dict[str, Any]:
        """The parameters of a ``generate`` / ``preview`` request (see :mod:`.protocol`)."""
        return {"model": str(self.model) if self.model else None, "device": self.device,
                "precision": self.precision, "seed": self.seed, "appearance_spread": float(self.appearance_spread),
                "inpainting_model": str(self.inpainting_model) if self.inpainting_model else None,
                "mirror_average": bool(self.mirror_average)}


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
