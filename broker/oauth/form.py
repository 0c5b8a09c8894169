"""Form-encoded request bodies (RFC 6749 appendix B): each parameter at most once, unless allowed."""

from __future__ import annotations

from typing import Literal, overload
from urllib.parse import parse_qs

from broker.oauth.errors import OAuthError

MAX_VALUE = 16 * 1024


def parse(raw: bytes, content_type: str, *, repeatable: frozenset[str] = frozenset()) -> dict[str, list[str]]:
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/x-www-form-urlencoded":
        raise OAuthError("invalid_request", "the body must be application/x-www-form-urlencoded",
                         code="unsupported-media-type")
    try:
        text = raw.decode("utf-8")
        params = parse_qs(text, keep_blank_values=True, strict_parsing=False, max_num_fields=64)
    except (UnicodeDecodeError, ValueError):
        raise OAuthError("invalid_request", "the body is not a valid form", code="invalid-form") from None
    for name, values in params.items():
        if len(values) > 1 and name not in repeatable:
            raise OAuthError("invalid_request", f"parameter {name} is repeated", code="repeated-parameter")
        for value in values:
            if "\x00" in value or len(value) > MAX_VALUE:
                raise OAuthError("invalid_request", f"parameter {name} is not acceptable", code="invalid-parameter")
    return params


@overload
def one(params: dict[str, list[str]], name: str, *, required: Literal[True]) -> str: ...
@overload
def one(params: dict[str, list[str]], name: str, *, required: bool = False) -> str | None: ...


def one(params: dict[str, list[str]], name: str, *, required: bool = False) -> str | None:
    """The parameter's one value; a missing or empty one is None, or refused when `required`."""
    values = params.get(name)
    if not values or values[0] == "":
        if required:
            raise OAuthError("invalid_request", f"parameter {name} is required", code="missing-parameter")
        return None
    return values[0]
