"""Where MedSynthLib lives, which Python runs the backend, what torch detects, installing dependencies.

* MedSynthLib is installed with the module (the module's CMake copies the
  package into the scripted-modules folder, which Slicer puts on ``sys.path``);
  when the module is used from a source checkout (module path added in the
  Application Settings) the checkout root is added instead.
* Backend processes get MedSynthLib's folder on ``PYTHONPATH``.
* Python packages come from ``Resources/requirements.txt`` through Slicer's
  ``slicer.packaging.pip_ensure`` (which asks the user, and offers a restart
  when an already imported package changed); the packages Slicer ships
  (:data:`SLICER_OWNED_PACKAGES`) are never installed or replaced - MedSynth
  checks that Slicer's own copies are new enough instead.  torch comes from the
  PyTorch extension (``PyTorchUtils``) after asking the user.
* MedSynth needs 3D Slicer :data:`MINIMUM_SLICER` or newer (see
  :func:`check_slicer_version`): its Python (3.12) is the first that MONAI 1.6,
  nilearn 0.14 and pydicom 3 install on, it ships pydicom 3 and highdicom (used
  for the DICOM export, so MedSynth never replaces the pydicom of Slicer's DICOM
  module), and it has ``slicer.packaging.pip_ensure``.

Only :func:`ensure_python_requirements` and :func:`ensure_torch` need the
Slicer application; everything else is plain Python.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

MODULE_DIR = Path(__file__).resolve().parent.parent
#: Packages Slicer (or its PyTorch extension) ships and MedSynth must never install or replace.
SLICER_OWNED_PACKAGES: tuple[str, ...] = ("SimpleITK", "numpy", "vtk", "torch", "scipy", "pydicom", "highdicom",
                                          "pillow")
#: What MedSynth needs of the packages Slicer ships (checked, never installed). Slicer 5.12 ships numpy
#: 2.3.4, scipy 1.16.3, SimpleITK 2.5.3, pydicom 3.0.1 and highdicom 0.27.0; MedSynth's DICOM export
#: tests pass with that pydicom and highdicom.
SLICER_PROVIDED_REQUIREMENTS: tuple[str, ...] = ("numpy>=1.26", "scipy>=1.11", "SimpleITK>=2.3", "pydicom>=3.0",
                                                 "highdicom>=0.27")
#: The oldest 3D Slicer MedSynth runs in (major, minor).
MINIMUM_SLICER: tuple[int, int] = (5, 12)
#: The oldest Python of that Slicer's line that the pinned packages install on (MONAI 1.6.1, nilearn 0.14.1,
#: pydicom 3 and highdicom all declare Requires-Python >= 3.10).
MINIMUM_PYTHON: tuple[int, int] = (3, 10)
#: torch versions MedSynth works with: MONAI 1.6.1 declares torch >= 2.8 (PyTorchUtils installs the
#: build that fits the GPU driver).
TORCH_REQUIREMENT = ">=2.8"


def check_slicer_version(version: tuple[int, ...], python: tuple[int, ...] | None = None) -> None:
    """Refuse a Slicer older than :data:`MINIMUM_SLICER` with one clear sentence.

    Args:
        version: the running Slicer's (major, minor[, patch]).
        python: the running Python's (major, minor); ``sys.version_info`` by default.

    Raises:
        RuntimeError: Slicer (or its Python) is too old for MedSynth.
    """
    python = tuple(python or sys.version_info[:2])
    found = ".".join(str(v) for v in version[:3])
    needed = ".".join(str(v) for v in MINIMUM_SLICER)
    if tuple(version[:2]) < MINIMUM_SLICER or python[:2] < MINIMUM_PYTHON:
        python_text = ".".join(str(v) for v in python[:2])
        raise RuntimeError(f"MedSynth needs 3D Slicer {needed} or newer; this is Slicer {found} with Python "
                           f"{python_text}. Install a current Slicer release.")


def running_slicer_version() -> tuple[int, int, int]:
    """(major, minor, patch) of the running Slicer application."""
    import slicer

    app = slicer.app
    return (int(app.majorVersion), int(app.minorVersion), int(getattr(app, "patchVersion", 0) or 0))


def missing_slicer_provided() -> list[str]:
    """Requirements on Slicer's own packages (:data:`SLICER_PROVIDED_REQUIREMENTS`) the running Python misses."""
    return missing_requirements(list(SLICER_PROVIDED_REQUIREMENTS))


def ensure_medsynthlib_importable() -> Path:
    """Make ``import MedSynthLib`` work; return the folder that holds the package.

    Raises:
        ImportError: MedSynthLib is neither installed nor next to the module.
    """
    import importlib

    try:
        package = importlib.import_module("MedSynthLib")
    except ImportError:
        for candidate in (MODULE_DIR.parent, MODULE_DIR):
            if (candidate / "MedSynthLib" / "__init__.py").is_file():
                sys.path.insert(0, str(candidate))
                break
        else:
            raise ImportError("MedSynthLib is not installed with the module and not found next to it "
                              f"({MODULE_DIR.parent}); reinstall the MedSynth extension") from None
        package = importlib.import_module("MedSynthLib")
    return Path(package.__file__).resolve().parent.parent


def backend_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a backend process: MedSynthLib importable, unbuffered UTF-8 output."""
    root = str(ensure_medsynthlib_importable())
    env = dict(os.environ)
    parts = [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    if extra:
        env.update(extra)
    return env


def requirements_file() -> Path:
    """``Resources/requirements.txt``: ``Resources/MedSynth/`` of an installed extension, the checkout root otherwise."""
    for candidate in (MODULE_DIR / "Resources" / "MedSynth" / "requirements.txt",
                      MODULE_DIR.parent / "Resources" / "requirements.txt"):
        if candidate.is_file():
            return candidate
    return MODULE_DIR.parent / "Resources" / "requirements.txt"


def read_requirements(path: Path | None = None) -> list[str]:
    """Requirement lines (comments and blanks dropped)."""
    path = path or requirements_file()
    lines = []
    for raw in Path(path).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def missing_requirements(requirements: list[str]) -> list[str]:
    """Requirements not satisfied by the running Python (checked with importlib.metadata)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    missing = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            missing.append(text)
            continue
        if req.specifier and not req.specifier.contains(installed, prereleases=True):
            missing.append(text)
    return missing


# --- devices ------------------------------------------------------------------------------------

_DETECT = r"""
import json, sys
info = {"python": sys.version.split()[0]}
try:
    import torch
    info["torch"] = torch.__version__
    info["cuda"] = bool(torch.cuda.is_available())
    info["cuda_version"] = torch.version.cuda
    info["gpus"] = []
    if info["cuda"]:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append({"name": p.name, "memory_gb": round(p.total_memory / 2**30, 1)})
    mps = getattr(torch.backends, "mps", None)
    info["mps"] = bool(mps is not None and mps.is_available())
except Exception as exc:
    info["error"] = f"{type(exc).__name__}: {exc}"
print("MEDSYNTH_DEVICES " + json.dumps(info))
"""


@dataclass
class DeviceInfo:
    """What torch detects in the backend's Python."""

    torch: str | None = None
    cuda: bool = False
    cuda_version: str | None = None
    gpus: list[dict[str, Any]] = field(default_factory=list)
    mps: bool = False
    error: str | None = None

    @property
    def available(self) -> list[str]:
        """Device choices that can run: ``auto`` and ``cpu`` always (when torch works)."""
        if self.torch is None:
            return []
        return ["auto"] + (["cuda"] if self.cuda else []) + (["mps"] if self.mps else []) + ["cpu"]

    def describe(self) -> str:
        if self.torch is None:
            return f"PyTorch is not available in Slicer's Python ({self.error or 'not installed'})"
        if self.cuda and self.gpus:
            gpus = ", ".join(f"{g['name']} ({g['memory_gb']} GB)" for g in self.gpus)
            return f"GPU: {gpus} - CUDA {self.cuda_version}, torch {self.torch}"
        if self.mps:
            return f"GPU: Apple MPS - torch {self.torch}"
        return f"CPU only: torch {self.torch} detects no CUDA or MPS device"


def detect_devices(python: str, timeout_s: float = 180.0) -> DeviceInfo:
    """Ask torch in a separate process (torch is never imported into Slicer's GUI process)."""
    try:
        done = subprocess.run([python, "-c", _DETECT], capture_output=True, text=True, timeout=timeout_s,
                              env=backend_env())
    except (OSError, subprocess.TimeoutExpired) as exc:
        return DeviceInfo(error=f"{type(exc).__name__}: {exc}")
    for line in done.stdout.splitlines():
        if line.startswith("MEDSYNTH_DEVICES "):
            data = json.loads(line.split(" ", 1)[1])
            return DeviceInfo(torch=data.get("torch"), cuda=bool(data.get("cuda")),
                              cuda_version=data.get("cuda_version"), gpus=list(data.get("gpus") or []),
                              mps=bool(data.get("mps")), error=data.get("error"))
    return DeviceInfo(error=(done.stderr.strip().splitlines() or ["device detection failed"])[-1])


# --- installing inside Slicer ------------------------------------------------------------------


def installable_requirements(requirements: list[str]) -> list[str]:
    """The requirements MedSynth may install: every line that is not a package Slicer owns."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    owned = {canonicalize_name(name) for name in SLICER_OWNED_PACKAGES}
    return [r for r in requirements if canonicalize_name(Requirement(r).name) not in owned]


def ensure_python_requirements() -> list[str]:
    """Install missing packages of ``Resources/requirements.txt`` into Slicer's Python.

    Checks the Slicer version first (:func:`check_slicer_version`), then that
    Slicer's own packages are new enough (they are never replaced), then hands
    the missing requirements to ``slicer.packaging.pip_ensure`` with
    :data:`SLICER_OWNED_PACKAGES` as ``skip_packages``: Slicer asks the user
    before installing and offers a restart when an imported package changed.

    Returns:
        The requirements that were missing.

    Raises:
        RuntimeError: Slicer too old, a Slicer-owned package too old, or the user declined.
    """
    check_slicer_version(running_slicer_version())
    too_old = missing_slicer_provided()
    if too_old:
        raise RuntimeError("this Slicer's own Python packages are older than MedSynth needs "
                           f"({', '.join(too_old)}); install a current Slicer")
    requirements = installable_requirements(read_requirements())
    missing = missing_requirements(requirements)
    if not missing:
        return []
    from packaging.requirements import Requirement
    from slicer import packaging as slicer_packaging  # Slicer >= 5.12

    slicer_packaging.pip_ensure([Requirement(r) for r in missing], skip_packages=list(SLICER_OWNED_PACKAGES),
                                requester="MedSynth")
    return missing


def ensure_torch(confirm: Callable[[str], bool]) -> str:
    """torch through the PyTorch extension, installed only after the user agrees.

    Returns:
        The installed torch version.

    Raises:
        RuntimeError: the PyTorch extension is missing, or the user declined.
    """
    try:
        import PyTorchUtils  # type: ignore[import-not-found]
    except ImportError:
        raise RuntimeError("MedSynth needs the PyTorch extension: install 'PyTorch' from the Extensions "
                           "Manager, restart Slicer, then try again") from None
    torch_logic = PyTorchUtils.PyTorchUtilsLogic()
    if torch_logic.torchInstalled():
        import torch

        return torch.__version__
    if not confirm("MedSynth synthesises with PyTorch, which is not installed yet.\n\n"
                   "Install it now through the PyTorch extension? It picks the CUDA build that fits "
                   "this computer's GPU driver (several GB; this can take a few minutes)."):
        raise RuntimeError("PyTorch installation was declined; MedSynth cannot synthesise without it")
    torch = torch_logic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)
    if torch is None:
        raise RuntimeError("PyTorch could not be installed; see the Python console for details")
    return torch.__version__
