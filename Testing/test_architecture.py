"""The package layout of MedSynthLib, checked from its source with ``ast`` (nothing is imported).

* no import cycle between MedSynthLib's modules, counting imports inside functions too
  (a cycle through a deferred import still couples the two modules), nor between its subpackages;
* MedSynthLib never imports the Slicer application stack (``slicer``, ``qt``, ``ctk``, ``vtk``):
  the backend runs in a plain Python process and the Slicer module is a thin skin over it;
* every module lives in a subpackage; only ``__init__``, ``__main__`` and ``cli`` stay at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "MedSynthLib"
PACKAGE = LIB.name

#: Top-level names MedSynthLib must never import.  vtk is included: nothing in the backend needs it
#: (it is a dependency of the Slicer libraries, not of MedSynthLib).
FORBIDDEN_TOP_LEVEL = {"slicer", "qt", "ctk", "vtk", "PythonQt", "mrml"}
#: The only module files allowed directly in MedSynthLib/.
TOP_LEVEL_MODULES = {"__init__", "__main__", "cli"}


def module_name(path: Path) -> str:
    """Dotted name of a source file of MedSynthLib (a package's ``__init__.py`` is the package)."""
    parts = list(path.relative_to(LIB.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def lib_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(LIB.rglob("*.py"))}


def resolve_from(importer: str, is_package: bool, level: int, module: str | None) -> str:
    """Absolute module named by ``from <level dots><module> import ...`` inside ``importer``."""
    if level == 0:
        return module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(path: Path, name: str, known: set[str]) -> tuple[set[str], set[str]]:
    """(MedSynthLib modules imported, top-level names of every import) anywhere in one file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    internal: set[str] = set()
    top_level: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top_level.add(alias.name.split(".")[0])
                if alias.name in known:
                    internal.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            target = resolve_from(name, is_package, node.level, node.module)
            top_level.add(target.split(".")[0])
            for alias in node.names:
                # `from . import train` imports a module; `from .grid import Grid` a name of one.
                child = f"{target}.{alias.name}"
                internal.add(child if child in known else target)
    return {m for m in internal if m in known and m != name}, top_level


def import_graph() -> dict[str, set[str]]:
    modules = lib_modules()
    known = set(modules)
    return {name: imports_of(path, name, known)[0] for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (or a node importing itself).

    Tarjan's algorithm, iterative so a deep graph cannot exhaust the recursion limit.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    components.append(sorted(component))
    return sorted(components)


# --- the checker itself ---------------------------------------------------------------------------


def test_find_cycles_on_small_graphs():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}}) == [["a", "b", "c"], ["d"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) == []  # a diamond is no cycle


@pytest.mark.parametrize("importer, is_package, level, module, expected", [
    ("MedSynthLib.study.run", False, 1, "data", "MedSynthLib.study.data"),
    ("MedSynthLib.study.run", False, 2, "schema.grid", "MedSynthLib.schema.grid"),
    ("MedSynthLib.study.run", False, 2, None, "MedSynthLib"),
    ("MedSynthLib.edits", True, 1, "transforms", "MedSynthLib.edits.transforms"),
    ("MedSynthLib.cli", False, 1, "schema.errors", "MedSynthLib.schema.errors"),
    ("MedSynthLib.cli", False, 0, "numpy", "numpy"),
])
def test_relative_imports_resolve(importer, is_package, level, module, expected):
    assert resolve_from(importer, is_package, level, module) == expected


def test_graph_sees_deferred_and_module_imports(tmp_path):
    # A cycle made only by an import inside a function, and `from . import x`, are both edges.
    (tmp_path / "a.py").write_text("def f():\n    from . import b\n")
    (tmp_path / "b.py").write_text("from .a import f\n")
    known = {"pkg.a", "pkg.b"}
    graph = {"pkg.a": imports_of(tmp_path / "a.py", "pkg.a", known)[0],
             "pkg.b": imports_of(tmp_path / "b.py", "pkg.b", known)[0]}
    assert graph == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}}
    assert find_cycles(graph) == [["pkg.a", "pkg.b"]]


# --- the package --------------------------------------------------------------------------------


def test_the_graph_is_the_package():
    graph = import_graph()
    # Sanity: the parser found the package and real edges (a silent empty graph would pass everything).
    assert {"MedSynthLib.cli", "MedSynthLib.schema.labels", "MedSynthLib.edits.transforms"} <= set(graph)
    assert "MedSynthLib.schema.labels" in graph["MedSynthLib.schema.grid"]
    assert "MedSynthLib.training.train" in graph["MedSynthLib.study.run"]  # `from ..training import train`


def test_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert cycles == [], "import cycles in MedSynthLib: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_import_cycle_between_subpackages():
    # The layering the layout stands for (schema at the bottom; cli at the top): the subpackages
    # themselves depend on each other in one direction only.
    def subpackage(module: str) -> str:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else parts[0]

    graph: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        graph.setdefault(subpackage(module), set()).update(
            subpackage(t) for t in targets if subpackage(t) != subpackage(module))
    cycles = find_cycles(graph)
    assert cycles == [], "subpackages importing each other: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_slicer_stack_import():
    modules = lib_modules()
    offenders = {}
    for name, path in modules.items():
        found = imports_of(path, name, set(modules))[1] & FORBIDDEN_TOP_LEVEL
        if found:
            offenders[name] = sorted(found)
    assert offenders == {}, f"MedSynthLib imports the Slicer stack: {offenders}"


def test_modules_live_in_subpackages():
    stray = sorted(path.stem for path in LIB.glob("*.py") if path.stem not in TOP_LEVEL_MODULES)
    assert stray == [], f"modules directly in MedSynthLib/ (move them into a subpackage): {stray}"
    for folder in sorted(p for p in LIB.iterdir() if p.is_dir() and p.name != "__pycache__"):
        assert (folder / "__init__.py").is_file(), f"{folder.name}/ has no __init__.py (not installed as a package)"
