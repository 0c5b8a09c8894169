"""The one form of a human principal: how humans are stored and compared everywhere."""

from __future__ import annotations


def canonical_human(principal: str) -> str:
    """Lower-cased: IdPs disagree on the case of an email, people do not.

    The policy matches humans case-insensitively, so every other comparison (session
    visibility, the kill switch) must too, or `ALICE@Example.COM` is one person to the policy
    and another to `revoke --human alice@example.com`. Sessions store this form from creation.
    """
    return principal.lower()
