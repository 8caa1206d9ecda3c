"""The package layout of MedSynthLib, checked from its source with ``ast`` (nothing is imported).

* no import cycle between MedSynthLib's modules, counting imports inside functions too
  (a cycle through a deferred import still couples the two modules), nor between its subpackages;
* MedSynthLib never imports the Slicer application stack (``slicer``, ``qt``, ``ctk``, ``vtk``):
  the backend runs in a plain Python process and the Slicer module is a thin skin over it;
* every module lives in a subpackage; only ``__init__``, ``__main__`` and ``cli`` stay at the top;
* the README's architecture section and docs/architecture.md (the map) match the code: every file
  they name exists, the map names every module of MedSynthLib and of the Slicer module, and the
  README's table has one row per subpackage listing exactly its modules.
"""

from __future__ import annotations

import ast
import re
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


# --- the README's architecture section and docs/architecture.md name the modules that exist -------------

REPO = LIB.parent
SLICER_LIB = REPO / "MedSynth" / "MedSynthSlicerLib"
#: Where a file named in the map may live (a name is read relative to each in turn).
DOC_ROOTS = (LIB, REPO, REPO / "MedSynth", SLICER_LIB, REPO / "MedSynthWeb")


def readme_architecture() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("\n## Architecture\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def subpackages() -> dict[str, list[str]]:
    """Subpackage -> its modules (without ``__init__``)."""
    return {folder.name: sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__")
            for folder in sorted(LIB.iterdir()) if (folder / "__init__.py").is_file()}


def named_files(text: str) -> set[str]:
    """Every ``something.py`` written in backticks (with or without a folder)."""
    import re

    return {match for span in re.findall(r"`([^`]+)`", text) for match in re.findall(r"[\w./-]+\.py\b", span)}


def map_sections() -> list[tuple[set[str], set[str]]]:
    """docs/architecture.md by ``##`` section: (subpackages its heading names, files it names).

    Inside a section about a subpackage (``## 5. Images are synthesised - `synthesis/` ``) a bare
    ``models.py`` is that subpackage's module.
    """
    import re

    text = (REPO / "docs" / "architecture.md").read_text()
    sections = []
    for chunk in re.split(r"^(?=## )", text, flags=re.MULTILINE):
        heading = chunk.splitlines()[0] if chunk else ""
        packages = set(re.findall(r"`(\w+)/", heading)) if heading.startswith("## ") else set()
        sections.append((packages, named_files(chunk)))
    return sections


def resolves(name: str, packages: set[str]) -> bool:
    return any((root / name).is_file() for root in DOC_ROOTS + tuple(LIB / p for p in packages))


def test_every_file_the_map_names_exists():
    sections = map_sections()
    assert sum(len(files) for _, files in sections) > 50, "the parser found almost no file names in the map"
    missing = sorted(f for packages, files in sections for f in files if not resolves(f, packages))
    assert missing == [], f"docs/architecture.md names files that do not exist: {missing}"
    readme = named_files(readme_architecture())
    assert len(readme) > 5, "the parser found almost no file names in the README's architecture section"
    missing = sorted(f for f in readme if not resolves(f, set()))
    assert missing == [], f"the README's architecture section names files that do not exist: {missing}"


def test_the_map_names_every_module():
    intro = (REPO / "docs" / "architecture.md").read_text().split("\n## ")[0]
    listed = intro[intro.index("subpackages ("):].split(")")[0]
    assert sorted(re.findall(r"`(\w+)`", listed)) == sorted(subpackages()), "the map's list of subpackages drifted"
    named = set()
    for packages, files in map_sections():
        named |= {f for f in files if "/" in f} | {f"{p}/{f}" for p in packages for f in files if "/" not in f}
    unnamed = sorted(f"{package}/{module}.py" for package, modules in subpackages().items() for module in modules
                     if f"{package}/{module}.py" not in named)
    assert unnamed == [], f"docs/architecture.md does not name these MedSynthLib modules: {unnamed}"
    text = (REPO / "docs" / "architecture.md").read_text()
    slicer_section = named_files(text[text.index("## The Slicer module"):])
    slicer_unnamed = sorted(p.name for p in SLICER_LIB.glob("*.py") if p.stem != "__init__" and p.name not in slicer_section)
    assert slicer_unnamed == [], f"docs/architecture.md's Slicer section does not name: {slicer_unnamed}"


def test_the_readme_table_lists_every_subpackage_and_module():
    import re

    section = readme_architecture()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)/` \| (.*) \|$", section, re.MULTILINE)}
    packages = subpackages()
    assert sorted(rows) == sorted(packages), "README's architecture table lists other subpackages than MedSynthLib has"
    for package, modules in packages.items():
        named = set(re.findall(r"`([a-z_0-9]+)`", rows[package]))  # modules are lower case, classes not
        assert named - set(modules) == set(), f"README names modules {package}/ lacks: {sorted(named - set(modules))}"
        assert set(modules) - named == set(), f"README's {package}/ row omits: {sorted(set(modules) - named)}"
    slicer_modules = {p.stem for p in SLICER_LIB.glob("*.py") if p.stem != "__init__"}
    mentioned = set(re.findall(r"`(?:[\w/]+/)?(\w+)(?:\.py)?`", section[section.index("The Slicer module"):]))
    assert slicer_modules - mentioned == set(), f"README's Slicer paragraph omits: {sorted(slicer_modules - mentioned)}"
