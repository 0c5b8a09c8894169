"""The package's import graph: no module imports itself back, and every package stands on one floor.

Every import statement counts, including those under `TYPE_CHECKING` and inside functions:
a cycle hidden there is still two modules that cannot be understood apart.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "broker"

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


# Every package of broker/ (and every top-level module) on one floor, lowest first. A module imports
# only from its own floor and the floors below it; docs/architecture.md draws the same list.
FLOORS: tuple[tuple[str, ...], ...] = (
    # the ground: no broker state, no database
    ("__init__", "errors", "ids", "times", "crypto", "display", "jsonbounds", "redaction", "logs", "periodic",
     "outages", "principals", "grammar"),
    ("db", "models"),  # the schema
    ("metrics",),  # counters, and the gauges read from the database
    ("policy",),  # the policy language: documents, compiled, evaluated
    ("audit",),  # the hash-chained log, its Merkle tree, checkpoints and witnesses
    ("identity",),  # who is calling: keys, tokens, the IdP, workloads
    ("config",),  # settings, parsed with the grammars of the floors below
    ("plugins",),  # what every backend plugin is: base, context, health, registry
    ("permissions",),  # live permission sources: the contract, registry, cache, budget
    ("providers", "store"),  # the backends that mint (one package each); the request path's storage
    ("runtime",),  # the assembled broker
    ("outbox", "ssf", "security_events"),  # delivery to the outside
    ("sessions", "leases", "approvals", "breakglass"),  # the domain: what a decision does
    ("lifecycle", "hooks"),  # sweeper, reconciler, re-check, teardown; the tool-call gate
    ("oauth", "mcp"),  # protocols on top of the domain
    ("api", "console"),  # HTTP
    ("app", "cli", "migrate", "openapi"),  # entry points
)
FLOOR = {name: i for i, names in enumerate(FLOORS) for name in names}


def unit_of(module: str) -> str:
    """The package or top-level module `broker.x...` belongs to: x ("__init__" for `broker`)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def back_arrows(graph: dict[str, set[str]], floor: dict[str, int]) -> list[str]:
    return sorted(f"{m} (floor {floor[unit_of(m)]}) imports {t} (floor {floor[unit_of(t)]})"
                  for m, targets in graph.items() for t in targets if floor[unit_of(t)] > floor[unit_of(m)])


def test_every_package_is_on_exactly_one_floor() -> None:
    units = {unit_of(m) for m in MODULES}
    listed = [name for names in FLOORS for name in names]
    assert len(listed) == len(set(listed)), "a package on two floors"
    assert units - set(listed) == set(), "packages without a floor"
    assert set(listed) - units == set(), "floors naming packages that do not exist"


def test_the_floor_check_finds_a_back_arrow() -> None:
    graph = {"broker.app": {"broker.errors"}, "broker.errors": {"broker.app"}}
    assert back_arrows(graph, {"app": 1, "errors": 0}) == ["broker.errors (floor 0) imports broker.app (floor 1)"]


def test_no_import_runs_up_a_floor() -> None:
    assert back_arrows(GRAPH, FLOOR) == []


# The modules that may ask which database they run on: the engine (db.py), the choice of the
# request path's store, and the two dialect modules. A branch on the dialect anywhere else fails
# here: give `store/sql.py` (or, on the audit floor, `audit/sql.py`) a method and call it.
DIALECT_MODULES = {"broker.db", "broker.store", "broker.store.sql", "broker.audit.sql"}


def dialect_questions(source: str) -> list[int]:
    """The lines that ask for the database's dialect: `.dialect` read off anything, `dialect.name`,
    or `is_postgres`."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        asks = (isinstance(node, ast.Name) and node.id == "is_postgres") or (isinstance(node, ast.Attribute) and (
            node.attr in ("dialect", "is_postgres")
            or (node.attr == "name" and isinstance(node.value, ast.Name) and node.value.id == "dialect")))
        if asks:
            found.add(node.lineno)
    return sorted(found)


def test_the_dialect_check_finds_a_branch() -> None:
    source = ("postgres = conn.dialect.name == 'postgresql'\n"
              "rows = 1\n"
              "if is_postgres(engine):\n"
              "    pass\n"
              "def bind(value, dialect):\n"
              "    return dialect.name\n")
    assert dialect_questions(source) == [1, 3, 6]


def test_only_the_dialect_modules_branch_on_the_database() -> None:
    assert MODULES.keys() >= DIALECT_MODULES
    scattered = {name: lines for name, path in sorted(MODULES.items()) if name not in DIALECT_MODULES
                 if (lines := dialect_questions(path.read_text()))}
    assert scattered == {}, f"dialect branches outside {sorted(DIALECT_MODULES)} (module: lines)"
