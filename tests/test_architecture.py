"""The import graph of the shipped packages (``operators``, ``parallel``, ``sbtrain``), read with
``ast`` (nothing is imported): no cycle between modules, and no arrow from a room to a higher one.

Every import counts, at module level or inside a function (a lazy import still ties the two
modules together). ``from pkg import name`` is an arrow to the module ``pkg.name`` when that is a
module, else to ``pkg``. Not arrows: a package's ``__init__`` importing its own submodules, and the
implicit import of a module's parent packages (Python runs ``sbtrain/__init__.py`` before any
``sbtrain.*`` module; that is why the root ``__init__`` must stay a leaf, see ``ROOT_PACKAGES``).

Layers, lowest first; a module may import its own layer or lower ones only (docs/ARCHITECTURE.md):

    0  operators
    1  parallel
    2  sbtrain.config
    3  sbtrain.models
    4  sbtrain.data, sbtrain.spike, sbtrain.plan, sbtrain.convert
    5  sbtrain.trainer
    6  sbtrain.eval, sbtrain.export, sbtrain.bench
    7  sbtrain.cli, sbtrain.train   (the top)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_PACKAGES = ("operators", "parallel", "sbtrain")

LAYERS: dict[str, int] = {
    "operators": 0,
    "parallel": 1,
    "sbtrain.config": 2,
    "sbtrain.models": 3,
    "sbtrain.data": 4,
    "sbtrain.spike": 4,
    "sbtrain.plan": 4,
    "sbtrain.convert": 4,
    "sbtrain.trainer": 5,
    "sbtrain.eval": 6,
    "sbtrain.export": 6,
    "sbtrain.bench": 6,
    "sbtrain.cli": 7,
    "sbtrain.train": 7,
}

# The root ``__init__`` of a layered tree runs before every module under it, so it sits below all of
# them: it may import nothing from the project, and importing it (``sbtrain.__version__``,
# ``sbtrain.RECIPES_DIR``) is allowed from any layer.
ROOT_PACKAGES = ("sbtrain",)

# Known violations owned by someone else's change, as (importer, imported) module pairs. Each entry
# must still occur (a fixed one fails test_pending_is_current until it is removed from here).
PENDING: set[tuple[str, str]] = set()


# -- the graph ---------------------------------------------------------------------------------------
def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    modules = {}
    for top in TOP_PACKAGES:
        for path in sorted((ROOT / top).rglob("*.py")):
            if "__pycache__" not in path.parts:
                modules[module_name(path)] = path
    return modules


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def known_prefix(name: str, modules: dict) -> str | None:
    """The longest prefix of the dotted ``name`` that is a project module (``pkg.mod.func`` -> ``pkg.mod``)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in modules:
            return candidate
    return None


def imports_of(module: str, path: Path, modules: dict) -> list[tuple[str, int]]:
    """``(imported project module, line)`` for every import statement in the file, at any depth."""
    package = module if is_package(path) else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = []
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in modules else base)
        else:
            continue
        for target in targets:
            if target.split(".")[0] not in TOP_PACKAGES:
                continue
            resolved = known_prefix(target, modules)
            if resolved is not None:
                found.append((resolved, node.lineno))
    return found


def is_edge(importer: str, importer_path: Path, imported: str) -> bool:
    if imported == importer:
        return False
    # A package's __init__ gathering its own submodules.
    if is_package(importer_path) and imported.startswith(importer + "."):
        return False
    # A module naming one of its parent packages: Python has run that __init__ already.
    return not importer.startswith(imported + ".")


def import_graph() -> tuple[dict[str, Path], dict[str, list[tuple[str, int]]]]:
    modules = project_modules()
    graph: dict[str, list[tuple[str, int]]] = {}
    for module, path in modules.items():
        edges = [(imp, line) for imp, line in imports_of(module, path, modules) if is_edge(module, path, imp)]
        graph[module] = sorted(set(edges), key=lambda e: (e[1], e[0]))
    return modules, graph


def layer_of(module: str) -> tuple[str, int] | None:
    """The layer group of ``module`` (longest matching prefix in LAYERS) and its rank."""
    matches = [(group, rank) for group, rank in LAYERS.items() if module == group or module.startswith(group + ".")]
    return max(matches, key=lambda match: len(match[0]), default=None)


def where(modules: dict, module: str, line: int | list[int]) -> str:
    lines = line if isinstance(line, list) else [line]
    return f"{modules[module].relative_to(ROOT)}:{','.join(map(str, lines))}"


def lines_by_target(edges: list[tuple[str, int]]) -> dict[str, list[int]]:
    """``{imported module: [lines]}`` in order of first appearance."""
    grouped: dict[str, list[int]] = {}
    for imported, line in edges:
        grouped.setdefault(imported, []).append(line)
    return grouped


def strongly_connected(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        # Iterative: the graph is deep enough to make recursion limits a worry one day.
        work = [(v, iter(graph.get(v, ())))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, edges = work[-1]
            advanced = False
            for w, _ in edges:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(graph.get(w, ()))))
                    advanced = True
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


# -- the checks --------------------------------------------------------------------------------------
def cycle_violations(modules, graph) -> list[tuple[tuple[str, str], str]]:
    found = []
    for component in strongly_connected(graph):
        members = set(component)
        edges = [(a, b, lines) for a in component for b, lines in lines_by_target(graph[a]).items() if b in members]
        message = f"import cycle between {', '.join(component)}:\n" + "\n".join(
            f"    {a} -> {b}  ({where(modules, a, lines)})" for a, b, lines in edges)
        found += [((a, b), message) for a, b, _ in edges]
    return found


def layer_violations(modules, graph) -> list[tuple[tuple[str, str], str]]:
    found = []
    for module in sorted(graph):
        if module in ROOT_PACKAGES:
            continue  # test_root_packages_are_leaves
        mine = layer_of(module)
        if mine is None:
            continue  # test_every_module_has_a_layer
        for imported, lines in lines_by_target(graph[module]).items():
            theirs = None if imported in ROOT_PACKAGES else layer_of(imported)
            if theirs is not None and theirs[1] > mine[1]:
                message = (f"{where(modules, module, lines)}: {module} (layer {mine[1]} {mine[0]}) -> {imported} "
                           f"(layer {theirs[1]} {theirs[0]})")
                found.append(((module, imported), message))
    return found


def _report(found: list[tuple[tuple[str, str], str]], what: str) -> None:
    new = [message for pair, message in found if pair not in PENDING]
    if new:
        pytest.fail(f"{what}:\n" + "\n".join(dict.fromkeys(new)), pytrace=False)


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_no_import_cycles(graph):
    _report(cycle_violations(*graph), "import cycles (a module may not import, directly or not, one that imports it)")


def test_no_upward_imports(graph):
    _report(layer_violations(*graph), "imports from a lower layer into a higher one (see the table in this file)")


def test_every_module_has_a_layer(graph):
    modules, _ = graph
    missing = [m for m in modules if m not in ROOT_PACKAGES and layer_of(m) is None]
    assert not missing, f"modules outside every layer (add their room to LAYERS and docs/ARCHITECTURE.md): {missing}"


def root_imports(modules) -> list[str]:
    """Every project import of a root package's __init__, its own submodules included."""
    return [f"{where(modules, root, line)}: {root} -> {imported}"
            for root in ROOT_PACKAGES if root in modules
            for imported, line in imports_of(root, modules[root], modules) if imported != root]


def test_root_packages_are_leaves(graph):
    modules, _ = graph
    bad = root_imports(modules)
    assert not bad, ("a root package's __init__ runs before every module under it, so it may import nothing "
                     "from the project:\n" + "\n".join(bad))


def test_pending_is_current(graph):
    occurring = {pair for pair, _ in cycle_violations(*graph) + layer_violations(*graph)}
    stale = sorted(PENDING - occurring)
    assert not stale, f"fixed: remove these from PENDING in tests/test_architecture.py: {stale}"


# -- the checker itself ------------------------------------------------------------------------------
def test_checker_finds_cycles_and_upward_imports(tmp_path, monkeypatch):
    """A made-up tree: parallel.a <-> parallel.b (a lazy import closes the cycle), operators.x -> parallel.a
    (upward), sbtrain/__init__ -> sbtrain.cli (a root that is not a leaf), and the non-edges."""
    files = {
        "operators/__init__.py": "from operators import x\nfrom . import y\n",  # its own submodules: fine
        "operators/x.py": "import operators\nfrom parallel.a import f\n",  # parent: fine; parallel: upward
        "operators/y.py": "",
        "parallel/__init__.py": "",
        "parallel/a.py": "from parallel import b\n",
        "parallel/b.py": "def g():\n    from .a import f\n",
        "sbtrain/__init__.py": "def main():\n    import sbtrain.cli.app\n",
        "sbtrain/cli/__init__.py": "",
        "sbtrain/cli/app.py": "from sbtrain import __version__\nfrom sbtrain.config import a, b\n",
        "sbtrain/config/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    modules, edges = import_graph()
    assert sorted(edges["operators"]) == []
    assert edges["operators.x"] == [("parallel.a", 2)]
    assert edges["sbtrain.cli.app"] == [("sbtrain.config", 2)]  # sbtrain: its parent
    cycles = {pair for pair, _ in cycle_violations(modules, edges)}
    assert cycles == {("parallel.a", "parallel.b"), ("parallel.b", "parallel.a")}
    upward = [message for _, message in layer_violations(modules, edges)]
    assert upward == ["operators/x.py:2: operators.x (layer 0 operators) -> parallel.a (layer 1 parallel)"]
    assert edges["sbtrain"] == []  # its own submodule: no edge, but a root package must be a leaf
    assert root_imports(modules) == ["sbtrain/__init__.py:2: sbtrain -> sbtrain.cli.app"]
