"""The package's import graph: no module imports itself back, and layers point one way.

Every import statement counts, including those under `TYPE_CHECKING` and inside functions:
a cycle hidden there is still two modules that cannot be understood apart.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "broker"

# Lower layer -> the layers above it that it must never import.
ABOVE = {
    "broker.policy": ("broker.api", "broker.cli", "broker.app", "broker.lifecycle", "broker.sessions", "broker.leases",
                      "broker.providers", "broker.db", "broker.models", "broker.runtime"),
    "broker.providers": ("broker.api", "broker.cli", "broker.app", "broker.lifecycle", "broker.sessions", "broker.leases",
                         "broker.runtime"),
    "broker.leases": ("broker.api", "broker.cli", "broker.app", "broker.lifecycle", "broker.sessions"),
    "broker.sessions": ("broker.api", "broker.cli", "broker.app", "broker.lifecycle"),
    "broker.identity": ("broker.api", "broker.cli", "broker.app", "broker.lifecycle", "broker.sessions", "broker.leases"),
    "broker.store": ("broker.api", "broker.cli", "broker.app", "broker.lifecycle", "broker.sessions", "broker.leases",
                     "broker.runtime"),
    "broker.audit": ("broker.api", "broker.cli", "broker.app", "broker.lifecycle", "broker.sessions", "broker.leases"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """The broker modules `name` imports: `from a.b import c` is a.b.c when that is a module."""
    path = MODULES[name]
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """Depth-first search; returns one cycle as a path, or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_walk_sees_the_package() -> None:
    assert "broker.leases.service" in MODULES and "broker.app" in MODULES
    assert "broker.leases.vocabulary" in GRAPH["broker.leases.service"]


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_broker() -> None:
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH) or [])


@pytest.mark.parametrize("layer", sorted(ABOVE))
def test_a_layer_imports_nothing_above_it(layer: str) -> None:
    offending = sorted(
        f"{module} imports {target}"
        for module, targets in GRAPH.items() if module == layer or module.startswith(layer + ".")
        for target in targets
        if any(target == above or target.startswith(above + ".") for above in ABOVE[layer])
    )
    assert offending == []
