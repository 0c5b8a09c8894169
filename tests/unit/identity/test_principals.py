"""The canonical form of a principal: ASCII case folds, nothing else does, and nothing non-ASCII
or invisible ever becomes a principal (so no two identities the IdP keeps apart become one)."""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime

import pytest
from sqlalchemy import create_engine
from sqlmodel import Session, SQLModel, select

from broker.errors import InvalidPrincipal
from broker.identity.access import human_is
from broker.identity.callers import Caller
from broker.models import SessionRow
from broker.principals import canonical_human, group_problem, principal_problem, same_principal
from broker.sessions.service import may_manage

KATE = "kate@example.com"

# Uppercase ASCII IS the same identity: mail systems and IdPs treat the address so.
SAME_AS_KATE = ["kate@example.com", "KATE@EXAMPLE.COM", "Kate@Example.Com", "kAtE@eXaMpLe.cOm"]

# Spellings of someone who is *not* kate@example.com (or that are not principals at all), each
# of which a Unicode case mapping, NFKC, or a strip() would turn into kate@example.com.
LOOKALIKES_OF_KATE = [
    "\u212aate@example.com",                 # KELVIN SIGN: lower() is "k"
    "kate@exa\u1e3fple.com",                 # m with acute
    "kate@example.\u0441om",                 # Cyrillic es
    "k\u0430te@example.com",                 # Cyrillic a
    "kat\u0435@example.com",                 # Cyrillic ie
    "kate@\u0435xample.com",
    "\u03baate@example.com",                 # Greek kappa
    "kate@examp\u0131e.com",                 # dotless i standing in for l (a lookalike, no case map)
    "kate@example.\u0421OM",                 # Cyrillic ES, uppercase
    "\u0130kate@example.com",                # I WITH DOT ABOVE: lower() is "i" + U+0307
    "kate@examp\u0130e.com",
    "kate@\u017fexample.com",                # LONG S: upper() is "S"
    "\uff4bate@example.com",                 # fullwidth k: NFKC is "k"
    "\uff2bATE@EXAMPLE.COM",                 # fullwidth K
    "kate\uff20example.com",                 # fullwidth @
    "kate@example\uff0ecom",                 # fullwidth full stop
    "kate@example.com\u3002",                # ideographic full stop
    "\ufb00kate@example.com",                # LATIN SMALL LIGATURE FF
    "kate@\ufb01example.com",                # fi ligature
    "ka\u0301te@example.com",                # combining acute
    "kate\u0308@example.com",                # combining diaeresis
    "k\u0338ate@example.com",                # combining solidus overlay
    "kate@example.com\u00a0",                # NBSP after
    "\u00a0kate@example.com",                # NBSP before
    "kate@exam\u00a0ple.com",                # NBSP inside
    "\u3000kate@example.com",                # ideographic space
    "kate@example.com\u3000",
    "kate@example.com\u2003",                # em space
    "kate@example.com\u200b",                # zero-width space
    "ka\u200bte@example.com",
    "\u200dkate@example.com",                # zero-width joiner
    "kate\u200c@example.com",                # zero-width non-joiner
    "\ufeffkate@example.com",                # BOM / zero-width no-break space
    "kate@example.com\u2060",                # word joiner
    "\u202ekate@example.com",                # right-to-left override
    "kate@example.com\u202c",                # pop directional formatting
    "\u2066kate@example.com\u2069",          # isolates
    "kate\u200f@example.com",                # right-to-left mark
    "kate@example.com\u00ad",                # soft hyphen
    " kate@example.com",                     # ASCII space around: strip() would merge these
    "kate@example.com ",
    "kate@example.com\t",
    "kate@example.com\n",
    "\rkate@example.com",
    "kate@example.com\x00",
    "kate@example.com\x7f",
    "kate@example.com\u0085",                # next line (C1 control)
    "kate@example.com\u2028",                # line separator
    "kate@\U000e0001example.com",            # language tag
    "kate@b\u00fccher.example",              # a U-label domain: write its A-label
    "kate@example.c\u00f6m",
    "",
]

NOT_PRINCIPALS = [
    None, 1, ["kate@example.com"], "a" * 321, "@example.com", "kate@", "kate@@example.com", "kate@a@example.com",
    "kate@-example.com", "kate@example-.com", "kate@exa_mple.com", "kate@example..com", "kate@.example.com",
    "kate@xn--.com", "kate@xn--zz-zzzzz.com", "kate@" + "a" * 64 + ".com",
]

# Principals that are fine, with their canonical forms.
GOOD = [
    ("kate@example.com", "kate@example.com"),
    ("Kate.O'Brien+ci@Example.COM", "kate.o'brien+ci@example.com"),
    ("kate@XN--BCHER-KVA.example", "kate@xn--bcher-kva.example"),   # an A-label
    ("auth0|5f7c8ec7c33c6c004bbafe82", "auth0|5f7c8ec7c33c6c004bbafe82"),  # an opaque `sub`
    ("248289761001", "248289761001"),
]


@pytest.mark.parametrize("written", SAME_AS_KATE)
def test_ascii_case_is_one_identity(written: str) -> None:
    assert canonical_human(written) == KATE
    assert same_principal(written, KATE)


@pytest.mark.parametrize(("written", "canonical"), GOOD)
def test_canonical_forms(written: str, canonical: str) -> None:
    assert principal_problem(written) is None
    assert canonical_human(written) == canonical
    assert canonical_human(canonical) == canonical  # idempotent


@pytest.mark.parametrize("lookalike", LOOKALIKES_OF_KATE + NOT_PRINCIPALS)
def test_lookalikes_and_malformed_names_are_refused_never_mapped(lookalike: object) -> None:
    assert principal_problem(lookalike) is not None
    with pytest.raises(InvalidPrincipal) as refused:
        canonical_human(lookalike)
    assert (refused.value.status, refused.value.code) == (400, "invalid-principal")
    assert not same_principal(lookalike, KATE)  # type: ignore[arg-type]  # non-strings are in the corpus


def test_the_corpus_holds_the_classic_case_mapping_attacks() -> None:
    """The corpus is what the attack used: these map to ASCII under Python's own case mapping."""
    assert "\u212a".lower() == "k" and "\u017f".upper() == "S" and "\u0130".lower().startswith("i")
    assert unicodedata.normalize("NFKC", "\uff4b\ufb00") == "kff"
    assert "\u212aate@example.com".lower() == KATE  # what the broker used to do, and why it was wrong


@pytest.mark.parametrize(("stored", "caller"), [
    ("kate@example.com", "KATE@Example.COM"),
    ("KATE@Example.COM", "kate@example.com"),  # a row from before sessions stored the canonical form
])
def test_a_human_sees_their_sessions_whatever_the_ascii_case(stored: str, caller: str) -> None:
    now = datetime.now(UTC)
    row = SessionRow(id="ses_1", human=stored, agent="a", task_id="t", scope=[], labels={}, status="active",
                     created_by="orch", created_at=now, expires_at=now)
    assert may_manage(Caller(kind="human", name=caller), row)
    assert not may_manage(Caller(kind="human", name="mallory@example.com"), row)


@pytest.mark.parametrize("stored", ["\u212aate@example.com", "\u212aATE@EXAMPLE.COM", "kate@example.com\u200b",
                                    "\u0130kate@example.com", "\u0131kate@example.com"])
def test_a_legacy_row_with_a_lookalike_is_nobody_s(stored: str) -> None:
    """In Python and in SQL: a row whose name only case-maps to Kate's is not Kate's."""
    now = datetime.now(UTC)
    row = SessionRow(id="ses_1", human=stored, agent="a", task_id="t", scope=[], labels={}, status="active",
                     created_by="orch", created_at=now, expires_at=now)
    assert not may_manage(Caller(kind="human", name=KATE), row)
    engine = create_engine("sqlite://")
    SQLModel.metadata.create_all(engine, tables=[SessionRow.__table__])  # type: ignore[list-item]  # SQLModel's table
    with Session(engine) as db:
        db.add(row)
        db.add(SessionRow(id="ses_2", human="KATE@example.com", agent="a", task_id="t", scope=[], labels={},
                          status="active", created_by="orch", created_at=now, expires_at=now))
        db.commit()
        assert db.exec(select(SessionRow.id).where(human_is(KATE))).all() == ["ses_2"]


@pytest.mark.parametrize("name", ["maintainers", "/acme/maintainers", "Entwickler-\u00c4", "a" * 256])
def test_group_names(name: str) -> None:
    assert group_problem(name) is None


@pytest.mark.parametrize("name", ["", " ", "a b", "a\u00a0", "\u3000a", "a\u200b", "\u202ea", "a\u2066", "\ufeffa",
                                  "a\x00", "a\n", "a\u2028", "\ue000", "a" * 257, None, 3, ["a"]])
def test_group_names_without_invisible_characters(name: object) -> None:
    assert group_problem(name) is not None
