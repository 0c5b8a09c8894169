"""The resource grammar, table-driven: what each scheme accepts, its canonical form, what it refuses."""

from __future__ import annotations

import pytest

from broker.errors import InvalidRequest
from broker.policy.resources import (
    canonical_pattern,
    canonical_resource,
    parse_resource,
    pattern_problem,
    resource_problem,
)

ACCEPTED = [
    # (as written, canonical)
    ("github://acme/widgets", "github://acme/widgets"),
    ("github://Acme/Widgets", "github://acme/widgets"),  # GitHub names are case-insensitive
    ("github://a-b/x.y_z", "github://a-b/x.y_z"),
    ("aws://123456789012/role/agent-readonly", "aws://123456789012/role/agent-readonly"),
    ("aws://123456789012/role/team/agents/Deploy+1", "aws://123456789012/role/team/agents/Deploy+1"),
    ("vault://database/creds/ledger-test", "vault://database/creds/ledger-test"),
    ("vault://secret/data/Team/app", "vault://secret/data/Team/app"),
    ("vault://a", "vault://a"),
    ("jwt://payments-api", "jwt://payments-api"),
    ("jwt://svc/ledger", "jwt://svc/ledger"),
    ("git+ssh://host/repo.git", "git+ssh://host/repo.git"),
    ("custom://x/y:z@w~v", "custom://x/y:z@w~v"),
    ("vault://a/...", "vault://a/..."),  # three dots name a segment; only "." and ".." are dot segments
]


@pytest.mark.parametrize(("written", "canonical"), ACCEPTED)
def test_accepted_resources_and_their_canonical_form(written: str, canonical: str) -> None:
    assert canonical_resource(written) == canonical
    assert parse_resource(written).uri == canonical
    assert resource_problem(canonical) is None
    if written != canonical:
        assert "canonical" in (resource_problem(written) or "")  # the evaluator wants it canonical


REFUSED = [
    # (resource, words the reason contains)
    # percent-encoding: never decoded, so never a hidden ".."
    ("vault://dbtest/creds/%2e%2e/%2e%2e/dbprod/creds/admin", "percent"),
    ("vault://dbtest/creds/%2E%2E/%2E%2E/dbprod/creds/admin", "percent"),
    ("vault://dbtest/creds/.%2e/.%2e/dbprod/creds/admin", "percent"),
    ("vault://dbtest/x/%2e%2e/%2e%2e/dbprod/creds/admin", "percent"),
    ("vault://dbtest/%2fdbprod", "percent"),
    ("vault://dbtest/%00", "percent"),
    # dot and empty segments
    ("vault://dbtest/creds/../../dbprod/creds/admin", "dot segment"),
    ("vault://dbtest/./creds", "dot segment"),
    ("jwt://..", "dot segment"),
    ("vault://dbtest//creds", "empty path segment"),
    ("vault:///dbtest", "empty path segment"),
    ("vault://dbtest/", "empty path segment"),
    ("jwt://", "empty path"),
    # control characters, NUL, whitespace, a trailing newline (\Z, not $)
    ("github://acme/x\n", "control character"),
    ("vault://a\x00b", "NUL"),
    ("vault://a\tb", "control character"),
    ("vault://a\x7fb", "control character"),
    ("vault://a b", "whitespace"),
    ("vault://a\u00a0b", "whitespace"),
    # non-ASCII, non-NFC
    ("github://acme/\u00e9", "ASCII"),
    ("vault://caf\u0065\u0301", "NFC"),
    ("vault://\uff0e\uff0e/x", "ASCII"),  # fullwidth dots
    # characters a client or router reads as structure
    ("vault://dbtest/creds?x=1", "characters outside"),
    ("vault://dbtest/creds#frag", "characters outside"),
    ("vault://dbtest\\..\\dbprod", "characters outside"),
    ("vault://dbtest/*", "concrete"),
    # the URI shape
    ("not-a-uri", "scheme"),
    ("GitHub://acme/x", "scheme"),
    ("1git://x", "scheme"),
    ("x" * 40 + "://y", "scheme"),
    ("github://" + "a" * 504, "longer"),
    # per scheme
    ("github://acme", "github://<owner>/<repo>"),
    ("github://acme/widgets/extra", "github://<owner>/<repo>"),
    ("github://-acme/x", "owner"),
    ("github://acme/x!y", "characters outside"),
    ("aws://123456789012", "aws://"),
    ("aws://12345/role/x", "aws://"),
    ("aws://123456789012/user/x", "aws://"),
    ("aws://123456789012/role/a~b", "IAM"),
    ("aws://123456789012/role/" + "r" * 65, "64"),
]


@pytest.mark.parametrize(("resource", "reason"), REFUSED)
def test_refused_resources(resource: str, reason: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_resource(resource)
    assert caught.value.code == "invalid-resource"
    assert reason in caught.value.message
    assert reason in (resource_problem(resource) or "")


def test_non_strings_are_refused() -> None:
    assert resource_problem(42) == "must be a string"  # type: ignore[arg-type]
    assert pattern_problem(None) == "must be a string"  # type: ignore[arg-type]


PATTERNS = [
    ("github://acme/*", "github://acme/*"),
    ("github://ACME/*", "github://acme/*"),
    ("github://**", "github://**"),
    ("vault://dbtest/**", "vault://dbtest/**"),
    ("jwt://svc/ledger*", "jwt://svc/ledger*"),
    ("aws://123456789012/role/*", "aws://123456789012/role/*"),
    ("github://Acme/Widgets", "github://acme/widgets"),  # no star: the scheme's own rule applies
]


@pytest.mark.parametrize(("written", "canonical"), PATTERNS)
def test_patterns_and_their_canonical_form(written: str, canonical: str) -> None:
    assert pattern_problem(written) is None
    assert canonical_pattern(written) == canonical


@pytest.mark.parametrize("pattern", [
    "vault://dbtest/%2e%2e/**", "vault://dbtest/../**", "vault://dbtest//**", "github://acme/*\n",
    "vault://db test/*", "vault://dbtest/*?", "github://acme/widgets/extra", "jwt://", "vault://**/",
])
def test_refused_patterns(pattern: str) -> None:
    assert pattern_problem(pattern) is not None
    with pytest.raises(InvalidRequest) as caught:
        canonical_pattern(pattern)
    assert caught.value.code == "invalid-resource"
