"""Bounded JSON: what the broker accepts at the door, and reading back what it once stored.

Every JSON value a caller sends is checked iteratively (no recursion, so depth costs no stack)
against `JsonLimits` before anything else sees it: nesting depth, string and key length,
array length, keys per object, number range. NaN, Infinity, numbers that overflow a double
(`1e400`), NUL characters and lone UTF-16 surrogates are refused outright: PostgreSQL refuses
NUL in text, UTF-8 cannot encode a lone surrogate, and JSON has no NaN, so each of them would
otherwise surface later as a 500 or as a record no reader can parse.
"""

from __future__ import annotations

import json
import math
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar


@dataclass(frozen=True)
class JsonLimits:
    max_depth: int
    max_string: int  # characters, keys included
    max_array: int
    max_keys: int  # per object
    max_int: int  # |n| <= max_int


# Whole request bodies (<= 1 MiB): generous, but no reader's stack or database column can break.
BODY_LIMITS = JsonLimits(max_depth=32, max_string=64 * 1024, max_array=10_000, max_keys=1_000, max_int=2**63 - 1)
# An agent's free-form `parameters`: stored in leases, approvals and the audit log, shown to
# approvers, so tighter. Integers stay within what every JSON reader holds exactly (2**53).
PARAMETERS_LIMITS = JsonLimits(max_depth=8, max_string=4096, max_array=256, max_keys=128, max_int=2**53)
# ... and 16 KiB of JSON (ASCII-escaped, as `json.dumps` writes it) in all.
PARAMETERS_MAX_BYTES = 16 * 1024


class JsonBoundsError(ValueError):
    """A JSON value outside the limits. `code` is the kebab-case error code; `path` where."""

    def __init__(self, code: str, message: str, path: str = "$") -> None:
        super().__init__(f"{message} (at {path})")
        self.code, self.message, self.path = code, message, path


def _string_problem(text: str, limits: JsonLimits, what: str) -> tuple[str, str] | None:
    if len(text) > limits.max_string:
        return "json-string-too-long", f"{what} longer than {limits.max_string} characters"
    if "\x00" in text:
        return "nul-byte", f"{what} contains a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "invalid-unicode", f"{what} contains a lone UTF-16 surrogate"
    return None


def check(value: Any, limits: JsonLimits) -> None:
    """Raise JsonBoundsError for the first part of `value` outside `limits`. Iterative."""
    stack: list[tuple[Any, int, str]] = [(value, 1, "$")]
    while stack:
        node, depth, path = stack.pop()
        if isinstance(node, dict | list) and depth > limits.max_depth:
            raise JsonBoundsError("json-too-deep", f"nested deeper than {limits.max_depth} levels", path)
        if isinstance(node, dict):
            stack.extend(_object_children(node, depth, path, limits))
        elif isinstance(node, list):
            if len(node) > limits.max_array:
                raise JsonBoundsError("json-array-too-long", f"an array longer than {limits.max_array} items", path)
            stack.extend((child, depth + 1, f"{path}[{i}]") for i, child in enumerate(node))
        else:
            _check_scalar(node, limits, path)


def _object_children(node: dict[Any, Any], depth: int, path: str, limits: JsonLimits) -> list[tuple[Any, int, str]]:
    """An object's values to check next, once its key count and every key are within `limits`."""
    if len(node) > limits.max_keys:
        raise JsonBoundsError("json-too-many-keys", f"an object with more than {limits.max_keys} keys", path)
    children: list[tuple[Any, int, str]] = []
    for key, child in node.items():
        if not isinstance(key, str):
            raise JsonBoundsError("invalid-json", "object keys must be strings", path)
        problem = _string_problem(key, limits, "a key")
        if problem:
            raise JsonBoundsError(*problem, path)
        children.append((child, depth + 1, f"{path}.{key[:64]}"))
    return children


def _check_scalar(node: Any, limits: JsonLimits, path: str) -> None:
    """Raise JsonBoundsError for a string, number, boolean or null outside `limits` (or no JSON value at all)."""
    if isinstance(node, str):
        problem = _string_problem(node, limits, "a string")
        if problem:
            raise JsonBoundsError(*problem, path)
    elif isinstance(node, bool) or node is None:
        return
    elif isinstance(node, int):
        if abs(node) > limits.max_int:
            raise JsonBoundsError("json-number-out-of-range", f"an integer beyond +-{limits.max_int}", path)
    elif isinstance(node, float):
        if not math.isfinite(node):
            raise JsonBoundsError("json-number-out-of-range", "NaN and infinite numbers are not JSON", path)
    else:
        raise JsonBoundsError("invalid-json", f"not a JSON value: {type(node).__name__}", path)


def check_parameters(value: Any) -> None:
    """The bounds on anything stored for a person to read (`parameters`, a tool call's input):
    `PARAMETERS_LIMITS`, then `PARAMETERS_MAX_BYTES`. Depth first: it is what would break a
    reader (and json.dumps) later."""
    check(value, PARAMETERS_LIMITS)
    size = len(json.dumps(value))
    if size > PARAMETERS_MAX_BYTES:
        raise JsonBoundsError("json-too-large", f"{size} bytes of JSON, more than {PARAMETERS_MAX_BYTES}")


def _refuse_constant(name: str) -> Any:
    raise JsonBoundsError("json-number-out-of-range", f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise JsonBoundsError("json-number-out-of-range", "a number beyond the range of a double")
    return number


def _bounded_int(text: str) -> int:
    # Python refuses more than 4300 digits with a ValueError; anything past 19 digits is out of
    # every range we accept, so it is refused without converting it.
    if len(text.lstrip("-")) > 19:
        raise JsonBoundsError("json-number-out-of-range", "an integer with more than 19 digits")
    return int(text)


def loads_bounded(raw: bytes | str, limits: JsonLimits = BODY_LIMITS) -> Any:
    """Parse and check. Raises JsonBoundsError for a value outside the limits and ValueError
    (json.JSONDecodeError, UnicodeDecodeError) for text that is not JSON at all."""
    try:
        value = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except RecursionError:
        raise JsonBoundsError("json-too-deep", f"nested deeper than {limits.max_depth} levels") from None
    check(value, limits)
    return value


T = TypeVar("T")
_DEEP_RECURSION_LIMIT = 20_000
# The recursion limit is process-wide: one deep read at a time, so no thread lowers it back
# while another is still deep inside its parse.
_DEEP = threading.Lock()


def loads_stored(text: str | bytes) -> Any:
    """Read back JSON the broker itself wrote (audit records, API answers of its own).

    Records written before the door refused deep values may nest up to Python's default
    recursion limit; a reader must never fail on them, so a parse that runs out of recursion
    is retried with a higher limit (the C decoder's frames are small; 20,000 fits the stack)."""
    return _tolerating_depth(lambda: json.loads(text))


def dumps_stored(value: Any, **kwargs: Any) -> str:
    """json.dumps for values read by `loads_stored`, with the same tolerance for depth."""
    return _tolerating_depth(lambda: json.dumps(value, **kwargs))


def _tolerating_depth(run: Callable[[], T]) -> T:
    try:
        return run()
    except RecursionError:
        pass
    with _DEEP:
        previous = sys.getrecursionlimit()
        sys.setrecursionlimit(max(previous, _DEEP_RECURSION_LIMIT))
        try:
            return run()
        finally:
            sys.setrecursionlimit(previous)
