"""The scripts under benchmarks/ and docs/ still fit the library they call (no script is run for real).

The docs cite these scripts' numbers, but no other test imports most of them, so a rename in MedSynthLib
left them broken unnoticed.  Three checks, all cheap: every name a script imports from MedSynth's
packages exists (function-local imports included, which importing the script does not reach), every call
of such a function or class binds to its signature, and each script imports and answers ``--help``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
from pathlib import Path

import pytest

from conftest import REPO, load_benchmark

PACKAGES = ("MedSynthLib", "MedSynthSlicerLib", "MedSynthWeb")
SCRIPTS = sorted(p.relative_to(REPO) for folder in ("benchmarks", "docs") for p in (REPO / folder).rglob("*.py"))
IDS = [str(p) for p in SCRIPTS]


def _module(name: str):
    if str(REPO / "MedSynth") not in sys.path:  # MedSynthSlicerLib lives in the Slicer module's folder
        sys.path.insert(0, str(REPO / "MedSynth"))
    return importlib.import_module(name)


def stale_references(source: str) -> list[str]:
    """Names a script's source takes from MedSynth's packages that are gone, and calls that no longer bind."""
    tree = ast.parse(source)
    problems, objects = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            try:
                module = _module(node.module)
            except ImportError as error:
                problems.append(f"line {node.lineno}: {node.module}: {error}")
                continue
            for alias in node.names:
                if hasattr(module, alias.name):
                    objects[alias.asname or alias.name] = getattr(module, alias.name)
                    continue
                try:
                    objects[alias.asname or alias.name] = _module(f"{node.module}.{alias.name}")
                except ImportError:
                    problems.append(f"line {node.lineno}: {node.module} has no {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    try:
                        module = _module(alias.name)
                    except ImportError as error:
                        problems.append(f"line {node.lineno}: {alias.name}: {error}")
                        continue
                    if alias.asname:
                        objects[alias.asname] = module
    for node in ast.walk(tree):
        target, label = None, None
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and inspect.ismodule(objects.get(node.value.id)):
            module = objects[node.value.id]
            if not hasattr(module, node.attr):
                try:
                    _module(f"{module.__name__}.{node.attr}")
                except ImportError:
                    problems.append(f"line {node.lineno}: {module.__name__} has no {node.attr}")
        if not isinstance(node, ast.Call):
            continue
        function = node.func
        if isinstance(function, ast.Name) and function.id in objects:
            target, label = objects[function.id], function.id
        elif isinstance(function, ast.Attribute) and isinstance(function.value, ast.Name) \
                and function.value.id in objects:
            owner = objects[function.value.id]
            if inspect.ismodule(owner) or inspect.isclass(owner):
                # a class's own attribute: a static or class method binds without an instance
                static = inspect.getattr_static(owner, function.attr, None)
                if inspect.ismodule(owner) or isinstance(static, (staticmethod, classmethod)):
                    target, label = getattr(owner, function.attr, None), f"{function.value.id}.{function.attr}"
        if target is None or not callable(target) or inspect.ismodule(target):
            continue
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            continue  # *args / **kwargs: what they hold is not known here
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):
            continue
        try:
            signature.bind(*node.args, **{k.arg: k.value for k in node.keywords})
        except TypeError as error:
            problems.append(f"line {node.lineno}: {label}{signature}: {error}")
    return problems


def test_the_check_finds_a_missing_name_and_a_call_that_does_not_bind():
    source = ("from MedSynthLib.schema.labels import tumour_mask, no_such_name\n"
              "from MedSynthLib.synthesis import models\n"
              "def f():\n"
              "    models.no_such_function()\n"
              "    tumour_mask(None, no_such_keyword=1)\n")
    problems = stale_references(source)
    assert any("no_such_name" in p for p in problems)
    assert any("no_such_function" in p for p in problems)
    assert any("tumour_mask" in p and "no_such_keyword" in p for p in problems)
    assert stale_references("from MedSynthLib.schema.labels import tumour_mask\ntumour_mask(None)\n") == []


@pytest.mark.parametrize("script", SCRIPTS, ids=IDS)
def test_names_the_script_takes_from_medsynth_exist(script):
    assert stale_references((REPO / script).read_text()) == []


def _runs_on_import(script: Path) -> bool:
    """Whether the script does its work at import (no ``if __name__ == "__main__"`` guard)."""
    tree = ast.parse((REPO / script).read_text())
    return any(isinstance(n, (ast.For, ast.While, ast.With)) or isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)
               and not (isinstance(n.value.func, ast.Attribute) and n.value.func.attr in ("insert", "append", "filterwarnings"))
               for n in tree.body)


@pytest.mark.parametrize("script", SCRIPTS, ids=IDS)
def test_the_script_imports_and_answers_help(script, monkeypatch, capsys):
    # a probe that runs at import cannot be imported by a test, and takes "--help" for a case folder
    assert not _runs_on_import(script), "the script does its work when imported: move it into main()"
    _module("MedSynthLib")  # puts the Slicer module's folder on sys.path, as slicer_render.py's callers do
    module = load_benchmark(script.stem, str(script.parent))
    main = getattr(module, "main", None)
    if main is None or "argparse" not in (REPO / script).read_text():
        return  # a helper of other scripts, or a script reading sys.argv itself: importing it is the check
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code in (0, None)
    assert "usage:" in capsys.readouterr().out


def test_bench_generate_times_its_reference_forward_in_the_runs_precision(monkeypatch):
    """The same-run reference was always a bf16 forward: on a CPU without native bf16 (torch emulates it, ~28x
    slower) a ``--settings 1:fp32`` run spent minutes timing an emulated pass no generate run used."""
    import numpy as np

    from MedSynthLib.generate import sources
    from MedSynthLib.synthesis import synthesize

    bench = load_benchmark("bench_generate")
    asked = []

    class Engine:
        def __init__(self, model, device, precision):
            asked.append(precision)
            self.synth = self

        def predict_region(self, labels, box):
            return None

    labels = np.zeros((4, 4, 4), np.uint8)
    labels[1:3, 1:3, 1:3] = 3
    monkeypatch.setattr(synthesize, "SynthesisEngine", Engine)
    monkeypatch.setattr(sources, "load_source", lambda source: type("Source", (), {"array": labels}))
    monkeypatch.setattr("MedSynthLib.synthesis.models.resolve_model", lambda name: None)
    bench.reference_forward(None, 1, "fp32")
    bench.reference_forward(None, 1, "bf16")
    assert asked == ["fp32", "bf16"]
