"""MedSynth.py itself - the parameter node, the module and the widget's handlers - on slicer-core.

The PyPI ``slicer-core`` libraries hold MRML (real scenes, real nodes) but not
Slicer's Qt layer: no ``qt``, no ``slicer.ScriptedLoadableModule``, no
``slicer.parameterNodeWrapper``.  To run MedSynth.py anyway this file gives it
small stand-ins for those, and one that matters: :func:`parameter_node_wrapper`,
a re-statement of the rules Slicer's ``parameterNodeWrapper`` applies when it
builds a parameter node (Slicer 5.12, ``Base/Python/slicer/parameterNodeWrapper``):

* every field gets a default: ``Default(...)`` or the type's own (0, "", False,
  ``Path()``, the first enum member, ``None`` for a node, for ``Optional[X]``
  ``None``, for another ``Union`` its first member's);
* that default is written to the scene node when the node is built, through the
  type's checks, so it must be a value the type accepts: a plain node type
  accepts ``None``, but a ``Union`` of node types only accepts ``None`` when
  ``None`` is one of its members (the union picks its member by the value's
  type, and no node type takes ``NoneType``) - this is what raised the
  ``TypeError`` in ``initializeParameterNode()`` in Slicer;
* ``WithinRange`` / ``Choice`` validate every write, the default included.

Values are stored on a real ``vtkMRMLScriptedModuleNode`` of a real scene
(parameters as text, nodes as node references), so the widget's handlers run
against real MRML and the real ``WorkflowLogic``.  Real data: ``../shared/data``
(skipped with a reason when absent, a failure under CI).
"""

from __future__ import annotations

import contextlib
import enum
import importlib.util
import os
import re
import pathlib
import sys
import types
import typing
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "MedSynth"
sys.path.insert(0, str(MODULE_DIR))


def _require_slicer_core():
    try:
        import slicer

        slicer.vtkMRMLScene  # noqa: B018
    except (ImportError, AttributeError) as exc:
        message = f"slicer-core is not installed ({exc}); pip install -e '.[test]'"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message, allow_module_level=True)


_require_slicer_core()

import slicer  # noqa: E402

from conftest import rewrite_model_config  # noqa: E402
from MedSynthSlicerLib import mrml  # noqa: E402
from MedSynthSlicerLib.errors import WorkflowError  # noqa: E402


# =================================================================================================
# The parameter-node rules (a re-statement of Slicer's parameterNodeWrapper, see the module doc)
# =================================================================================================


class Validator:
    def validate(self, value) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class WithinRange(Validator):
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value) -> None:
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"{value!r} is outside [{self.minimum}, {self.maximum}]")


class Choice(Validator):
    def __init__(self, choices):
        self.choices = list(choices)

    def validate(self, value) -> None:
        if value not in self.choices:
            raise ValueError(f"{value!r} is not one of {self.choices}")


class Default:
    def __init__(self, value):
        self.value = value


_PATH_TYPES = (pathlib.Path, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePath, pathlib.PurePosixPath,
               pathlib.PureWindowsPath)


def _is_node_type(type_) -> bool:
    return isinstance(type_, type) and issubclass(type_, slicer.vtkMRMLNode)


def _check_supported(type_, where: str) -> None:
    """Raise like Slicer does when no serializer exists for a field's type."""
    if typing.get_origin(type_) is typing.Union:
        for member in typing.get_args(type_):
            _check_supported(member, where)
        return
    if type_ in (int, float, str, bool, type(None)) or type_ in _PATH_TYPES or _is_node_type(type_):
        return
    if isinstance(type_, type) and issubclass(type_, enum.Enum):
        if len(type_) == 0:
            raise TypeError(f"{where}: an enum without members cannot be stored")
        return
    raise TypeError(f"{where}: no parameter-node serializer for {type_!r}")


def _type_default(type_):
    if typing.get_origin(type_) is typing.Union:
        members = typing.get_args(type_)
        if len(members) == 2 and members[1] is type(None):
            return None
        return _type_default(members[0])
    if _is_node_type(type_):
        return None
    if isinstance(type_, type) and issubclass(type_, enum.Enum):
        return next(iter(type_))
    return {int: 0, float: 0, str: "", bool: False}.get(type_, type_() if type_ in _PATH_TYPES else None)


def _member_takes(type_, value) -> bool:
    """Whether one member of a Union takes the value (chosen by the value's own type, as Slicer does)."""
    if type_ is type(None):
        return value is None
    if value is None:
        return False  # no serializer but NoneType's can write None inside a Union
    return _plain_takes(type_, value)


def _plain_takes(type_, value) -> bool:
    if typing.get_origin(type_) is typing.Union:
        return any(_member_takes(member, value) for member in typing.get_args(type_))
    if _is_node_type(type_):
        return value is None or isinstance(value, type_)  # a plain node field may be empty
    if type_ is bool:
        return isinstance(value, bool)
    if type_ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if type_ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if type_ is str:
        return isinstance(value, str)
    if type_ in _PATH_TYPES:
        return isinstance(value, type_)
    if isinstance(type_, type) and issubclass(type_, enum.Enum):
        return isinstance(value, type_)
    return False


class _Field:
    def __init__(self, name: str, annotation) -> None:
        self.name = name
        if typing.get_origin(annotation) is typing.Annotated:
            self.type, *extras = typing.get_args(annotation)
        else:
            self.type, extras = annotation, []
        _check_supported(self.type, name)
        self.validators = [x for x in extras if isinstance(x, Validator)]
        defaults = [x for x in extras if isinstance(x, Default)]
        self.default = defaults[0].value if defaults else _type_default(self.type)

    def check(self, value) -> None:
        if not _plain_takes(self.type, value):
            raise TypeError(f"parameter {self.name!r}: cannot write {value!r} (type {type(value).__name__}) "
                            f"into a {self.type!r} field")
        for validator in self.validators:
            validator.validate(value)

    def write(self, node, value) -> None:
        self.check(value)
        node.SetParameter(self.name + ".set", "1")
        if value is None or isinstance(value, slicer.vtkMRMLNode):
            node.SetParameter(self.name, "")
            node.SetNodeReferenceID(self.name, value.GetID() if value is not None else None)
        elif isinstance(value, enum.Enum):
            node.SetParameter(self.name, value.name)
        else:
            node.SetParameter(self.name, str(value))

    def read(self, node):
        text = node.GetParameter(self.name)
        candidates = typing.get_args(self.type) if typing.get_origin(self.type) is typing.Union else (self.type,)
        if any(_is_node_type(c) for c in candidates):
            return node.GetNodeReference(self.name)
        type_ = self.type
        if isinstance(type_, type) and issubclass(type_, enum.Enum):
            return type_[text]
        if type_ is bool:
            return text == "True"
        return type_(text)


def parameter_node_wrapper(cls):
    """Build a parameter-node class from annotations, applying Slicer's rules (see the module doc)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {name: _Field(name, annotation) for name, annotation in hints.items()}

    def __init__(self, parameterNode):
        self.parameterNode = parameterNode
        for field in fields.values():
            if parameterNode.GetParameter(field.name + ".set") != "1":
                field.write(parameterNode, field.default)

    def make_property(field):
        return property(lambda self: field.read(self.parameterNode),
                        lambda self, value: field.write(self.parameterNode, value))

    for name, field in fields.items():
        setattr(cls, name, make_property(field))
    cls.__init__ = __init__
    cls.allParameters = fields
    cls.connectGui = lambda self, gui: 1
    cls.disconnectGui = lambda self, tag: None
    cls.AddObserver = lambda self, event, callback, priority=0.0: self.parameterNode.AddObserver(event, callback)
    cls.RemoveObserver = lambda self, tag: self.parameterNode.RemoveObserver(tag)
    cls.GetID = lambda self: self.parameterNode.GetID()
    return cls


# =================================================================================================
# Stand-ins for Slicer's Qt layer, and a widget tree that records what the handlers do
# =================================================================================================


class FakeWidget:
    """Any Qt widget: properties are plain attributes, every method call is recorded (and returns None)."""

    def __init__(self, name: str) -> None:
        self.__dict__.update(_name=name, calls=[], enabled=True, text="", toolTip="", collapsed=False)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if name in ("clicked", "toggled", "timeout", "currentTextChanged"):
            signal = types.SimpleNamespace(connect=lambda slot: None)
            self.__dict__[name] = signal
            return signal

        def method(*args, **kwargs):
            self.calls.append((name, args))

        return method


class FakeUi:
    def __init__(self) -> None:
        self._widgets: dict[str, FakeWidget] = {}

    def __getattr__(self, name: str) -> FakeWidget:
        if name.startswith("_"):
            raise AttributeError(name)
        return self._widgets.setdefault(name, FakeWidget(name))


class Messages:
    """What the widget showed the user (slicer.util message boxes)."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.infos: list[str] = []

    @contextlib.contextmanager
    def try_with_error_display(self, message=None, show=True, waitCursor=False):
        try:
            yield
        except Exception as exc:
            self.errors.append(f"{message} {exc}")
            raise


def _stub_modules(scene, tmp_path, messages: Messages) -> dict[str, types.ModuleType]:
    qt = types.ModuleType("qt")

    class QTimer:
        def __init__(self):
            self.timeout = types.SimpleNamespace(connect=lambda slot: None)
            self.active = False

        def setInterval(self, ms):
            self.interval = ms

        def start(self):
            self.active = True

        def stop(self):
            self.active = False

    qt.QTimer = QTimer

    scripted = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent or types.SimpleNamespace(isEntered=True)

        def setup(self):  # Slicer's base setup() gives the panel its layout
            self.layout = FakeWidget("layout")

        def resourcePath(self, filename):
            return str(MODULE_DIR / "Resources" / filename)

    class ScriptedLoadableModuleLogic:
        def getParameterNode(self):
            node = scene.GetSingletonNode("MedSynth", "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.vtkMRMLScriptedModuleNode()
                node.SetSingletonTag("MedSynth")
                node.SetName("MedSynth")
                node = scene.AddNode(node)
            return node

    scripted.ScriptedLoadableModule = ScriptedLoadableModule
    scripted.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    scripted.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    scripted.ScriptedLoadableModuleTest = type("ScriptedLoadableModuleTest", (), {})

    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = parameter_node_wrapper
    wrapper.Choice, wrapper.Default, wrapper.WithinRange = Choice, Default, WithinRange

    i18n = types.ModuleType("slicer.i18n")
    i18n.translated = []

    def tr(text):
        i18n.translated.append(text)
        return text

    i18n.tr = tr
    i18n.translate = lambda context, text: tr(text)
    return {"qt": qt, "slicer.ScriptedLoadableModule": scripted, "slicer.parameterNodeWrapper": wrapper,
            "slicer.i18n": i18n}


def _import_module_file(name: str, monkeypatch) -> types.ModuleType:
    """Execute MedSynth.py as module ``name`` (registered, so its annotations resolve as in Slicer)."""
    spec = importlib.util.spec_from_file_location(name, MODULE_DIR / "MedSynth.py")
    loaded = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, loaded)
    spec.loader.exec_module(loaded)
    return loaded


@pytest.fixture()
def module(tmp_path, monkeypatch):
    """MedSynth.py imported on slicer-core with the stand-ins; ``slicer.mrmlScene`` a real headless scene."""
    scene, logics = mrml.create_headless_scene()
    messages = Messages()
    for name, stub in _stub_modules(scene, tmp_path, messages).items():
        monkeypatch.setitem(sys.modules, name, stub)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    app = types.SimpleNamespace(temporaryPath=str(tmp_path), processEvents=lambda: None,
                                layoutManager=lambda: None)
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", messages.try_with_error_display)
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, *a, **k: messages.errors.append(str(text)))
    monkeypatch.setattr(slicer.util, "warningDisplay", lambda text, *a, **k: messages.errors.append(str(text)))
    monkeypatch.setattr(slicer.util, "infoDisplay", lambda text, *a, **k: messages.infos.append(str(text)))
    monkeypatch.setattr(slicer.util, "setSliceViewerLayers", lambda *a, **k: None)
    loaded = _import_module_file("MedSynth_under_test", monkeypatch)
    loaded.scene, loaded.messages, loaded.logics = scene, messages, logics
    loaded.i18n = sys.modules["slicer.i18n"]
    return loaded


def _widget(module):
    widget = module.MedSynthWidget()
    widget.ui = FakeUi()
    widget.logic = module.MedSynthLogic()
    return widget


def _set_up_widget(module, monkeypatch):
    """The widget built by its own setup(), as Slicer builds it: the .ui file's widgets are stand-ins that record
    their calls, the scene observers are real (``slicer.mrmlScene`` is the fixture's real scene)."""
    ui = FakeUi()
    monkeypatch.setattr(slicer.util, "loadUI", lambda path: FakeWidget("uiWidget"), raising=False)
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda widget: ui, raising=False)
    monkeypatch.setattr(slicer, "qSlicerMarkupsPlaceWidget", types.SimpleNamespace(ForcePlaceSingleMarkup=2),
                        raising=False)
    for name, value in (("majorVersion", 5), ("minorVersion", 12), ("patchVersion", 0)):
        monkeypatch.setattr(slicer.app, name, value, raising=False)
    widget = module.MedSynthWidget()
    widget.setup()
    assert widget.ui is ui and widget._parameterNode is not None
    return widget


# =================================================================================================
# The parameter node
# =================================================================================================


def test_the_rules_refuse_a_union_of_nodes_without_none():
    """The defect of issue 16: Union[node, node] defaults to None, which no member takes."""
    scene = slicer.vtkMRMLScene()

    class Broken:
        tumourInput: typing.Union[slicer.vtkMRMLSegmentationNode, slicer.vtkMRMLLabelMapVolumeNode]

    class Fixed:
        tumourInput: typing.Optional[typing.Union[slicer.vtkMRMLSegmentationNode, slicer.vtkMRMLLabelMapVolumeNode]]
        plainNode: slicer.vtkMRMLScalarVolumeNode
        ranged: typing.Annotated[int, WithinRange(0, 5), Default(9)]

    with pytest.raises(TypeError, match="tumourInput"):
        parameter_node_wrapper(Broken)(scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode"))
    with pytest.raises(ValueError, match="outside"):  # a Default outside its range is refused too
        parameter_node_wrapper(Fixed)(scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode"))


def test_parameter_node_builds_on_a_real_scene_node_with_every_default(module):
    cls = module.MedSynthParameterNode
    node = module.scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
    params = cls(node)  # what initializeParameterNode() does in Slicer (raised TypeError before the fix)
    assert len(cls.allParameters) >= 25
    for name, field in cls.allParameters.items():
        value = getattr(params, name)
        if isinstance(field.default, pathlib.PurePath) or field.default is None or isinstance(field.default, enum.Enum):
            assert value == field.default, name
        else:
            assert value == type(field.default)(field.default), name
    assert params.device.value == "auto" and params.labelConvention == "brats2021" and params.lockAnatomy is True
    # every node-typed field can be emptied again and takes a node of its class
    for name, field in cls.allParameters.items():
        members = typing.get_args(field.type) if typing.get_origin(field.type) is typing.Union else (field.type,)
        node_types = [m for m in members if _is_node_type(m)]
        if not node_types:
            continue
        for node_type in node_types:
            instance = module.scene.AddNewNodeByClass(node_type.__name__)
            setattr(params, name, instance)
            assert getattr(params, name) is instance, name
        setattr(params, name, None)
        assert getattr(params, name) is None, name
    # a second wrapper on the same node reads what is stored (the widget re-wraps on enter)
    params.rating = 4
    assert cls(node).rating == 4
    with pytest.raises(ValueError):
        params.rating = 7
    with pytest.raises(TypeError):
        params.tumourInput = module.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    assert params.appearanceSpread == 1.0
    params.appearanceSpread = 0.5
    assert cls(node).appearanceSpread == 0.5
    params.appearanceSpread = 1.5  # within the range a model may accept; the worker checks the chosen model's
    assert cls(node).appearanceSpread == 1.5
    with pytest.raises(ValueError):
        params.appearanceSpread = 2.5  # past the range any model may accept


def test_device_choices_follow_the_platform(module):
    from MedSynthSlicerLib.parameters import DEVICES, platform_devices

    assert platform_devices("Darwin") == ("auto", "mps", "cpu")
    for system in ("Linux", "Windows"):
        assert platform_devices(system) == ("auto", "cuda", "cpu")
    assert [d.value for d in module.Device] == list(platform_devices())
    assert set(platform_devices()) <= set(DEVICES)
    assert all(d.label() for d in module.Device)
    assert module.MedSynthParameterNode.allParameters["device"].default is module.Device.AUTO


def test_a_scene_saved_on_another_platform_keeps_the_module_usable(module):
    """A stored device this platform does not offer (CUDA in a scene opened on a Mac) falls back to auto."""
    logic = module.MedSynthLogic()
    params = logic.getParameterNode()
    params.device = module.Device.CPU
    foreign = "MPS" if "MPS" not in module.Device.__members__ else "CUDA"
    params.parameterNode.SetParameter("device", foreign)
    with pytest.raises((KeyError, ValueError)):  # what the wrapper alone does with an unknown member name
        module.MedSynthParameterNode(params.parameterNode).device
    assert logic.getParameterNode().device is module.Device.AUTO


def _foreign_device_name(module) -> str:
    """A device this platform does not offer, as the parameter node stores it (MPS here, CUDA on a Mac)."""
    return "MPS" if "MPS" not in module.Device.__members__ else "CUDA"


def test_a_scene_saved_on_another_platform_is_repaired_when_imported(module, monkeypatch, tmp_path):
    """The device was repaired only in getParameterNode(): a scene loaded into the open session (its MedSynth
    parameter node copied into this one) left the panel with a device it cannot read until it was re-entered."""
    widget = _set_up_widget(module, monkeypatch)
    try:
        params = widget._parameterNode
        params.device, params.rating = module.Device.CPU, 4
        # the scene as saved on the other platform: this panel's parameters, its device, another rating
        saved = slicer.vtkMRMLScene()
        node = slicer.vtkMRMLScriptedModuleNode()
        node.SetSingletonTag("MedSynth")
        node.SetName("MedSynth")
        for name in params.parameterNode.GetParameterNames():
            node.SetParameter(name, params.parameterNode.GetParameter(name))
        node.SetParameter("device", _foreign_device_name(module))
        node.SetParameter("rating", "3")
        saved.AddNode(node)
        saved.SetURL(str(tmp_path / "saved-elsewhere.mrml"))
        assert saved.Commit()
        module.scene.SetURL(str(tmp_path / "saved-elsewhere.mrml"))
        assert module.scene.Import()  # what loading a scene into the open session does (EndImportEvent)
        assert module.scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1
        params = widget._parameterNode
        assert params is not None and params.rating == 3  # the imported values are the panel's
        assert params.device is module.Device.AUTO and widget._options().device == "auto"
        assert any("device" in line for line in _logged(widget)), _logged(widget)
    finally:
        widget.cleanup()


def _logged(widget) -> list[str]:
    return [args[0] for name, args in widget.ui.logTextEdit.calls if name == "appendPlainText"]


def test_the_panel_says_when_slicer_is_too_old(module, monkeypatch):
    for version, expected in (((5, 10, 1), "needs 3D Slicer 5.12 or newer; this is Slicer 5.10.1"), ((5, 12, 0), None)):
        monkeypatch.setattr(slicer.app, "majorVersion", version[0], raising=False)
        monkeypatch.setattr(slicer.app, "minorVersion", version[1], raising=False)
        monkeypatch.setattr(slicer.app, "patchVersion", version[2], raising=False)
        problem = module.MedSynthWidget.slicerVersionProblem()
        assert (problem is None) if expected is None else (expected in problem)


def test_module_metadata_category_help_link_and_translations(module):
    parent = types.SimpleNamespace()
    module.MedSynth(parent)
    assert parent.categories == ["Image Synthesis"]
    assert module.DOCUMENTATION_URL in parent.helpText and "<a href=" in parent.helpText
    assert "Image Synthesis" in module.i18n.translated and parent.title in module.i18n.translated
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert f'set(EXTENSION_HOMEPAGE "{module.DOCUMENTATION_URL}")' in cmake


def test_translations_fall_back_to_plain_text_without_slicer_i18n(tmp_path, monkeypatch, module):
    monkeypatch.setitem(sys.modules, "slicer.i18n", None)  # import fails as in an application without it
    loaded = _import_module_file("MedSynth_without_i18n", monkeypatch)
    assert loaded._("Generate") == "Generate" and loaded.translate("context", "Image Synthesis") == "Image Synthesis"


def test_user_visible_strings_of_the_widget_go_through_translation():
    """Every literal shown in a message box, log or button text is wrapped in _() (an AST check)."""
    import ast

    tree = ast.parse((MODULE_DIR / "MedSynth.py").read_text())
    shown = {"errorDisplay", "warningDisplay", "infoDisplay", "_run", "_appendLog", "confirmOkCancelDisplay"}
    unwrapped = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in shown and node.args:
                first = node.args[0]
                if isinstance(first, (ast.Constant, ast.JoinedStr)):
                    unwrapped.append(f"line {node.lineno}: {ast.unparse(node)[:70]}")
    assert not unwrapped, "untranslated user-visible strings:\n" + "\n".join(unwrapped)


# =================================================================================================
# The widget's handlers without the GUI
# =================================================================================================


def test_initialize_parameter_node_adds_no_markups_node(module):
    widget = _widget(module)
    before = module.scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode")
    widget.initializeParameterNode()
    widget.initializeParameterNode()  # enter() again: same parameter node, still no point list
    assert module.scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode") == before == 0
    assert widget._parameterNode.tumourCentre is None
    assert module._path_text(widget._parameterNode.exportFolder) == str(pathlib.Path.home())
    assert module.scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1


def test_registered_models_are_listed(module):
    widget = _widget(module)
    widget.initializeParameterNode()
    widget._fillModelList()
    added = [args[0] for name, args in widget.ui.registeredModelsListWidget.calls if name == "addItem"]
    registry = widget.workflow.registered_models()
    assert registry and registry[0]["default"]
    limit = registry[0]["spread_limit"]
    assert added[0] == registry[0]["name"] + (" (default)" if limit == 1.0 else
                                              f" (default, appearance spread up to {limit:g})")
    assert len(added) == len(registry)
    widget.onRegisteredModelSelected(added[0])
    assert widget._parameterNode.model == registry[0]["name"]
    from MedSynthLib.synthesis.appearance import spread_limit
    from MedSynthLib.synthesis.models import resolve_model

    for entry in registry:  # read from the config as text, as the checked model card reads it
        model = resolve_model(entry["name"])
        styled = model.kind == "synthesis" and model.network.has_style
        assert entry["spread_limit"] == (spread_limit(model) if styled else None), entry


def _register_wide_and_plain(tmp_path, monkeypatch):
    """A registry of two styled models in ``tmp_path``: "wide" (the default, spread limit 1.5) and "plain" (no
    declared limit). Returns the source model folder."""
    import json

    from MedSynthLib.synthesis.appearance import AppearancePrior
    from MedSynthLib.synthesis.models import register_model
    from test_synthesis_seed import STYLED, _model

    source = _model(tmp_path / "styled", STYLED)
    config = json.loads((source / "config.json").read_text())
    prior = AppearancePrior((0.0,) * STYLED.style_dim, tuple(tuple(float(i == j) for j in range(STYLED.style_dim))
                                                            for i in range(STYLED.style_dim)), 10, 0)
    config["appearance"] = prior.to_json()
    rewrite_model_config(source, config)
    monkeypatch.setenv("MEDSYNTH_MODELS", str(tmp_path / "registry"))
    register_model(source, "wide", make_default=True, spread_limit=1.5)
    register_model(source, "plain")
    return source


def test_the_model_list_names_a_declared_appearance_spread_limit(module, tmp_path, monkeypatch, no_shipped_models):
    _register_wide_and_plain(tmp_path, monkeypatch)
    widget = _widget(module)
    widget.initializeParameterNode()
    widget._fillModelList()
    added = [args[0] for name, args in widget.ui.registeredModelsListWidget.calls if name == "addItem"]
    assert added == ["wide (default, appearance spread up to 1.5)", "plain"]
    assert [e["spread_limit"] for e in widget.workflow.registered_models()] == [1.5, 1.0]


def test_the_spread_spin_box_offers_only_what_the_chosen_model_accepts(module, tmp_path, monkeypatch):
    """The spin box went to 2 whatever the model, and Generate then refused a spread the panel had offered; now its
    maximum is the chosen model's limit, and a spread past a newly chosen model's limit is lowered to it."""
    source = _register_wide_and_plain(tmp_path, monkeypatch)
    workflow = module.MedSynthLogic().workflow
    assert workflow.appearance_spread_limit("") == 1.5  # the registry's default synthesis model
    assert workflow.appearance_spread_limit("plain") == 1.0
    assert workflow.appearance_spread_limit(str(source)) == 1.0  # a folder typed in: its own config
    assert workflow.appearance_spread_limit("no-such-model") is None  # the synthesis will say what is wrong

    widget = _widget(module)
    widget.initializeParameterNode()
    widget._fillModelList()
    p = widget._parameterNode
    spin = widget.ui.appearanceSpreadSpinBox
    p.appearanceSpread = 1.4
    assert spin.maximum == 1.5 and p.appearanceSpread == 1.4  # the default model accepts it
    assert "1.5" in spin.toolTip
    widget.onRegisteredModelSelected("plain")
    assert p.model == "plain"
    assert spin.maximum == 1.0 and p.appearanceSpread == 1.0
    assert any("lowered to 1" in line for line in _logged(widget)), _logged(widget)
    widget.onRegisteredModelSelected("wide (default, appearance spread up to 1.5)")
    assert spin.maximum == 1.5 and p.appearanceSpread == 1.0  # widening the range keeps the user's setting
    p.model = "no-such-model"
    assert spin.maximum == module.APPEARANCE_SPREAD_RANGE[1]  # unknown here: the range any model may declare


def test_advanced_settings_are_collapsed_in_the_ui_file():
    import xml.etree.ElementTree as ET

    root = ET.parse(MODULE_DIR / "Resources" / "UI" / "MedSynth.ui").getroot()
    advanced = next(w for w in root.iter("widget") if w.get("name") == "advancedCollapsibleButton")
    collapsed = {p.get("name"): p.findtext("bool") for p in advanced.findall("property")}.get("collapsed")
    assert collapsed == "true"
    inside = {w.get("name") for w in advanced.iter("widget")}
    assert {"precisionComboBox", "synthesisSeedSpinBox", "modelLineEdit"} <= inside
    assert any(w.get("class") == "QListWidget" and w.get("name") == "registeredModelsListWidget"
               for w in root.iter("widget"))


def test_template_in_one_click_through_the_handlers(module):
    widget = _widget(module)
    widget._dependenciesReady = True
    widget.initializeParameterNode()
    widget.onTemplate()
    p = widget._parameterNode
    assert not module.messages.errors, module.messages.errors
    assert p.t1Volume is not None and p.tumourInput is None and p.t1ceVolume is None
    widget.onPrepare()
    assert not module.messages.errors, module.messages.errors
    assert mrml.segment_names(p.labelSegmentation) == ["CSF", "GM", "WM", "NCR", "ED", "ET"]
    assert widget.ui.randomTumourButton.enabled and not widget.ui.exportButton.enabled
    p.synthesisSeed, p.appearanceSpread = 4, 0.5
    options = widget._options()
    assert (options.seed, options.appearance_spread) == (4, 0.5)
    assert options.worker_params()["appearance_spread"] == 0.5
    # mirror averaging: on by default, as on the command line; off remakes a `--no-mirror-average` case
    assert p.mirrorAverage is True and options.mirror_average is True
    p.mirrorAverage = False
    assert widget._options().worker_params()["mirror_average"] is False


def test_the_label_selector_offers_only_medsynth_label_maps(module, monkeypatch):
    """The selector listed every segmentation in the scene (the handles' moving copy, a tumour input, any other).
    setup() now filters it on the role MedSynth gives its label maps, the rule of mrml.is_label_segmentation."""
    widget = _set_up_widget(module, monkeypatch)
    try:
        filters = [args for name, args in widget.ui.labelsSelector.calls if name == "addAttribute"]
        assert filters == [("vtkMRMLSegmentationNode", mrml.ROLE_ATTRIBUTE, mrml.ROLE_LABELS)]
        assert not any(name == "addAttribute" for name, _ in widget.ui.tumourSelector.calls)  # any tumour input
        widget._dependenciesReady = True
        widget.onTemplate()
        widget.onPrepare()
        widget._parameterNode.randomSeed = 2
        widget.onRandomTumour()
        widget.onMoveTumour()  # the handles' moving copy is a segmentation too
        assert not module.messages.errors, module.messages.errors
        seg = widget._parameterNode.labelSegmentation
        by_hand = module.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn by hand")
        segmentations = mrml.nodes_by_class(module.scene, "vtkMRMLSegmentationNode")
        assert len(segmentations) == 3

        def shown(node) -> bool:  # what qMRMLNodeComboBox shows with the filter setup() gave it
            (node_type, attribute, value), = filters
            return node.IsA(node_type) and node.GetAttribute(attribute) == value

        assert [n for n in segmentations if shown(n)] == [seg]
        assert [mrml.is_label_segmentation(n) for n in segmentations] == [shown(n) for n in segmentations]
        assert not mrml.is_label_segmentation(by_hand)
    finally:
        widget.cleanup()


def test_closing_the_scene_forgets_the_edits_and_resets_the_panel(module):
    """The closed scene's undo steps and preview were kept by node ID, and slicer-core reuses IDs."""
    widget = _widget(module)
    widget._dependenciesReady = True
    widget.initializeParameterNode()
    widget.onTemplate()
    widget.onPrepare()
    seg = widget._parameterNode.labelSegmentation
    widget.onRandomTumour()
    assert not module.messages.errors, module.messages.errors
    assert widget.workflow.can_undo(seg)
    widget.onSceneStartClose(None, None)
    assert widget.workflow._undo == {} and widget.workflow._committed == {} and widget._previewJob is None
    assert ("setValue", (0,)) in widget.ui.progressBar.calls


def test_the_end_of_a_synthesis_keeps_polling_a_running_export_and_preview(module):
    """Ending Generate stopped the timer, so an export queued behind it was never finished in the panel."""
    widget = _widget(module)
    running = types.SimpleNamespace(poll=lambda: True, is_running=lambda: True)
    for pending in ("_exportJob", "_previewJob"):
        widget._timer.start()
        widget._job, widget._exportJob, widget._previewJob = running, None, None
        setattr(widget, pending, running)
        widget._endJobUi()
        assert widget._job is None and widget._timer.active, pending
    widget._exportJob = widget._previewJob = None
    widget._job = running
    widget._endJobUi()
    assert not widget._timer.active


def test_unexpected_errors_of_handlers_and_finished_jobs_are_one_message(module, monkeypatch):
    """Lock anatomy called the logic outside the error display, and a finished job's unexpected error escaped
    the timer slot as a traceback with no message."""
    widget = _widget(module)
    widget._dependenciesReady = True
    widget.initializeParameterNode()
    widget.onTemplate()
    widget.onPrepare()

    def broken(*args, **kwargs):
        raise RuntimeError("the scene refused the node")

    monkeypatch.setattr(widget.workflow, "set_anatomy_locked", broken)
    widget.onLockAnatomy(False)
    assert len(module.messages.errors) == 1 and "the scene refused the node" in module.messages.errors[0]
    monkeypatch.setattr(widget.workflow, "finish_generate", broken)
    widget._job = types.SimpleNamespace(poll=lambda: False, is_running=lambda: False)
    widget._onPoll()
    assert len(module.messages.errors) == 2 and "RuntimeError: the scene refused the node" in module.messages.errors[1]
    monkeypatch.setattr(widget.workflow, "finish_preview", broken)
    widget._previewJob = types.SimpleNamespace(poll=lambda: False, is_running=lambda: False)
    widget._onPoll()
    assert len(module.messages.errors) == 3 and widget._previewJob is None


@pytest.mark.realdata
def test_handlers_drive_a_real_case_without_the_gui(module, brats_cases, real_data):
    """Load -> prepare -> random tumour -> undo -> insert a plain expert segmentation, through the handlers."""
    widget = _widget(module)
    widget._dependenciesReady = True  # packages are installed in this environment (Slicer would pip_ensure)
    widget.initializeParameterNode()
    p = widget._parameterNode

    widget.onLoadCase()  # no folder chosen: one clear message, nothing loaded
    assert module.messages.errors == ["MedSynth: choose a case folder first."]
    module.messages.errors.clear()

    p.caseFolder = brats_cases[0]
    widget.onLoadCase()
    assert not module.messages.errors
    assert p.t1Volume is not None and p.tumourInput is not None and p.tumourInput.IsA("vtkMRMLLabelMapVolumeNode")
    assert p.labelConvention == "brats2021"

    widget.onPrepare()
    assert not module.messages.errors, module.messages.errors
    seg = p.labelSegmentation
    assert seg is not None and mrml.segment_names(seg) == ["CSF", "GM", "WM", "NCR", "ED", "ET"]
    # the point list is created now that the tumour tools need it, and given to the place widget
    assert p.tumourCentre is not None
    assert ("setCurrentNode", (p.tumourCentre,)) in widget.ui.tumourCentrePlaceWidget.calls
    assert widget.ui.moveTumourButton.enabled and widget.ui.applyButton.enabled
    assert not widget.ui.undoButton.enabled

    widget.onAddTumour()  # no point placed yet
    assert module.messages.errors and "click a point" in module.messages.errors[-1]
    module.messages.errors.clear()

    before = widget.workflow.labelmap(seg).array.copy()
    p.randomSeed = 5
    widget.onRandomTumour()
    assert not module.messages.errors, module.messages.errors
    assert widget.ui.undoButton.enabled
    assert not np.array_equal(widget.workflow.labelmap(seg).array, before)
    widget.onUndo()
    np.testing.assert_array_equal(widget.workflow.labelmap(seg).array, before)

    # "Tumour from": a plain BraTS expert segmentation (labels 0/1/2/4, no sidecar, no images)
    seg_file = sorted((real_data / "brats2021" / "seg_only").glob("*_seg.nii.gz"))[0]
    p.insertSource = seg_file
    p.insertAtPoint = False
    assert p.insertLabelConvention == "detect"  # the file's convention, read from the file
    p.insertLabelConvention = "brats2023"  # named wrong (its 4 is not BraTS 2023's): refused, the map untouched
    widget.onInsertTumour()
    assert module.messages.errors and "'Its tumour labels'" in module.messages.errors[-1], module.messages.errors
    np.testing.assert_array_equal(widget.workflow.labelmap(seg).array, before)
    module.messages.errors.clear()
    p.insertLabelConvention = "detect"
    widget.onInsertTumour()
    assert not module.messages.errors, module.messages.errors
    inserted = widget.workflow.labelmap(seg)
    assert inserted.history[-1]["name"] == "insert_tumour"
    import SimpleITK as sitk

    expert = sitk.GetArrayFromImage(sitk.ReadImage(str(seg_file)))
    overlap = np.count_nonzero((inserted.array >= 4) & (expert > 0)) / np.count_nonzero(expert > 0)
    assert overlap > 0.9  # same SRI24 grid: placed where the expert drew it (inside this brain)

    # back from the Segment Editor with half of the locked grey matter erased: refused at once, undone
    import time

    import vtk
    from vtkmodules.util import numpy_support

    current = widget.workflow.labelmap(seg).array
    gm = current == 2
    erased = gm.copy()
    erased[: gm.shape[0] // 2] = False
    reference = p.t1Volume
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(reference.GetImageData().GetDimensions())
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    image.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(mrml.ijk_to_ras(reference)))
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = erased.astype(np.uint8).ravel()
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image, seg, "GM", slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    started = time.perf_counter()
    widget.exit()
    widget.enter()
    print(f"enter() with a Segment Editor change: {time.perf_counter() - started:.2f} s")
    assert len(module.messages.errors) == 1 and "locked anatomy segments (GM)" in module.messages.errors[0]
    assert "refused and undone" in module.messages.errors[0]
    module.messages.errors.clear()
    np.testing.assert_array_equal(widget.workflow.labelmap(seg).array, current)
    widget.enter()  # nothing changed since: nothing to say
    assert not module.messages.errors

    # move the tumour with the handles: Apply records it as edits, Cancel leaves the label map
    widget.onMoveTumour()
    assert not module.messages.errors, module.messages.errors
    assert widget.ui.applyTransformButton.enabled and not widget.ui.moveTumourButton.enabled
    transform = module.scene.GetNodeByID(seg.GetAttribute("MedSynth.TransformNodeID"))
    matrix = np.eye(4)
    matrix[:3, 3] = (6.0, 0.0, 0.0)
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    widget.onApplyTransform()
    assert not module.messages.errors, module.messages.errors
    assert widget.workflow.labelmap(seg).history[-1]["name"] == "translate"
    assert not widget.ui.applyTransformButton.enabled and widget.ui.moveTumourButton.enabled
    moved = widget.workflow.labelmap(seg).array.copy()
    widget.onMoveTumour()
    widget.onCancelTransform()
    np.testing.assert_array_equal(widget.workflow.labelmap(seg).array, moved)
    assert seg.GetAttribute("MedSynth.TransformNodeID") is None

    # a point placed: the parametric tumour goes there
    ras = mrml.ijk_to_ras(p.t1Volume) @ np.append(np.argwhere(inserted.array == 3).mean(axis=0)[::-1], 1.0)
    p.tumourCentre.AddControlPointWorld(*ras[:3])
    widget.onAddTumour()
    assert not module.messages.errors, module.messages.errors
    assert widget.workflow.labelmap(seg).history[-1]["name"] == "parametric_tumour"


# =================================================================================================
# Messages shown to the user
# =================================================================================================


def _message_literals(path: Path) -> list[tuple[int, str]]:
    """String pieces of every WorkflowError(...) / *Display(...) / _(...) call in a file."""
    import ast

    shown = {"WorkflowError", "CancelledError", "errorDisplay", "warningDisplay", "infoDisplay", "_"}
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in shown:
                for arg in node.args:
                    for piece in ast.walk(arg):
                        if isinstance(piece, ast.Constant) and isinstance(piece.value, str):
                            out.append((node.lineno, piece.value))
    return out


def test_gui_messages_carry_no_command_line_hints():
    files = [MODULE_DIR / "MedSynth.py", *sorted((MODULE_DIR / "MedSynthSlicerLib").glob("*.py"))]
    literals = [(path.name, line, text) for path in files for line, text in _message_literals(path)]
    assert len(literals) > 50
    offending = [f"{name}:{line}: {text}" for name, line, text in literals
                 if re.search(r"(?<![\w-])--[a-z]|command.line", text, re.IGNORECASE)
                 or re.search(r"\bmedsynth [a-z]", text)]  # the program name in lower case: a command
    assert not offending, "\n".join(offending)


@pytest.mark.parametrize("backend, expected", [
    ("a_t2.nii.gz: grid differs from a_t1.nii.gz: spacing (1, 1, 2) (use --resample to resample)",
     "a_t2.nii.gz: grid differs from a_t1.nii.gz: spacing (1, 1, 2) (resample it onto the T1 first)"),
    ("seg.nii.gz: label values [3] are not defined (choose another with --label-convention)",
     "seg.nii.gz: label values [3] are not defined (choose another 'Tumour labels' convention)"),
    ("case: ambiguous case naming: fits brats2021, msd (choose with --convention)",
     "case: ambiguous case naming: fits brats2021, msd (rename the files to one naming)"),
    ("medsynth: out.nii.gz exists (see --help)", "medsynth: out.nii.gz exists"),
    ("a (plain) note stays", "a (plain) note stays"),
])
def test_backend_messages_lose_their_command_line_hints(backend, expected):
    assert str(WorkflowError(backend)) == expected


# =================================================================================================
# Generate -> review -> rate -> export through the handlers
# =================================================================================================


class FakeLayoutManager:
    """The application's layout manager: ``setLayout`` creates the layout's slice views as Slicer does
    (a slice node of the view's size, a composite node and a ``vtkMRMLSliceLogic`` per view)."""

    def __init__(self, scene) -> None:
        self.scene = scene
        self.layout_node = scene.AddNewNodeByClass("vtkMRMLLayoutNode")
        self.views: dict[str, types.SimpleNamespace] = {}

    def layoutLogic(self):
        return types.SimpleNamespace(GetLayoutNode=lambda: self.layout_node)

    def setLayout(self, layout_id: int) -> None:
        import xml.etree.ElementTree as ET

        self.layout = layout_id
        for view in ET.fromstring(self.layout_node.GetLayoutDescription(layout_id)).iter("view"):
            name = view.get("singletontag")
            if name in self.views:
                continue
            slice_node = self.scene.AddNewNodeByClass("vtkMRMLSliceNode")
            slice_node.SetLayoutName(name)
            slice_node.SetDimensions(400, 300, 1)
            composite = self.scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
            composite.SetLayoutName(name)
            logic = slicer.vtkMRMLSliceLogic()
            logic.SetMRMLScene(self.scene)
            logic.SetSliceNode(slice_node)
            self.views[name] = types.SimpleNamespace(sliceLogic=lambda logic=logic: logic,
                                                     mrmlSliceNode=lambda node=slice_node: node,
                                                     composite=composite)

    def sliceWidget(self, name: str):
        return self.views.get(name)


@pytest.mark.realdata
def test_generate_review_and_export_through_the_handlers(module, brats_cases, tmp_path, monkeypatch):
    import time

    from MedSynthLib.synthesis.models import write_model
    from MedSynthLib.synthesis.networks import Generator, NetworkConfig
    from MedSynthSlicerLib import environment
    from MedSynthSlicerLib.logic import REVIEW_LAYOUT_ID, REVIEW_VIEWS

    config = NetworkConfig(channels=(4, 8), strides=(2,), disc_channels=4, disc_layers=2)
    model = tmp_path / "tiny"
    write_model(model, Generator(config).state_dict(),
                {"name": "tiny", "network": config.to_json(),
                 "intensity": {m: {"low": 0.0, "high": 1000.0} for m in ("t1", "t1ce", "t2", "flair")}})
    layout_manager = FakeLayoutManager(module.scene)
    monkeypatch.setattr(slicer.app, "layoutManager", lambda: layout_manager)
    import torch

    monkeypatch.setattr(environment, "ensure_torch", lambda confirm: torch.__version__)  # the PyTorch extension

    widget = _widget(module)
    widget._dependenciesReady = True
    widget.initializeParameterNode()
    p = widget._parameterNode
    p.caseFolder = brats_cases[0]
    widget.onLoadCase()
    widget.onPrepare()
    assert not module.messages.errors, module.messages.errors
    p.model, p.device, p.synthesisSeed = str(model), module.Device.CPU, 7

    widget.onApplyButton()  # detects the devices (torch in a subprocess), then starts the synthesis
    assert not module.messages.errors, module.messages.errors
    assert widget._job is not None and widget._timer.active
    assert widget.ui.applyButton.text == "Cancel" and not widget.ui.previewButton.enabled
    deadline = time.monotonic() + 300
    while widget._job is not None and time.monotonic() < deadline:
        widget._onPoll()
        time.sleep(0.2)
    assert widget._job is None and not module.messages.errors, module.messages.errors
    assert sorted(widget._outputs) == ["flair", "t1", "t1ce", "t2"]
    assert widget.ui.applyButton.text == "Generate" and widget.ui.exportButton.enabled
    # the review layout is shown, every view on its synthetic volume and fitted to it
    assert layout_manager.layout == REVIEW_LAYOUT_ID
    for modality, name in REVIEW_VIEWS.items():
        view = layout_manager.views[name]
        assert view.composite.GetBackgroundVolumeID() == widget._outputs[modality].GetID()
        bounds = [0.0] * 6
        widget._outputs[modality].GetRASBounds(bounds)
        assert view.mrmlSliceNode().GetSliceOffset() == pytest.approx((bounds[4] + bounds[5]) / 2, abs=1.0)

    p.rating, p.reviewNote = 4, "rim plausible"
    widget.onSaveReview()
    assert not module.messages.errors, module.messages.errors
    p.exportFolder, p.exportFormat = tmp_path / "export", "nifti"
    widget.onExport()
    deadline = time.monotonic() + 300
    while widget._exportJob is not None and time.monotonic() < deadline:
        widget._onPoll()
        time.sleep(0.2)
    assert not module.messages.errors, module.messages.errors
    assert module.messages.infos and module.messages.infos[-1].startswith("MedSynth: exported to")
    exported = Path(module.messages.infos[-1].splitlines()[1])
    import json

    assert json.loads((exported / "provenance.json").read_text())["review"]["rating"] == 4

    # preview in the background: the handler returns at once, the timer brings the result
    widget.onPreview()
    assert widget._previewJob is not None and widget._timer.active
    assert widget.ui.previewButton.text == "Stop preview"
    deadline = time.monotonic() + 300
    while widget._previewJob is not None and time.monotonic() < deadline:
        widget._onPoll()
        time.sleep(0.05)
    assert not module.messages.errors, module.messages.errors
    previews = dict(widget._outputs)
    assert sorted(previews) == ["flair", "t1", "t1ce", "t2"]
    assert all(node.GetAttribute("MedSynth.Role") == "preview" for node in previews.values())
    from MedSynthSlicerLib import mrml

    before = mrml.array_from_volume(previews["t1"])
    # an edit refreshes the shown preview by itself, in the same volumes
    p.randomSeed = 11
    widget.onRandomTumour()
    assert widget._previewJob is not None
    while widget._previewJob is not None and time.monotonic() < deadline:
        widget._onPoll()
        time.sleep(0.05)
    assert not module.messages.errors, module.messages.errors
    assert widget._outputs == previews and widget.workflow.last_preview["full"] is False
    assert not np.array_equal(mrml.array_from_volume(previews["t1"]), before)
    widget.onSaveReview()  # a preview is not a saved case
    assert module.messages.errors and "Generate" in module.messages.errors[-1]
    widget.workflow.cleanup()
    for view in layout_manager.views.values():
        view.sliceLogic().SetMRMLScene(None)


# =================================================================================================
# A real case: keep the patient's images (inpainting) or a whole synthetic case, one choice apart
# =================================================================================================


class RecordingWorker:
    """The worker client as the Logic sees it; records each request instead of running it."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict]] = []
        self.pid = 4242

    def alive(self) -> bool:
        return True

    def submit(self, op, params=None, arrays=None):
        from MedSynthSlicerLib.signals import Signal

        self.requests.append((op, dict(params or {})))
        return types.SimpleNamespace(id=len(self.requests), pid=self.pid, progress=Signal("float", "str"),
                                     is_running=lambda: False, poll=lambda: False, status="running")


def _phantom_real_case(module, phantom_brats, monkeypatch):
    """The widget with a real (phantom) case loaded and prepared through its handlers (threshold anatomy)."""
    import MedSynthLib.cases.anatomy as anatomy
    from test_inpainting import _derive_by_threshold

    monkeypatch.setattr(anatomy, "derive_label_map", _derive_by_threshold)
    widget = _widget(module)
    widget._dependenciesReady = True
    widget.initializeParameterNode()
    p = widget._parameterNode
    p.caseFolder = phantom_brats / "BraTS2021_00000"
    widget.onLoadCase()
    widget.onPrepare()
    assert not module.messages.errors, module.messages.errors
    return widget, p


def test_the_real_case_choice_reaches_the_worker_and_whole_synthesis_is_one_choice_away(module, phantom_brats,
                                                                                       monkeypatch):
    from MedSynthSlicerLib import environment

    widget = _widget(module)
    widget._dependenciesReady = True
    widget.initializeParameterNode()
    widget.onTemplate()  # not a real case: the choice is disabled and says why
    assert not widget.ui.generateModeComboBox.enabled
    assert "Only for a case loaded from a folder" in widget.ui.generateModeComboBox.toolTip

    widget, p = _phantom_real_case(module, phantom_brats, monkeypatch)
    assert p.generateMode == module.GenerateMode.INPAINT  # the default for a real case
    assert widget.ui.generateModeComboBox.enabled and "not anonymous" in widget.ui.generateModeComboBox.toolTip
    assert widget.ui.inpaintingModelLineEdit.enabled
    assert module.GenerateMode.INPAINT.label().startswith("Keep the patient's images")
    assert module.GenerateMode.WHOLE.label().startswith("Whole synthetic case")

    recorder = RecordingWorker()
    monkeypatch.setattr(widget.workflow, "worker", lambda: recorder)
    monkeypatch.setattr(environment, "ensure_torch", lambda confirm: "test")
    monkeypatch.setattr(widget, "onDetectDevices", lambda: None)
    p.inpaintingModel = "an-inpainting-model"
    widget.onApplyButton()
    widget.onPreview()
    assert not module.messages.errors, module.messages.errors
    case = str(phantom_brats / "BraTS2021_00000")
    (op1, generate), (op2, preview) = recorder.requests
    assert (op1, op2) == ("generate", "preview")
    for params in (generate, preview):  # Generate and the preview take the same path
        assert params["context"] == case and params["inpainting_model"] == "an-inpainting-model"

    p.generateMode = module.GenerateMode.WHOLE  # one choice: a whole synthetic case (all images synthetic)
    assert not widget.ui.inpaintingModelLineEdit.enabled
    widget._previewJob = None
    widget.onApplyButton()
    widget.onPreview()
    assert not module.messages.errors, module.messages.errors
    (op3, generate), (op4, preview) = recorder.requests[2:]
    assert (op3, op4) == ("generate", "preview")
    assert "context" not in generate and "context" not in preview
    assert preview["reset"]  # another kind of preview: the worker starts it over, whole


def test_registered_inpainting_models_are_listed_and_chosen(module):
    widget = _widget(module)
    widget.initializeParameterNode()
    widget._fillModelList()
    registry = widget.workflow.registered_models()
    inpainting = [e["name"] for e in registry if e["kind"] == "inpainting"]
    if not inpainting:
        pytest.skip("no inpainting model is registered in Resources/models")
    added = [args[0] for name, args in widget.ui.registeredModelsListWidget.calls if name == "addItem"]
    label = next(text for text in added if text.startswith(inpainting[0] + " "))
    assert "inpainting" in label
    model_before = widget._parameterNode.model
    widget.onRegisteredModelSelected(label)  # an inpainting model sets the inpainting model, not the model
    assert widget._parameterNode.inpaintingModel == inpainting[0] and widget._parameterNode.model == model_before
    widget._parameterNode.inpaintingModel = ""
    widget._chooseInpaintingModel()  # no default inpainting model: a registered one is chosen and said
    defaults = [e for e in registry if e["kind"] == "inpainting" and e["default"]]
    assert widget._parameterNode.inpaintingModel == ("" if defaults else inpainting[0])


def test_the_fast_preview_of_a_real_case_keeps_its_images_outside_the_region(module, phantom_brats, tmp_path,
                                                                            monkeypatch):
    """Through the handlers and the real worker (a tiny random-weight inpainting model): the preview volumes are
    the loaded case's own images, and after a move they differ from them only in the inpainted region."""
    import time

    from MedSynthLib.edits import Translate
    from MedSynthLib.synthesis.inpainting import DEFAULT_MARGIN_MM, changed_region
    from MedSynthSlicerLib import environment
    from test_inpainting import write_tiny_inpainting_model

    monkeypatch.setattr(environment, "ensure_torch", lambda confirm: "test")
    layout_manager = FakeLayoutManager(module.scene)
    monkeypatch.setattr(slicer.app, "layoutManager", lambda: layout_manager)
    widget, p = _phantom_real_case(module, phantom_brats, monkeypatch)
    p.inpaintingModel = str(write_tiny_inpainting_model(tmp_path / "tiny-inpainting"))
    p.device = module.Device.CPU
    real = {m: mrml.array_from_volume(getattr(p, f"{m}Volume")).astype(np.float32) for m in ("t1", "t1ce", "t2",
                                                                                                 "flair")}

    def wait():
        deadline = time.monotonic() + 300
        while widget._previewJob is not None and time.monotonic() < deadline:
            widget._onPoll()
            time.sleep(0.05)
        assert widget._previewJob is None and not module.messages.errors, module.messages.errors

    try:
        widget.onPreview()
        wait()
        previews = dict(widget._outputs)
        assert widget.workflow.last_preview["renderer"] == "inpainting"
        for m, image in real.items():  # unedited: the patient's images
            assert np.array_equal(mrml.array_from_volume(previews[m]), image)
        seg = p.labelSegmentation
        original = widget.workflow.labelmap(seg)
        widget.workflow.apply_edit(seg, Translate((0.0, 4.0, 0.0)))
        widget.previewAfterEdit()
        wait()
        assert widget._outputs == previews and widget.workflow.last_preview["full"] is False
        moved = widget.workflow.labelmap(seg)
        case_tumour = original.array >= 4
        region = changed_region(moved.array, case_tumour, DEFAULT_MARGIN_MM, tuple(moved.grid.spacing[::-1]))
        changed = False
        for m, image in real.items():
            after = mrml.array_from_volume(previews[m])
            assert np.array_equal(after[~region], image[~region])
            changed |= bool((after[region] != image[region]).any())
        assert changed
    finally:
        widget.workflow.cleanup()
        for view in layout_manager.views.values():
            view.sliceLogic().SetMRMLScene(None)
