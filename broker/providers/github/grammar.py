"""The github resource grammar: `github://<owner>/<repo>`, lower-cased (GitHub names are case-insensitive)."""

from __future__ import annotations

import re

from broker.grammar import ResourceGrammar, ResourceRefused

_OWNER = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9]|-(?=[A-Za-z0-9])){0,38}")
_REPO = re.compile(r"[A-Za-z0-9._-]{1,100}")


def canonical(segments: list[str]) -> list[str]:
    if len(segments) != 2:
        raise ResourceRefused("is not a GitHub repository: expected github://<owner>/<repo>")
    owner, repo = segments
    if _OWNER.fullmatch(owner) is None:
        raise ResourceRefused("has an invalid GitHub owner (letters, digits and single hyphens, at most 39)")
    if _REPO.fullmatch(repo) is None:
        raise ResourceRefused("has an invalid GitHub repository name ([A-Za-z0-9._-], at most 100)")
    return [owner.lower(), repo.lower()]


GRAMMAR = ResourceGrammar("github", canonical, case_insensitive=True)
