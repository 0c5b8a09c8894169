"""Resource URIs and the globs that match them (resource rules, grants, task scope)."""

from __future__ import annotations

import re
from functools import lru_cache

from broker.errors import InvalidRequest

MAX_RESOURCE_LENGTH = 512

_SCHEME = r"[a-z][a-z0-9+.-]{0,31}"
_URI = re.compile(rf"^({_SCHEME})://(.*)$", re.DOTALL)
# Printable ASCII without the space: a resource is an identifier, never free text.
_PRINTABLE = re.compile(r"^[\x21-\x7e]+$")


def _problem(uri: str, *, allow_globs: bool) -> str | None:
    """Why `uri` is not a well-formed resource (or pattern), or None when it is."""
    if not isinstance(uri, str):
        return "must be a string"
    if len(uri) > MAX_RESOURCE_LENGTH:
        return f"longer than {MAX_RESOURCE_LENGTH} characters"
    found = _URI.match(uri)
    if found is None:
        return 'must look like "<scheme>://<path>" with a lowercase scheme'
    path = found.group(2)
    if not path:
        return "has an empty path"
    if not _PRINTABLE.match(path):
        return "path must be printable ASCII without whitespace"
    # ".." could walk out of a prefix a grant or scope was written for.
    if ".." in path:
        return 'path must not contain ".."'
    if not allow_globs and "*" in path:
        return 'must be a concrete resource: "*" is only allowed in policy patterns'
    return None


def parse_resource(uri: str) -> tuple[str, str]:
    """Split a concrete resource URI into (scheme, path), refusing anything malformed."""
    problem = _problem(uri, allow_globs=False)
    if problem is not None:
        raise InvalidRequest(f"resource {uri!r} {problem}", code="invalid-resource")
    scheme, path = uri.split("://", 1)
    return scheme, path


def resource_problem(uri: str) -> str | None:
    """Like parse_resource, but answers with the reason instead of raising."""
    return _problem(uri, allow_globs=False)


def pattern_problem(pattern: str) -> str | None:
    """Why `pattern` is not a valid resource glob ("<scheme>://<glob>"), or None."""
    return _problem(pattern, allow_globs=True)


def validate_pattern(pattern: str) -> str:
    """Return `pattern` if it is a valid resource glob, else raise InvalidRequest."""
    problem = pattern_problem(pattern)
    if problem is not None:
        raise InvalidRequest(f"resource pattern {pattern!r} {problem}", code="invalid-resource")
    return pattern


def is_glob(pattern: str) -> bool:
    return "*" in pattern


@lru_cache(maxsize=4096)
def compile_glob(pattern: str) -> re.Pattern[str]:
    """`*` matches within one path segment, `**` across segments; everything else is literal.

    Compiled once per distinct pattern: policy patterns at load, scope patterns on first use.
    Any string compiles (all literals are escaped), so matching never raises; whether a
    pattern is well-formed is `pattern_problem`'s question, asked where patterns come in.
    """
    parts = []
    for token in re.split(r"(\*\*|\*)", pattern):
        if token == "**":
            parts.append(".*")
        elif token == "*":
            parts.append("[^/]*")
        else:
            parts.append(re.escape(token))
    return re.compile("".join(parts), re.DOTALL)


def glob_matches(pattern: str, resource: str) -> bool:
    """Does the glob `pattern` cover the whole of `resource`?"""
    return compile_glob(pattern).fullmatch(resource) is not None
