"""Static checks of the Slicer extension: the .ui file, the parameter bindings, CMake, catalog entry, icon.

Nothing here needs Slicer or Qt: MedSynth.py and MedSynth.ui are parsed, not run.
"""

from __future__ import annotations

import ast
import json
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "MedSynth"
SCRIPT = MODULE / "MedSynth.py"
UI = MODULE / "Resources" / "UI" / "MedSynth.ui"

#: Widget classes Slicer's parameterNodeWrapper can bind to each parameter type
#: (slicer/parameterNodeWrapper/guiConnectors.py: exact class matches).
CONNECTORS = {
    "bool": {"QCheckBox", "QPushButton"},
    "int": {"QSpinBox", "QSlider", "QComboBox"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget", "QComboBox"},
    "str": {"QLineEdit", "QTextEdit", "QComboBox"},
    "path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "node": {"qMRMLNodeComboBox", "qMRMLSubjectHierarchyTreeView"},
    "enum": {"QComboBox"},
}


def _ui_widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def _binding(widget: ET.Element) -> str | None:
    for prop in widget.findall("property"):
        if prop.get("name") == "SlicerParameterName":
            return prop.findtext("string")
    return None


def _module_tree() -> ast.Module:
    return ast.parse(SCRIPT.read_text(), filename=str(SCRIPT))


def _parameters() -> dict[str, str]:
    """name -> annotation source of the @parameterNodeWrapper class."""
    for node in _module_tree().body:
        if isinstance(node, ast.ClassDef) and any(
                (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") for d in node.decorator_list):
            return {stmt.target.id: ast.unparse(stmt.annotation) for stmt in node.body
                    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)}
    raise AssertionError("no @parameterNodeWrapper class in MedSynth.py")


def _kind(annotation: str) -> str:
    base = annotation
    match = re.match(r"Annotated\[\s*([^,\]]+)", annotation)
    if match:
        base = match.group(1).strip()
    if "vtkMRML" in base:
        return "node"
    if base in ("pathlib.Path", "Path"):
        return "path"
    if base in ("bool", "int", "float", "str"):
        return base
    if base in _enums():
        return "enum"
    raise AssertionError(f"unexpected parameter type {annotation}")


def _enums() -> set[str]:
    """Enum classes defined in MedSynth.py: class statements, and enums made by calling one (functional API)."""
    classes = {node.name for node in _module_tree().body if isinstance(node, ast.ClassDef)
               and any(ast.unparse(b) in ("enum.Enum", "Enum") for b in node.bases)}
    made = {target.id for node in _module_tree().body if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name)
            and node.value.func.id in classes for target in node.targets if isinstance(target, ast.Name)}
    return classes | made


# --- the .ui file -------------------------------------------------------------------------------


def test_ui_is_well_formed_designer_xml():
    root = ET.parse(UI).getroot()
    assert root.tag == "ui" and root.get("version") == "4.0"
    assert root.findtext("class") == "MedSynth"
    top = root.find("widget")
    assert top is not None and top.get("class") == "qMRMLWidget"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "widget names must be unique"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    builtin = {"QWidget", "QLabel", "QPushButton", "QCheckBox", "QComboBox", "QSpinBox", "QDoubleSpinBox",
               "QLineEdit", "QTextEdit", "QPlainTextEdit", "QProgressBar", "QSlider", "QListWidget"}
    for widget in root.iter("widget"):
        assert widget.get("class") in builtin | declared, f"undeclared widget class {widget.get('class')}"
    for connection in root.iter("connection"):
        assert connection.findtext("receiver") in names
        assert connection.findtext("sender") in names


def test_every_widget_the_code_uses_exists():
    used = set()
    for node in ast.walk(_module_tree()):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == "ui" and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "self"):
            used.add(node.attr)
    assert used, "MedSynth.py uses no self.ui widgets?"
    missing = sorted(used - set(_ui_widgets()))
    assert not missing, f"MedSynth.py uses widgets missing from MedSynth.ui: {missing}"


def test_every_parameter_is_bound_once_to_a_compatible_widget():
    parameters = _parameters()
    assert len(parameters) >= 20
    bound: dict[str, list[ET.Element]] = {}
    for widget in _ui_widgets().values():
        name = _binding(widget)
        if name is not None:
            bound.setdefault(name, []).append(widget)
    unbound = sorted(set(parameters) - set(bound))
    assert not unbound, f"parameters without a SlicerParameterName widget: {unbound}"
    stale = sorted(set(bound) - set(parameters))
    assert not stale, f"SlicerParameterName bindings to no parameter: {stale}"
    for name, widgets in bound.items():
        assert len(widgets) == 1, f"parameter {name} is bound to {len(widgets)} widgets"
        kind = _kind(parameters[name])
        cls = widgets[0].get("class")
        assert cls in CONNECTORS[kind], f"{name} ({kind}) cannot bind to a {cls}"
        if cls == "QComboBox" and kind != "enum":
            assert "Choice(" in parameters[name], f"{name}: a QComboBox binding needs a Choice annotation"
        if cls in ("QSlider", "ctkSliderWidget"):
            assert "WithinRange(" in parameters[name], f"{name}: a slider binding needs WithinRange"


def test_node_combo_boxes_get_the_scene():
    root = ET.parse(UI).getroot()
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    for name, widget in _ui_widgets().items():
        if widget.get("class") in ("qMRMLNodeComboBox", "qSlicerMarkupsPlaceWidget"):
            assert name in receivers, f"{name} is not connected to mrmlSceneChanged"


def test_module_file_structure():
    classes = {node.name: [ast.unparse(b) for b in node.bases] for node in _module_tree().body
               if isinstance(node, ast.ClassDef)}
    assert "ScriptedLoadableModule" in classes["MedSynth"]
    assert "ScriptedLoadableModuleWidget" in classes["MedSynthWidget"]
    assert "ScriptedLoadableModuleLogic" in classes["MedSynthLogic"]
    assert "ScriptedLoadableModuleTest" in classes["MedSynthTest"]
    source = SCRIPT.read_text()
    assert "resourcePath(\"UI/MedSynth.ui\")" in source
    assert "connectGui(self.ui)" in source


def test_the_logic_package_never_imports_qt():
    """Everything but the widgets runs without Qt (and is tested on slicer-core)."""
    for path in sorted((MODULE / "MedSynthSlicerLib").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in ("qt", "ctk", "PythonQt", "PyQt5", "PySide2", "PySide6"), \
                    f"{path.name} imports {name}"


# --- CMake, catalog entry, license, icon, requirements ------------------------------------------


def _cmake_list(text: str, variable: str) -> list[str]:
    match = re.search(r"set\(\s*" + variable + r"\s+(.*?)\)", text, re.S)
    assert match, f"{variable} not set"
    return [item.replace("${MODULE_NAME}", "MedSynth") for item in match.group(1).split()]


def test_module_cmake_lists_every_script_and_resource():
    text = (MODULE / "CMakeLists.txt").read_text()
    scripts = _cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    resources = _cmake_list(text, "MODULE_PYTHON_RESOURCES")
    on_disk_scripts = sorted(str(p.relative_to(MODULE)) for p in MODULE.rglob("*.py") if "__pycache__" not in p.parts)
    on_disk_resources = sorted(str(p.relative_to(MODULE)) for p in (MODULE / "Resources").rglob("*") if p.is_file())
    assert sorted(scripts) == on_disk_scripts
    assert sorted(resources) == on_disk_resources
    assert "slicerMacroBuildScriptedModule(" in text
    assert re.search(r"slicer_add_python_unittest\(\s*SCRIPT\s+\$\{MODULE_NAME\}\.py\s*\)", text)
    assert "ctkMacroCompilePythonScript(" in text and "MedSynthLib/*.py" in text
    assert "Resources/requirements.txt" in text


def test_extension_cmake_follows_the_template():
    text = (REPO / "CMakeLists.txt").read_text()
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                     "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert re.search(r"set\(" + variable + r" \"[^\"]+\"\)", text), variable
    assert re.search(r'set\(EXTENSION_DEPENDS "PyTorch"\)', text)
    assert "find_package(Slicer REQUIRED)" in text and "include(${Slicer_USE_FILE})" in text
    assert "add_subdirectory(MedSynth)" in text
    assert "include(${Slicer_EXTENSION_GENERATE_CONFIG})" in text and "include(${Slicer_EXTENSION_CPACK})" in text
    assert (REPO / "docs" / "figures" / "slicer_workflow.png").name in text
    assert "Resources/Icons/MedSynth.png" in text


def test_extensions_index_catalog_entry():
    entry = json.loads((REPO / "Resources" / "ExtensionsIndex" / "MedSynth.json").read_text())
    allowed = {"$schema", "build_dependencies", "build_subdirectory", "category", "enabled", "scm_revision",
               "scm_type", "scm_url", "tier"}
    assert set(entry) <= allowed
    assert {"$schema", "category", "scm_url"} <= set(entry)
    assert "slicer-extension-catalog-entry-schema" in entry["$schema"]
    text = (REPO / "CMakeLists.txt").read_text()
    assert f'set(EXTENSION_CATEGORY "{entry["category"]}")' in text
    assert entry["build_dependencies"] == ["PyTorch"]


def test_license_is_apache_2():
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


@pytest.mark.parametrize("path", [REPO / "Resources" / "Icons" / "MedSynth.png",
                                  MODULE / "Resources" / "Icons" / "MedSynth.png"])
def test_icon_is_a_128_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (128, 128)


def test_requirements_never_replace_slicer_packages():
    from importlib import import_module

    import sys
    sys.path.insert(0, str(MODULE))
    environment = import_module("MedSynthSlicerLib.environment")
    requirements = environment.read_requirements(REPO / "Resources" / "requirements.txt")
    names = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}
    owned = {name.lower() for name in environment.SLICER_OWNED_PACKAGES}
    assert {"simpleitk", "numpy", "vtk", "torch", "scipy", "pydicom", "highdicom"} <= owned
    assert not names & owned
    assert {"monai", "scikit-learn", "nibabel", "nilearn", "safetensors"} <= names
    # what MedSynth needs of Slicer's own packages is checked instead of installed
    provided = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in environment.SLICER_PROVIDED_REQUIREMENTS}
    assert {"pydicom", "highdicom", "scipy", "numpy"} <= provided


def test_every_logic_member_the_widget_calls_exists():
    """The widget talks to WorkflowLogic only through members that exist (caught here, not in Slicer)."""
    import sys

    sys.path.insert(0, str(MODULE))
    from MedSynthSlicerLib.logic import WorkflowLogic

    used = set()
    for node in ast.walk(_module_tree()):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "workflow":
            used.add(node.attr)
    assert {"prepare", "start_generate", "cancel_generate", "finish_generate", "start_export"} <= used
    instance_attributes = {"log", "progress", "device_info", "scene", "python", "work_dir"}
    missing = sorted(name for name in used if not hasattr(WorkflowLogic, name) and name not in instance_attributes)
    assert not missing, f"MedSynth.py calls WorkflowLogic members that do not exist: {missing}"
