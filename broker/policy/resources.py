"""The resource grammar: one parser per scheme, one canonical form, and the globs that match it.

A resource is decided on once, before any layer of the decision: the string is checked
character by character, split into segments, parsed by its scheme's rule and turned into its
canonical form. Policy matching, the audit, the lease and the provider's backend call all use
that canonical form, so nothing downstream (an HTTP client, OpenBao's router, an SDK) can read
the resource differently from the policy that allowed it.

    uri       = scheme "://" segment *( "/" segment )
    scheme    = lowercase letter, then up to 31 of [a-z0-9+.-]
    segment   = 1*( ALPHA / DIGIT / "." / "_" / "~" / "@" / "+" / "=" / "," / ":" / "-" )
                and never "." or ".."

Refused outright (never decoded, never normalised): percent-encoding (`%2e%2e` is how a
path escapes a prefix after the check), dot segments, empty segments (`a//b`, a leading or
trailing `/`), control characters and NUL, whitespace, `\\`, `?`, `#` and every other
character outside the set above, non-ASCII text (and text that is not NFC), and a trailing
newline (every match here is anchored at the very end, `\\Z`, never `$`).

Per scheme, on top of that, the scheme's own grammar: each provider package declares the scheme
it defines (`Provider.grammar`, broker/grammar.py), and this module asks the installed providers
for it (`broker.grammar.grammars`), so the rules of `github://`, `aws://` ... live in their provider's
package (docs/providers/*.md name them). A scheme no installed provider declares takes the
generic grammar alone: `<scheme>://<segment>[/<segment>...]`, as written.

Patterns (policy rules, grants, task scopes, kill-switch filters) follow the same grammar with
`*` allowed inside segments: `*` matches within one segment, `**` across segments. Their
literal text is canonicalised the same way (lower-cased where the scheme's grammar is
case-insensitive).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from functools import lru_cache
from typing import NamedTuple, TypeVar

from broker.errors import InvalidRequest
from broker.grammar import ResourceGrammar, ResourceRefused, grammars

T = TypeVar("T")

MAX_RESOURCE_LENGTH = 512

_SCHEME = re.compile(r"[a-z][a-z0-9+.-]{0,31}")
_SEGMENT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._~@+=,:-")
# Fast paths for text that passes (every request's resource does): printable ASCII, no space, is
# already NFC and has none of the characters the loop in `_characters` refuses; a segment made of
# `_SEGMENT_CHARS` alone has nothing stray. Text that fails them takes the slow path, which names
# the problem.
_PRINTABLE_ASCII = re.compile(r"[\x21-\x7e]*")
_SEGMENT = re.compile(r"[A-Za-z0-9._~@+=,:-]+")


def _grammar(scheme: str) -> ResourceGrammar | None:
    for grammar in grammars().values():
        if grammar.scheme == scheme:
            return grammar
    return None


class Resource(NamedTuple):
    """A parsed, canonical resource. Compares equal to the old `(scheme, path)` pair."""

    scheme: str
    path: str  # the canonical segments joined by "/"

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path.split("/"))

    @property
    def uri(self) -> str:
        return f"{self.scheme}://{self.path}"


_Refused = ResourceRefused


def _characters(uri: object) -> str:
    """Checks on the raw text, before it is split: these decide what the text *is*."""
    if not isinstance(uri, str):
        raise _Refused("must be a string")
    if len(uri) > MAX_RESOURCE_LENGTH:
        raise _Refused(f"longer than {MAX_RESOURCE_LENGTH} characters")
    if _PRINTABLE_ASCII.fullmatch(uri) is not None:
        if "%" in uri:
            raise _Refused("must not be percent-encoded")
        return uri
    if unicodedata.normalize("NFC", uri) != uri:
        raise _Refused("is not NFC-normalised unicode")
    for ch in uri:
        if ch == "\x00":
            raise _Refused("contains a NUL byte")
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            raise _Refused(f"contains a control character (U+{ord(ch):04X})")
        if ch.isspace():
            raise _Refused("contains whitespace")
        if ord(ch) > 0x7E:
            raise _Refused("must be ASCII")
    if "%" in uri:
        # Never decoded: a decoded "%2e%2e" is a ".." the check above did not see.
        raise _Refused("must not be percent-encoded")
    return uri


def _split(uri: str, *, pattern: bool) -> tuple[str, list[str]]:
    scheme, sep, path = uri.partition("://")
    if not sep or _SCHEME.fullmatch(scheme) is None:
        raise _Refused('must look like "<scheme>://<path>" with a lowercase scheme')
    if not path:
        raise _Refused("has an empty path")
    segments = path.split("/")
    for segment in segments:
        if not segment:
            raise _Refused("has an empty path segment (a leading, trailing or doubled \"/\")")
        if segment in (".", ".."):
            raise _Refused(f'has a dot segment "{segment}"')
        if _SEGMENT.fullmatch(segment) is not None:
            continue
        stray = sorted({ch for ch in segment if ch not in _SEGMENT_CHARS and not (pattern and ch == "*")})
        if stray:
            if "*" in stray:
                raise _Refused('must be a concrete resource: "*" is only allowed in policy patterns')
            shown = "".join(stray)
            raise _Refused(f"contains characters outside [A-Za-z0-9._~@+=,:-]: {shown!r}")
    return scheme, segments


def _parse(uri: object) -> Resource:
    text = _characters(uri)
    scheme, segments = _split(text, pattern=False)
    grammar = _grammar(scheme)
    if grammar is not None:
        segments = grammar.canonical(segments)
    return Resource(scheme, "/".join(segments))


def _parse_pattern(pattern: object) -> str:
    text = _characters(pattern)
    scheme, segments = _split(text, pattern=True)
    if "*" not in text:
        return _parse(text).uri  # a concrete resource: the scheme's own rule applies in full
    grammar = _grammar(scheme)
    if grammar is not None and grammar.case_insensitive:
        segments = [s.lower() for s in segments]
    return f"{scheme}://{'/'.join(segments)}"


def parse_resource(uri: str) -> Resource:
    """The canonical form of a concrete resource; InvalidRequest `invalid-resource` otherwise."""
    return _or_invalid(_parse, "resource", uri)


def _or_invalid(parse: Callable[[str], T], what: str, text: str) -> T:
    """`parse(text)`, its refusal turned into InvalidRequest `invalid-resource` naming `what`."""
    try:
        return parse(text)
    except _Refused as exc:
        raise InvalidRequest(f"{what} {text!r} {exc}", code="invalid-resource") from None


def canonical_resource(uri: str) -> str:
    """parse_resource(uri) as the one string every layer and provider uses."""
    return parse_resource(uri).uri


def resource_problem(uri: str) -> str | None:
    """Why `uri` is not a concrete resource in canonical form, or None when it is."""
    try:
        canonical = _parse(uri).uri
    except _Refused as exc:
        return str(exc)
    if canonical != uri:
        return f"is not in canonical form (write {canonical!r})"
    return None


def pattern_problem(pattern: str) -> str | None:
    """Why `pattern` is not a valid resource glob ("<scheme>://<glob>"), or None."""
    try:
        _parse_pattern(pattern)
    except _Refused as exc:
        return str(exc)
    return None


def canonical_pattern(pattern: str) -> str:
    """The canonical form of a resource glob, or InvalidRequest `invalid-resource`."""
    return _or_invalid(_parse_pattern, "resource pattern", pattern)


def validate_pattern(pattern: str) -> str:
    """Return the canonical form of `pattern` if it is a valid resource glob, else raise InvalidRequest."""
    return canonical_pattern(pattern)


def is_glob(pattern: str) -> bool:
    return "*" in pattern


_STAR, _DOUBLE_STAR = "*", "**"


class Glob:
    """A compiled resource pattern: `*` matches within one segment, `**` across segments,
    everything else is literal, and the whole resource must be covered.

    Matched by simulating the pattern's automaton over the resource, one character at a time,
    keeping the set of pattern positions still alive (at most len(pattern) + 1 of them). No
    backtracking: the work is bounded by (len(pattern) + 1) * len(resource) steps whatever the
    input, where a backtracking regex took seconds on `jwt://*a*a*a*a*a*a*a*a*b`.
    """

    __slots__ = ("_one_star", "_prefix", "_suffix", "_tokens", "pattern")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        tokens: list[str] = []
        i = 0
        while i < len(pattern):  # "***" is "**" then "*", as the regex it replaces read it
            if pattern.startswith("**", i):
                tokens.append(_DOUBLE_STAR)
                i += 2
            elif pattern[i] == "*":
                tokens.append(_STAR)
                i += 1
            else:
                tokens.append(pattern[i])
                i += 1
        self._tokens = tuple(tokens)
        # Literal text before the first and after the last star: a cheap first refusal.
        self._prefix = pattern.split("*", 1)[0]
        self._suffix = pattern.rsplit("*", 1)[1] if "*" in pattern else ""
        # Nearly every real pattern has one star (`repo/*`, `secret/data/app/**`, `a-*-b`):
        # then the text between prefix and suffix is all the star takes, checked in one pass.
        stars = [t for t in tokens if t in (_STAR, _DOUBLE_STAR)]
        self._one_star = stars[0] if len(stars) == 1 else None

    def __repr__(self) -> str:
        return f"Glob({self.pattern!r})"

    def matches(self, resource: str) -> bool:
        star = self._one_star
        if star is None:
            return self.match_counting(resource)[0]
        prefix, suffix = self._prefix, self._suffix
        if (len(resource) < len(prefix) + len(suffix) or not resource.startswith(prefix)
                or not resource.endswith(suffix)):
            return False
        return star == _DOUBLE_STAR or "/" not in resource[len(prefix):len(resource) - len(suffix)]

    def match_counting(self, resource: str) -> tuple[bool, int]:
        """(does it match, how many transitions were examined): the count is the proof of the bound."""
        if "*" not in self.pattern:
            return self.pattern == resource, 0
        if (len(resource) < len(self._prefix) + len(self._suffix) or not resource.startswith(self._prefix)
                or not resource.endswith(self._suffix)):
            return False, 0
        tokens, end = self._tokens, len(self._tokens)
        mark = [-1] * (end + 1)  # mark[i] == g: position i is already alive after g characters
        steps = 0

        def alive(i: int, gen: int, into: list[int]) -> None:
            # A star may match nothing, so reaching it also reaches the position after it.
            while mark[i] != gen:
                mark[i] = gen
                into.append(i)
                if i == end or tokens[i] not in (_STAR, _DOUBLE_STAR):
                    return
                i += 1

        active: list[int] = []
        alive(0, 0, active)
        for gen, ch in enumerate(resource, 1):
            following: list[int] = []
            for i in active:
                steps += 1
                if i == end:
                    continue
                token = tokens[i]
                if token == _DOUBLE_STAR or (token == _STAR and ch != "/"):
                    alive(i, gen, following)  # the star takes this character and stays
                elif token == ch:
                    alive(i + 1, gen, following)
            if not following:
                return False, steps
            active = following
        return mark[end] == len(resource), steps


@lru_cache(maxsize=4096)
def compile_glob(pattern: str) -> Glob:
    """Compiled once per distinct pattern: policy patterns at load, scope patterns on first use.

    Any string compiles, so matching never raises; whether a pattern is well-formed is
    `pattern_problem`'s question, asked where patterns come in.
    """
    return Glob(pattern)


def glob_matches(pattern: str, resource: str) -> bool:
    """Does the glob `pattern` cover the whole of `resource`?"""
    return compile_glob(pattern).matches(resource)
