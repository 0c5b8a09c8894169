"""Loading policy files: every refusal names the line, the path and what is wrong."""

from __future__ import annotations

import hashlib

import pytest

from broker.errors import InvalidRequest, PolicyError
from broker.policy import EXAMPLE_POLICY_PATH, load_policy, load_policy_text, parse_resource
from broker.policy.fields import parse_duration

GOOD = """\
version: 1
tiers:
  read: {control: auto, max_ttl: 1h}
  write: {control: auto, max_ttl: 30m}
resources:
  - match: "github://acme/*"
    provider: github
    access:
      read: {tier: read}
      write: {tier: write}
humans:
  alice@example.com:
    grants:
      - {resource: "github://acme/*", access: [read]}
agents:
  claude-code: {max_tier: write}
"""


def problems_of(text: str) -> list[dict]:
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text)
    assert caught.value.code == "policy-invalid"
    assert caught.value.problems, "a refusal must list its problems"
    return caught.value.problems


def only(problems: list[dict]) -> dict:
    assert len(problems) == 1, problems
    return problems[0]


def test_good_policy_loads():
    policy = load_policy_text(GOOD)
    assert policy.match_resource("github://acme/widgets").provider == "github"
    assert policy.line_of("resources[0].access.write") == 10
    assert policy.line_of("humans.alice@example.com.grants[0]") == 14
    assert policy.line_of("nothing.here") is None


# (id, text replaced in GOOD, replacement, line, path, message fragment)
BAD = [
        ("unknown-key", "      write: {tier: write}", "      write: {tier: write, scopes: x}", 10,
         "resources[0].access.write.scopes", "unknown key 'scopes'"),
        ("misspelt-key-suggests", "      read: {tier: read}", "      read: {tier: read, permisions: {a: b}}", 9,
         "resources[0].access.read.permisions", "did you mean 'permissions'?"),
        ("wrong-type", "  claude-code: {max_tier: write}", "  claude-code: {max_tier: write, providers: github}", 16,
         "agents.claude-code.providers", "valid list"),
        ("string-is-not-int", "version: 1", 'version: "1"', 1, "version", "Input should be 1"),
        ("access-tier-missing", "      read: {tier: read}", "      read: {}", 9,
         "resources[0].access.read.tier", "missing required key 'tier'"),
        ("tier-max-ttl-missing", "  write: {control: auto, max_ttl: 30m}", "  write: {control: auto}", 4,
         "tiers.write.max_ttl", "needs max_ttl"),
        ("undefined-tier-referenced", "      write: {tier: write}", "      write: {tier: secret}", 10,
         "resources[0].access.write.tier", "'secret' is not defined in tiers"),
        ("unknown-tier-name", "  write: {control: auto, max_ttl: 30m}", "  wrte: {control: auto, max_ttl: 30m}", 4,
         "tiers.wrte", "invalid key 'wrte'"),
        ("bad-duration", "max_ttl: 30m", "max_ttl: 30 minutes", 4, "tiers.write.max_ttl", "invalid duration"),
        ("zero-duration", "max_ttl: 30m", "max_ttl: 0", 4, "tiers.write.max_ttl", "at least 1 second"),
        ("bad-control", "{control: auto, max_ttl: 1h}", "{control: automatic, max_ttl: 1h}", 3,
         "tiers.read.control", "'auto', 'approval' or 'deny'"),
        ("approval-without-approvers", "  write: {control: auto, max_ttl: 30m}", "  write: {control: approval, max_ttl: 30m}",
         4, "tiers.write.approvers", "names no approvers"),
        ("malformed-match-scheme", '  - match: "github://acme/*"', '  - match: "github:/acme/*"', 6,
         "resources[0].match", "<scheme>://<path>"),
        ("malformed-match-dotdot", '  - match: "github://acme/*"', '  - match: "github://acme/../*"', 6,
         "resources[0].match", '".."'),
        ("malformed-grant-resource", '{resource: "github://acme/*", access: [read]}',
         '{resource: "acme/*", access: [read]}', 14, "humans.alice@example.com.grants[0].resource", "<scheme>://"),
        ("human-key-not-email", "  alice@example.com:", "  alice:", 12, "humans.alice", "invalid key 'alice'"),
        ("options-shadow-field", "      read: {tier: read}", "      read: {tier: read, options: {scope: x}}", 9,
         "resources[0].access.read.options", "must not repeat"),
        ("duplicate-key", "      write: {tier: write}", "      write: {tier: write}\n      read: {tier: read}", 11,
         "resources[0].access.read", "duplicate key 'read' (first at line 9)"),
        ("duplicate-match", "humans:", '  - {match: "github://acme/*", provider: github, access: {read: {tier: read}}}\nhumans:',
         11, "resources[1].match", "duplicate match"),
        ("yaml-syntax-error", "      write: {tier: write}", "      write: {tier: write", 11, "", "YAML syntax error"),
        ("yaml-bad-indent", "    provider: github", "   provider: github", 7, "", "YAML syntax error"),
]


@pytest.mark.parametrize(("old", "new", "line", "path", "message"), [pytest.param(*c[1:], id=c[0]) for c in BAD])
def test_bad_policy_points_at_the_line(old, new, line, path, message):
    assert old in GOOD
    problem = only(problems_of(GOOD.replace(old, new, 1)))
    assert (problem["line"], problem["path"]) == (line, path), problem
    assert message in problem["message"]
    assert problem["column"] >= 1


def test_every_problem_is_reported_at_once():
    text = GOOD.replace("max_ttl: 1h", "max_ttl: soon").replace("provider: github", "provider: GitHub")
    text = text.replace("  claude-code: {max_tier: write}", "  claude-code: {max_tier: root}")
    problems = problems_of(text)
    assert [(p["line"], p["path"]) for p in problems] == [
        (3, "tiers.read.max_ttl"),
        (7, "resources[0].provider"),
        (16, "agents.claude-code.max_tier"),
    ]


def test_error_message_names_source_and_first_problem():
    with pytest.raises(PolicyError) as caught:
        load_policy_text(GOOD.replace("version: 1", "version: 2"), source="team.yaml")
    assert caught.value.message.startswith("team.yaml: invalid policy, 1 problem; line 1: version:")


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "empty"), ("# only a comment\n", "empty"), ("- a\n- b\n", "valid dictionary"), ("a: 1\n---\nb: 2\n", "YAML")],
    ids=["empty", "comment-only", "not-a-mapping", "two-documents"],
)
def test_degenerate_files(text, message):
    assert any(message in p["message"] for p in problems_of(text))


def test_missing_top_level_sections():
    problems = problems_of("version: 1\n")
    assert {(p["line"], p["path"]) for p in problems} == {(1, "tiers"), (1, "resources")}


def test_anchors_and_merge_keys_keep_lines():
    text = GOOD.replace(
        "  write: {control: auto, max_ttl: 30m}", "  write: &w {control: auto, max_ttl: 30m}\n  review: {<<: *w, max_ttl: 20m}"
    )
    policy = load_policy_text(text)
    assert policy.tiers["review"].max_ttl == 1200
    assert policy.tiers["review"].control == "auto"
    assert policy.line_of("tiers.review.max_ttl") == 5


def test_alias_bomb_is_refused():
    lines = ["version: 1", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines.extend(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9))
    assert "too many nodes" in only(problems_of("\n".join(lines) + "\n"))["message"]


def test_version_is_the_hash_of_the_file_bytes(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_bytes(GOOD.encode())
    assert load_policy(path).version == "sha256:" + hashlib.sha256(GOOD.encode()).hexdigest()
    # A comment is a change of content, so a change of version.
    assert load_policy_text(GOOD + "# note\n").version != load_policy(path).version


def test_unreadable_file_is_a_policy_error(tmp_path):
    with pytest.raises(PolicyError) as caught:
        load_policy(tmp_path / "missing.yaml")
    assert caught.value.problems[0]["line"] == 1


def test_example_policy_loads():
    policy = load_policy(EXAMPLE_POLICY_PATH)
    assert policy.version == "sha256:" + hashlib.sha256(EXAMPLE_POLICY_PATH.read_bytes()).hexdigest()
    native = policy.match_resource("jwt://payments-api")
    assert native.provider == "native" and set(native.access) == {"read", "write", "release"}
    assert native.access["release"].tier == "merge_deploy"
    assert policy.human_key("dev@example.com") == "dev@example.com"
    # The trial user is a maintainer, so `broker-cli dev` can show an approval end to end.
    assert "maintainers" in policy.groups_of("dev@example.com")
    assert policy.agent("claude-code").max_tier == "merge_deploy"
    assert policy.tiers["secret"].min_approvals == 2


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(90, 90), ("90", 90), ("90s", 90), ("30m", 1800), ("1h", 3600), ("1h30m", 5400), ("1d", 86400)],
)
def test_durations(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "1x", "h", "30 m", "-5", True, 0, -1])
def test_bad_durations(value):
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    ("uri", "parsed"),
    [
        ("github://acme/widgets", ("github", "acme/widgets")),
        ("aws://123456789012/role/agent-readonly", ("aws", "123456789012/role/agent-readonly")),
        ("git+ssh://host/repo.git", ("git+ssh", "host/repo.git")),
    ],
)
def test_parse_resource(uri, parsed):
    assert parse_resource(uri) == parsed


@pytest.mark.parametrize(
    "uri",
    ["github://", "GitHub://acme/x", "acme/x", "github:/acme", "github://acme/*", "github://a/../b",
     "github://acme /x", "github://acme/\u00e9", "1git://x", "x" * 40 + "://y", "github://" + "a" * 504, 42],
)
def test_parse_resource_refuses(uri):
    with pytest.raises(InvalidRequest) as caught:
        parse_resource(uri)
    assert caught.value.code == "invalid-resource"
