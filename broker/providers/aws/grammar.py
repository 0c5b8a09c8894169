"""The aws resource grammar (`aws://<12-digit account>/role/[<path>/]<name>`) and its policy checks.

The broker can only revoke (PutRolePolicy) on roles of its own account, so an aws rule must name
one account literally (a glob could reach any other), and, once the broker knows its account
(BROKER_AWS_ACCOUNT_ID or STS at start), that account.
"""

from __future__ import annotations

import re

from broker.grammar import ResourceGrammar, ResourceRefused, RuleCheck

_ACCOUNT = re.compile(r"\d{12}")
_NAME = re.compile(r"[A-Za-z0-9_+=,.@-]+")


def canonical(segments: list[str]) -> list[str]:
    if len(segments) < 3 or _ACCOUNT.fullmatch(segments[0]) is None or segments[1] != "role":
        raise ResourceRefused("is not an AWS role: expected aws://<12-digit account>/role/[<path>/]<name>")
    role = segments[2:]
    if not all(_NAME.fullmatch(s) for s in role):
        raise ResourceRefused("has an invalid IAM role name or path ([A-Za-z0-9_+=,.@-])")
    if len(role[-1]) > 64 or len("/" + "".join(s + "/" for s in role[:-1])) > 512:
        raise ResourceRefused("has an IAM role name over 64 or a role path over 512 characters")
    return segments


def rule_problem(match: str) -> str | None:
    """An aws rule names one account literally."""
    scheme, _, path = match.partition("://")
    account = path.split("/", 1)[0]
    if scheme != "aws" or _ACCOUNT.fullmatch(account) is None:
        return f"aws rule {match!r} must name one account: aws://<12-digit account>/role/..."
    return None


def own_account_check(account: str) -> RuleCheck:
    """Once the broker's account is known: an aws rule for any other is refused."""

    def check(match: str) -> str | None:
        problem = rule_problem(match)
        if problem is not None:
            return problem
        rule_account = match.partition("://")[2].split("/", 1)[0]
        if rule_account != account:
            return (f"aws rule {match!r} is for account {rule_account}, not the broker's own account "
                    f"{account}: roles of other accounts cannot be revoked, so they are never minted")
        return None

    return check


GRAMMAR = ResourceGrammar("aws", canonical, rule_problem=rule_problem)
