"""Properties of the gate's command reader over generated text (hypothesis, derandomized):
it never raises, its work never exceeds the text's length, a plain command is one simple command
whose words are exactly what the standard library's POSIX `shlex` makes of it, and the gate
never allows what it did not read plainly."""

from __future__ import annotations

import shlex

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.policy import EXAMPLE_POLICY_PATH, load_policy
from broker.policy.shell import parse_command
from broker.policy.tool_gate import decide_tool_call
from broker.policy.tools import ToolCall

EXAMPLE = load_policy(EXAMPLE_POLICY_PATH)
# Shell-significant characters, a few words and some hostile Unicode, mixed freely.
SHELLISH = st.lists(
    st.sampled_from([*" \t\n\\'\"$`()<>;&|#!{}*?[]~=-/.:@%^,", "a", "b", "ls", "curl", "cat", ".env",
                     "\u202e", "\u200b", "\u00a0", "\x00"]),
    max_size=40,
).map("".join)
# Mostly quoting: where a reader most easily disagrees with the shell about the words.
QUOTEY = st.lists(st.sampled_from(list(" ab'\"\\-./=")), max_size=40).map("".join)
SETTINGS = settings(max_examples=1500, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))


@SETTINGS
@given(SHELLISH)
def test_reading_never_raises_and_is_bounded(text: str) -> None:
    parsed = parse_command(text)
    assert parsed.steps <= len(text)
    assert len(parsed.unclear) <= 8
    verdict = decide_tool_call(EXAMPLE, agent="claude-code", session_active=True, call=ToolCall("Bash", {"command": text}))
    assert verdict.decision in ("allow", "ask", "deny")
    if not parsed.plain:
        assert verdict.decision != "allow", (text, parsed.unclear)


@SETTINGS
@given(st.one_of(SHELLISH, QUOTEY))
def test_a_plain_command_reads_as_shlex_reads_it(text: str) -> None:
    parsed = parse_command(text)
    if not parsed.plain or "<" in text or ">" in text:
        return
    assert len(parsed.segments) <= 1
    words = list(parsed.segments[0].words) if parsed.segments else []
    assert words == shlex.split(text, posix=True), text


@SETTINGS
@given(st.lists(st.sampled_from(["ls", "-la", "'a b'", '"c d"', "x\\ y", "README.md", "2>&1", "> out", "src/"]),
                min_size=1, max_size=8))
def test_plain_word_lists_stay_plain_and_allowed(words: list[str]) -> None:
    text = " ".join(["ls", *words])
    assert parse_command(text).plain, text
    verdict = decide_tool_call(EXAMPLE, agent="claude-code", session_active=True, call=ToolCall("Bash", {"command": text}))
    assert verdict.decision == "allow", text
