"""broker.jsonbounds: each bound named by its code, iteratively (no stack for depth)."""

from __future__ import annotations

import json

import pytest

from broker.jsonbounds import BODY_LIMITS, PARAMETERS_LIMITS, JsonBoundsError, check, dumps_stored, loads_bounded, loads_stored


@pytest.mark.parametrize("raw,code", [
    ("[" * 33 + "]" * 33, "json-too-deep"),
    ("[" * 200_000 + "]" * 200_000, "json-too-deep"),  # the C decoder's RecursionError, answered
    ('"' + "x" * 65_537 + '"', "json-string-too-long"),
    ("[" + ",".join(["0"] * 10_001) + "]", "json-array-too-long"),
    ("{" + ",".join(f'"{i}":0' for i in range(1001)) + "}", "json-too-many-keys"),
    ("NaN", "json-number-out-of-range"),
    ("-Infinity", "json-number-out-of-range"),
    ("1e400", "json-number-out-of-range"),
    ("9" * 20, "json-number-out-of-range"),
    ("9" * 5000, "json-number-out-of-range"),  # past Python's own int-string limit: still ours
    (str(2**63), "json-number-out-of-range"),
    ('"\\ud800"', "invalid-unicode"),
    ('{"a\\u0000": 1}', "nul-byte"),
])
def test_body_bounds(raw: str, code: str) -> None:
    with pytest.raises(JsonBoundsError) as refused:
        loads_bounded(raw, BODY_LIMITS)
    assert refused.value.code == code


def test_within_bounds_is_returned_as_parsed() -> None:
    raw = '{"a": [1, 2.5, "x", null, true, {"b": -9223372036854775807}], "\\ud83d\\ude00": "\\u00e9"}'
    assert loads_bounded(raw) == json.loads(raw)
    with pytest.raises(ValueError):
        loads_bounded("{not json")


def test_parameters_are_tighter() -> None:
    check({"a": {"b": [1]}}, PARAMETERS_LIMITS)
    with pytest.raises(JsonBoundsError) as refused:
        check({"n": 2**53 + 1}, PARAMETERS_LIMITS)
    assert (refused.value.code, refused.value.path) == ("json-number-out-of-range", "$.n")


def test_stored_values_of_any_depth_read_back() -> None:
    deep: object = 1
    for _ in range(5000):
        deep = [deep]
    text = dumps_stored(deep)
    assert text.startswith("[[[") and dumps_stored(loads_stored(text)) == text  # == on the lists would recurse
