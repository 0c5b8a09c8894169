"""Every approval row is created in one function, `approvals.service.open_request`, where the
bounds and the pending budgets are checked: a new path that built an `Approval` itself would skip
them, so this test names the one place (read with `ast`, nothing imported)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "broker"


def _creators() -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Approval":
                    found.add((str(path.relative_to(PACKAGE.parent)), func.name))
    return found


def test_approvals_are_created_only_where_the_bounds_are_checked() -> None:
    assert _creators() == {("broker/approvals/service.py", "open_request")}


def test_open_request_checks_bounds_and_budget_before_adding_anything() -> None:
    source = (PACKAGE / "approvals" / "service.py").read_text(encoding="utf-8")
    body = source[source.index("def open_request("):source.index("def redeem(")]
    assert body.index("limits.check_request(") < body.index("db.add(")
    assert body.index("limits.check_budget(") < body.index("db.add(")
    assert body.index("limits.check_budget(") < body.index("outbox.enqueue(")
