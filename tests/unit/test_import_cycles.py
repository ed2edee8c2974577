"""The package's modules import each other without a cycle.

Every import that runs counts: module level and inside functions.  Type-only
imports (under ``if TYPE_CHECKING:``) do not count for cycles: the per-request
context names the pool it runs on, and the pool's policies name the context —
a mutual reference of types by design, with no import at run time.  What must
not depend on the server side at all, not even for its types, is the admin
listener: it sees the sidecar through the ``AdminTarget`` protocol only
(checked separately below).  ``from . import x`` counts as an import of
``sidecar.x`` when ``x`` is a module, of the package otherwise.  Importing
``a.b`` is an edge to ``a.b`` only, not to the package ``a`` (Python always
runs a package's ``__init__`` first; that order is not a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "sidecar"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE


def _module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def _type_only(tree: ast.AST) -> set[int]:
    """The ids of every node inside an ``if TYPE_CHECKING:`` block."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for statement in node.body:
                inside.update(id(child) for child in ast.walk(statement))
    return inside


def _imports(name: str, path: Path, known: set[str], *, type_only: bool) -> set[str]:
    """The package's modules that ``name`` imports (with ``type_only``: type-only imports too)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    skipped = set() if type_only else _type_only(tree)
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # Relative: level 1 is the module's own package.
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join([*base, node.module] if node.module else base)
            else:
                stem = node.module or ""
            # `from pkg import sub` imports the module pkg.sub when there is one.
            targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in known else stem for alias in node.names]
        else:
            continue
        for target in targets:
            # `import sidecar.a.b` (or a name inside it): the deepest known module.
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(*, type_only: bool = False) -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known, type_only=type_only) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state:
                cycle = visit(target)
                if cycle is not None:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle is not None:
                return cycle
    return None


def test_the_graph_sees_relative_absolute_and_type_only_imports() -> None:
    graph = import_graph()
    assert "sidecar.server" in graph
    assert "sidecar.config" in graph["sidecar.cli"]  # from .config import ...
    assert "sidecar.logs" in graph["sidecar.workers"]  # inside a function
    assert "sidecar.pools" not in graph["sidecar.admin"]  # only under TYPE_CHECKING
    assert "sidecar.pools" in import_graph(type_only=True)["sidecar.admin"]


def test_the_admin_listener_does_not_depend_on_the_server_side() -> None:
    # Not even for types: it sees the sidecar through the AdminTarget protocol.
    graph = import_graph(type_only=True)
    server_side = {"sidecar.server", "sidecar.runtime", "sidecar.generations", "sidecar.cli", "sidecar.workers"}
    assert not graph["sidecar.admin"] & server_side, graph["sidecar.admin"] & server_side


def test_no_import_cycle_in_the_package() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or ())


def test_a_cycle_is_named() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
