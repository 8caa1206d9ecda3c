"""The module's environment rules: minimum Slicer, torch floor, what is installed into Slicer and how.

``slicer.packaging`` (Slicer >= 5.12) is not part of slicer-core; the tests give
``ensure_python_requirements`` a recording stand-in for it and check what the
module hands to ``pip_ensure``.  The floors are checked against the installed
packages' own metadata (the pinned stack of pyproject.toml).
"""

from __future__ import annotations

import re
import sys
import types
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MedSynth"))

from MedSynthSlicerLib import environment  # noqa: E402


def _pinned(name: str) -> str:
    """The exact version pyproject.toml pins for a package."""
    text = (REPO / "pyproject.toml").read_text()
    match = re.search(r'"' + re.escape(name) + r'==([^"]+)"', text)
    assert match, f"{name} is not pinned in pyproject.toml"
    return match.group(1)


# --- minimum Slicer ------------------------------------------------------------------------------


@pytest.mark.parametrize("version, python", [((5, 8, 1), (3, 9)), ((5, 10, 0), (3, 12)), ((5, 11, 0), (3, 12)),
                                             ((5, 12, 0), (3, 9))])
def test_an_older_slicer_is_refused_with_one_clear_message(version, python):
    with pytest.raises(RuntimeError) as raised:
        environment.check_slicer_version(version, python)
    message = str(raised.value)
    assert "\n" not in message
    assert "needs 3D Slicer 5.12 or newer" in message
    assert ".".join(str(v) for v in version) in message


@pytest.mark.parametrize("version", [(5, 12, 0), (5, 12, 3), (5, 13, 0), (6, 0, 0)])
def test_a_current_slicer_is_accepted(version):
    environment.check_slicer_version(version, (3, 12))


def test_minimum_python_covers_the_pinned_stack():
    """The minimum Slicer's Python must install every pinned package (their Requires-Python)."""
    floors = {}
    for name in ("monai", "nilearn", "pydicom", "highdicom"):
        assert metadata.version(name) == _pinned(name), f"{name}: the venv is not the pinned stack"
        requires_python = metadata.metadata(name)["Requires-Python"]
        floor = min(Version(s.version) for s in SpecifierSet(requires_python) if s.operator in (">=", "~="))
        floors[name] = floor
    needed = max(floors.values())
    assert Version(".".join(map(str, environment.MINIMUM_PYTHON))) >= needed, floors
    # the Python 3.9 of Slicer 5.8 installs none of them
    assert all(Version("3.9") < floor for floor in floors.values())


# --- torch ---------------------------------------------------------------------------------------


def test_torch_floor_is_what_monai_needs():
    assert metadata.version("monai") == _pinned("monai")
    torch_requirements = [Requirement(r) for r in metadata.requires("monai") or []
                          if Requirement(r).name == "torch" and Requirement(r).marker is None]
    assert torch_requirements, "monai declares no torch requirement?"
    monai_spec = torch_requirements[0].specifier
    ours = SpecifierSet(environment.TORCH_REQUIREMENT)
    monai_floor = min(Version(s.version) for s in monai_spec if s.operator == ">=")
    assert monai_floor in ours
    # nothing below MONAI's floor passes ours (2.2 used to)
    for older in ("2.2.0", "2.7.1", str(Version(f"{monai_floor.major}.{max(monai_floor.minor - 1, 0)}.0"))):
        if Version(older) < monai_floor:
            assert Version(older) not in ours, older
    assert Version(_pinned("torch")) in ours


# --- installing into Slicer ----------------------------------------------------------------------


class _FakeApp:
    def __init__(self, version):
        self.majorVersion, self.minorVersion, self.patchVersion = version


@pytest.fixture()
def fake_slicer(monkeypatch):
    """``slicer.app`` of a chosen version and a recording ``slicer.packaging``."""
    import slicer

    calls = []
    packaging = types.ModuleType("slicer.packaging")

    def pip_ensure(requirements, constraints=None, skip_packages=None, prompt_install=True, prompt_restart=True,
                   requester=None, skip_in_testing=True, show_progress=True):
        calls.append({"requirements": requirements, "skip_packages": skip_packages, "requester": requester,
                      "prompt_install": prompt_install, "prompt_restart": prompt_restart})

    packaging.pip_ensure = pip_ensure
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    monkeypatch.setattr(slicer, "packaging", packaging, raising=False)
    monkeypatch.setattr(slicer, "app", _FakeApp((5, 12, 0)), raising=False)
    return types.SimpleNamespace(calls=calls, slicer=slicer)


def test_missing_packages_go_to_slicer_packaging_pip_ensure(fake_slicer, monkeypatch):
    monkeypatch.setattr(environment, "read_requirements",
                        lambda path=None: ["monai==" + _pinned("monai"), "medsynth-absent-package==1.0",
                                           "numpy>=1.0", "pydicom>=3.0", "torch>=2.8"])
    missing = environment.ensure_python_requirements()
    assert missing == ["medsynth-absent-package==1.0"]  # Slicer-owned lines are never handed to pip
    (call,) = fake_slicer.calls
    assert [str(r) for r in call["requirements"]] == ["medsynth-absent-package==1.0"]
    assert all(isinstance(r, Requirement) for r in call["requirements"])
    assert set(call["skip_packages"]) == set(environment.SLICER_OWNED_PACKAGES)
    assert {"numpy", "SimpleITK", "vtk", "torch", "pydicom", "highdicom"} <= set(call["skip_packages"])
    assert call["requester"] == "MedSynth"
    assert call["prompt_install"] and call["prompt_restart"]  # Slicer asks, and offers the restart


def test_nothing_is_installed_when_everything_is_there(fake_slicer):
    assert environment.ensure_python_requirements() == []
    assert fake_slicer.calls == []


def test_an_old_slicer_is_refused_before_anything_is_installed(fake_slicer, monkeypatch):
    monkeypatch.setattr(fake_slicer.slicer, "app", _FakeApp((5, 10, 2)))
    monkeypatch.setattr(environment, "read_requirements", lambda path=None: ["medsynth-absent-package==1.0"])
    with pytest.raises(RuntimeError, match="needs 3D Slicer 5.12 or newer; this is Slicer 5.10.2"):
        environment.ensure_python_requirements()
    assert fake_slicer.calls == []


def test_a_too_old_slicer_owned_package_is_reported_not_replaced(fake_slicer, monkeypatch):
    monkeypatch.setattr(environment, "SLICER_PROVIDED_REQUIREMENTS", ("numpy>=99",))
    with pytest.raises(RuntimeError, match=r"older than MedSynth needs \(numpy>=99\)"):
        environment.ensure_python_requirements()
    assert fake_slicer.calls == []


def test_slicer_provided_packages_meet_their_floors_in_the_pinned_stack():
    assert environment.missing_slicer_provided() == []


def test_readme_states_the_minimum_slicer():
    text = (REPO / "README.md").read_text()
    needed = ".".join(str(v) for v in environment.MINIMUM_SLICER)
    assert f"Slicer {needed} or newer" in text
    assert "Slicer ≥ 5.8" not in text and "slicer.pydeps" not in text


def test_the_panel_choices_are_medsynthlibs():
    """The choice lists are read from MedSynthLib; their fallbacks (before it is installed) match it."""
    from MedSynthLib.export import FORMATS, NAMINGS
    from MedSynthLib.schema.labels import CONVENTIONS
    from MedSynthSlicerLib import parameters

    assert parameters.LABEL_CONVENTIONS == tuple(CONVENTIONS) == parameters.FALLBACK_LABEL_CONVENTIONS
    assert parameters.EXPORT_FORMATS == tuple(FORMATS) == parameters.FALLBACK_EXPORT_FORMATS
    assert parameters.EXPORT_NAMINGS == tuple(NAMINGS) == parameters.FALLBACK_EXPORT_NAMINGS
    from MedSynthLib.synthesis.appearance import SPREAD_RANGE

    assert parameters.APPEARANCE_SPREAD_RANGE == SPREAD_RANGE == parameters.FALLBACK_APPEARANCE_SPREAD_RANGE
