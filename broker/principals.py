"""The one canonical form of a human principal: how humans are written, stored and compared everywhere.

Two spellings are the same human only when their canonical forms are equal, and the canonical
form never merges two identities the identity provider keeps apart. It is stricter than PRECIS
(RFC 8264/8265 UsernameCaseMapped), on purpose:

- 1 to 320 characters, every one printable ASCII (U+0021 to U+007E). Whitespace (NBSP and the
  ideographic space included), control and format characters (zero-width, bidi controls) and
  every other non-ASCII character are refused, never removed or mapped: Unicode case mapping
  turns some non-ASCII letters into ASCII ones (KELVIN SIGN U+212A lowercases to "k", LONG S
  U+017F uppercases to "S", U+0130 "İ" lowercases to "i" plus a combining dot), and NFKC turns
  fullwidth letters and ligatures into ASCII, so any mapping of them would let an account that
  is *not* kate@example.com act as her.
- ASCII letters are case-folded (A-Z to a-z) and nothing else changes: `Kate@Example.COM` is
  `kate@example.com`, as mail systems and IdPs treat it.
- With an "@", it is an address: one "@", a non-empty local part, and a domain of DNS labels
  (letters, digits, hyphens). An internationalised domain is written as its IDNA A-label
  (`xn--...`), which must decode; the Unicode form (U-label) is non-ASCII and refused.
- Without an "@" it is an opaque name (`sub`, `preferred_username`): the same character rules.

The broker has no opt-in for non-ASCII principals: an IdP whose people have non-ASCII addresses
names them to the broker by an ASCII claim (`sub`, or an A-label `upn`), set with
BROKER_OIDC_PRINCIPAL_CLAIM. Group names are compared exactly (no case folding); they may hold
any printable character except whitespace, control and format characters.
"""

from __future__ import annotations

import functools
import unicodedata

import idna

from broker.errors import InvalidPrincipal

MAX_LENGTH = 320
MAX_GROUP_LENGTH = 256
_LDH = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
_ASCII_UPPER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
# Unicode general categories no name may carry: separators (spaces, line and paragraph
# separators), controls, format (zero-width, bidi), surrogates, private use, unassigned.
_INVISIBLE = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf", "Cs", "Co", "Cn"})


def _describe(char: str) -> str:
    return f"U+{ord(char):04X} {unicodedata.name(char, 'unnamed character')}"


def _domain_problem(domain: str) -> str | None:
    if not domain or len(domain) > 253:
        return "its domain is empty or longer than 253 characters"
    for label in domain.split("."):
        if not label or len(label) > 63 or not set(label) <= _LDH or label[0] == "-" or label[-1] == "-":
            return f"its domain label {label!r} is not letters, digits and inner hyphens"
        if label.startswith("xn--"):
            try:
                # An A-label must be what IDNA 2008 itself would write for its U-label.
                if idna.encode(idna.decode(label)).decode() != label:
                    return f"its domain label {label!r} is not a canonical IDNA A-label"
            except idna.IDNAError:
                return f"its domain label {label!r} is not a valid IDNA A-label"
    return None


def principal_problem(value: object) -> str | None:
    """Why `value` cannot be a principal, or None when it can (then `canonical_human` maps it)."""
    if not isinstance(value, str):
        return "a principal is a string"
    return _string_problem(value)


@functools.lru_cache(maxsize=4096)  # every decision asks it of the same few humans
def _string_problem(value: str) -> str | None:
    if not 1 <= len(value) <= MAX_LENGTH:
        return f"a principal is 1 to {MAX_LENGTH} characters"
    for char in value:
        if not "!" <= char <= "~":
            kind = "whitespace, control or format" if char.isspace() or not char.isprintable() else "non-ASCII"
            return f"a principal is printable ASCII only; it holds {kind} character {_describe(char)}"
    folded = value.translate(_ASCII_UPPER)
    if "@" in folded:
        local, _, domain = folded.partition("@")
        if not local or "@" in domain:
            return "an address has one '@' and a non-empty local part"
        return _domain_problem(domain)
    return None


def canonical_human(principal: object) -> str:
    """The canonical form of a human principal (see the module docstring), or InvalidPrincipal.

    The only place a principal is case-folded: everything else compares canonical forms.
    """
    problem = principal_problem(principal)
    if problem is not None:
        raise InvalidPrincipal(problem)
    assert isinstance(principal, str)  # noqa: S101  # type narrowing only: principal_problem refused non-strings
    return principal.translate(_ASCII_UPPER)


def same_principal(a: str, b: str) -> bool:
    """Whether `a` and `b` name one human; a name with no canonical form is nobody."""
    return principal_problem(a) is None and principal_problem(b) is None and canonical_human(a) == canonical_human(b)


def group_problem(value: object) -> str | None:
    """Why `value` cannot be a group name, or None. Groups are compared exactly, never folded."""
    if not isinstance(value, str):
        return "a group name is a string"
    if not 1 <= len(value) <= MAX_GROUP_LENGTH:
        return f"a group name is 1 to {MAX_GROUP_LENGTH} characters"
    for char in value:
        if unicodedata.category(char) in _INVISIBLE:
            return f"a group name holds whitespace, control or format character {_describe(char)}"
    return None
