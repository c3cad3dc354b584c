"""meshid's modules import each other without cycles (dependencies point one way).

The graph is built from the source with ``ast``, not by importing: an edge ``a -> b`` is any
``import meshid.b`` / ``from meshid... import ...`` that runs when ``a`` is used, at module level
or inside a function. A deferred import in a function still ties the two modules together; it
only hides the cycle from the interpreter. Imports under ``if TYPE_CHECKING:`` are for the type
checker alone and are left out.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import meshid

PACKAGE = Path(meshid.__file__).resolve().parent


def module_names(package: Path) -> dict[str, Path]:
    """Every module under ``package`` (a folder), by dotted name; a package by its folder's name."""
    names: dict[str, Path] = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _runtime_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """Every node below ``node`` that can run: all but the bodies of ``if TYPE_CHECKING:`` (their else runs)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and ast.unparse(child.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            for statement in child.orelse:
                yield statement
                yield from _runtime_nodes(statement)
            continue
        yield child
        yield from _runtime_nodes(child)


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ``modules`` that module ``name`` (at ``path``) imports."""
    root = name.split(".")[0]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            for alias in node.names:
                # ``from meshid.ca import store`` imports the module meshid.ca.store.
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
    return {m for m in found if m in modules and m != name and m.split(".")[0] == root}


def import_graph(package: Path) -> dict[str, set[str]]:
    modules = module_names(package)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_meshid_has_no_import_cycle() -> None:
    graph = import_graph(PACKAGE)
    assert "meshid.ca" in graph and graph["meshid"], "the graph is empty: the walk is broken"
    found = cycles(graph)
    described = [" <-> ".join(c) + ": " + "; ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) for c in found]
    assert found == [], "import cycles among meshid's modules:\n" + "\n".join(described)


def test_a_deferred_import_cycle_is_found_and_type_checking_imports_are_not(tmp_path: Path) -> None:
    # The check must be able to fail: a cycle hidden in a function, and one only the type checker sees.
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from pkg.sub.leaf import X\n")
    (package / "sub" / "leaf.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\nX = 1\n"
    )
    (package / "a.py").write_text("from pkg.sub import leaf\n\ndef f():\n    from . import b\n")
    (package / "b.py").write_text("class C:\n    from pkg import a\n")
    graph = import_graph(package)
    assert graph == {
        "pkg": set(),
        "pkg.a": {"pkg.sub.leaf", "pkg.b"},
        "pkg.b": {"pkg.a"},
        "pkg.sub": {"pkg.sub.leaf"},
        "pkg.sub.leaf": set(),
    }
    assert cycles(graph) == [["pkg.a", "pkg.b"]]


def test_psycopg_is_imported_only_when_postgresql_is_used(tmp_path: Path) -> None:
    # psycopg is an optional dependency (meshid[postgres]): the CA on SQLite must run without it.
    code = (
        "import sys, meshid.ca, meshid.ca.store as store\n"
        "store.open_store(sys.argv[1]).close()\n"
        "print('psycopg' in sys.modules)\n"
        "store.PostgresStore\n"
        "print('psycopg' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "ca.db")], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]
