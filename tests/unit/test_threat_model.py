"""docs/threat-model.md names only tests that exist: each node id's file is there and defines
that test function (read with `ast`, so nothing is imported or run)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "threat-model.md"
NODE_ID = re.compile(r"`(tests/[\w/]+\.py)::(\w+)(?:\[[^\]`]*\])?`")
# Node ids listed under this heading belong to another branch and are checked at merge.
UNLINKED = "## To be linked at merge"


def linked_node_ids(text: str | None = None) -> list[tuple[str, str]]:
    text = DOC.read_text(encoding="utf-8") if text is None else text
    kept, skipping = [], False
    for line in text.splitlines():
        if line.startswith("## "):
            skipping = line.strip() == UNLINKED
        if not skipping:
            kept.append(line)
    return NODE_ID.findall("\n".join(kept))


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_"):
            names.add(node.name)
    return names


def test_the_threat_model_names_tests() -> None:
    ids = linked_node_ids()
    assert len(ids) >= 40
    threats = re.findall(r"^### \d+\. ", DOC.read_text(encoding="utf-8"), flags=re.M)
    assert len(threats) >= 12


@pytest.mark.parametrize(("path", "name"), linked_node_ids(), ids=lambda v: str(v))
def test_each_named_test_exists(path: str, name: str) -> None:
    file = ROOT / path
    assert file.is_file(), f"{path} does not exist"
    assert name in _test_functions(file), f"{path} defines no test function {name}"


def test_unlinked_ids_are_not_checked_but_parsed() -> None:
    """The marked list is skipped, and only it: a node id under the next heading counts again."""
    assert UNLINKED in DOC.read_text(encoding="utf-8")
    sample = ("## Threats\n- `tests/a.py::test_a`\n" + UNLINKED + "\n- `tests/b.py::test_b`\n"
              "## Later\n- `tests/c.py::test_c[param]`\n")
    assert linked_node_ids(sample) == [("tests/a.py", "test_a"), ("tests/c.py", "test_c")]
