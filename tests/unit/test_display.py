"""broker.display: every hostile code point is shown as a mark, nothing else changes, and the
rendering is one-to-one (text that spells a mark is not shown as the mark)."""

from __future__ import annotations

import unicodedata
from typing import Any

import pytest

from broker.approvals import summary
from broker.display import hidden_characters, segments, visible
from tests.support.hostile_text import ALL, HOSTILE, ids, marked


@pytest.mark.parametrize(("kind", "code"), ALL, ids=ids(ALL))
def test_each_hostile_code_point_is_shown_as_its_mark(kind: str, code: int) -> None:
    char = chr(code)
    text = f"deploy{char}prod"
    shown = visible(text)
    assert shown == f"deploy{marked(code)}prod"
    assert char not in shown or (code == 0x27E6 and shown.count(char) == 1)  # the mark's own bracket
    assert hidden_characters({"k": [text]}) == [f"U+{code:04X}"]
    assert hidden_characters({text: 1}) == [f"U+{code:04X}"]  # keys too
    pieces = list(segments(text))
    assert [p.marked for p in pieces] == [False, True, False] and "".join(p.text for p in pieces) == shown
    assert pieces[1].name  # the console's tooltip names it


@pytest.mark.parametrize("text", ["deploy prod", "Grüße, 東京, שלום, مرحبا, ñ", "a-b_c.d/e:f@g", "😀 emoji", ""])
def test_ordinary_text_is_unchanged(text: str) -> None:
    assert visible(text) == text and hidden_characters(text) == []


def test_every_cf_character_python_knows_is_marked() -> None:
    # Whatever Unicode version this Python ships: no format character slips through.
    for code in range(0x110000):
        char = chr(code)
        if unicodedata.category(char) in ("Cf", "Cc", "Zl", "Zp"):
            assert visible(char) == marked(code), hex(code)


def test_the_rendering_is_one_to_one() -> None:
    spelled = "\u27e6U+202E\u27e7"
    assert visible(spelled) != visible("\u202e")
    assert visible(spelled) == "\u27e6U+27E6\u27e7U+202E\u27e7"


@pytest.mark.parametrize(("kind", "code"), ALL, ids=ids(ALL))
def test_the_display_block_marks_every_agent_field(kind: str, code: int) -> None:
    c = chr(code)
    approval: dict[str, Any] = {
        "agent": "claude-code", "human": "alice@example.com", "task_id": f"task{c}1", "repository": f"acme/app{c}",
        "labels": {f"team{c}": f"pay{c}ments"}, "resource": f"jwt://payments{c}-api", "access": "deploy",
        "tier": "merge_deploy", "ttl_seconds": 300, "purpose": f"ship{c} it", "tool": f"deploy{c}-cli",
        "parameters": {f"env{c}": f"prod{c}", "nested": [f"x{c}"]}, "binding_message": f"m{c}",
        "request_hash": "sha256:" + "ab" * 32, "approvals": [{"approver": "bob@example.com", "decision": "approve",
                                                              "reason": f"ok{c}"}], "min_approvals": 2,
    }
    d = summary.display(approval)
    m = marked(code)
    for field in ("task_id", "repository", "resource", "purpose", "tool", "binding_message"):
        assert m in d[field], field
    assert d["labels"] == {f"team{m}": f"pay{m}ments"}
    assert d["approvals"][0]["reason"] == f"ok{m}"
    assert m in d["sentence"] and f"payments{m}-api" in d["sentence"]
    assert d["hidden_characters"] == [f"U+{code:04X}"] and f"U+{code:04X}" in d["warning"]
    assert d["binding_code"] == "ABAB-ABAB"
    # The canonical JSON, with its marks read back, is exactly what the request hash covers.
    canonical = summary.canonical_parameters(approval["parameters"])
    assert canonical is not None and d["parameters_canonical"] == visible(canonical)
    assert c not in d["parameters_canonical"] or code == 0x27E6


def test_the_sentence_says_what_for_how_long_how_many_times() -> None:
    from datetime import UTC, datetime, timedelta

    now = datetime(2026, 1, 1, tzinfo=UTC)
    base = {"agent": "claude-code", "human": "alice@example.com", "access": "merge", "resource": "github://acme/app",
            "ttl_seconds": 600, "parameters": None, "min_approvals": 1, "created_at": now,
            "expires_at": now + timedelta(minutes=15)}
    assert summary.sentence(base) == ("Approving lets claude-code (acting for alice@example.com) mint one `merge` "
                                      "credential for github://acme/app, valid at most 10 min, once, within 15 min "
                                      "of approval.")
    tool = {**base, "resource": "tool://Bash", "access": "merge_deploy", "ttl_seconds": 0, "tool": "Bash",
            "parameters": {"tool_name": "Bash", "tool_input": {"command": "git push"}}, "min_approvals": 2}
    assert summary.sentence(tool) == ("Approving lets claude-code (acting for alice@example.com) run one `Bash` tool "
                                      "call with exactly the input shown, once, within 15 min of approval. It needs "
                                      "2 distinct approvers.")


def test_every_class_is_in_the_corpus() -> None:
    assert set(HOSTILE) >= {"bidi-embedding-override", "bidi-isolate", "bidi-mark", "zero-width", "tag-characters",
                            "variation-selectors", "hangul-fillers", "line-paragraph-separators"}
