"""SPIFFE: IDs and JWT trust bundles, read the way the SPIFFE specs write them.

A SPIFFE ID is `spiffe://<trust domain>/<path>` (SPIFFE-ID spec section 2): the trust domain is
lowercase letters, digits, `.`, `-` and `_`; the path is segments of letters, digits, `.`, `-`
and `_`, none empty, none `.` or `..`; no query, no fragment, no port, no user info. Anything
else is refused, never repaired, so two spellings can never name one workload.

A JWT bundle is a JWK Set (SPIFFE Trust Domain and Bundle spec section 4) whose keys for JWT-SVIDs
carry `use: "jwt-svid"`; keys with another `use` (`x509-svid`) are for TLS and never verify a
token. The bundle comes from a file (kept fresh by whatever delivers it, e.g. the SPIRE agent or
a mounted ConfigMap) or from a bundle endpoint URL (https web PKI; plain http on loopback for
tests). The `spiffe` package on PyPI was not used: it brings gRPC and protobuf for the Workload
API the broker does not call, and its validator neither pins algorithms per trust domain nor
bounds key refreshes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from broker.errors import IdentityProviderUnavailable

SCHEME = "spiffe://"
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
MAX_ID = 2048
JWT_SVID_USE = "jwt-svid"


def trust_domain_of(spiffe_id: str) -> str | None:
    """`spiffe://example.org` for a valid SPIFFE ID of that trust domain; None for anything else."""
    if not isinstance(spiffe_id, str) or len(spiffe_id) > MAX_ID or not spiffe_id.startswith(SCHEME):
        return None
    rest = spiffe_id[len(SCHEME):]
    domain, sep, path = rest.partition("/")
    if not _TRUST_DOMAIN.fullmatch(domain) or not sep:
        return None  # a workload's ID has a path; the bare trust domain names no workload
    for segment in path.split("/"):
        if not _SEGMENT.fullmatch(segment) or segment in (".", ".."):
            return None
    return SCHEME + domain


def is_trust_domain(value: str) -> bool:
    return value.startswith(SCHEME) and _TRUST_DOMAIN.fullmatch(value[len(SCHEME):]) is not None


def jwt_authorities(bundle: Any) -> dict[str, Any]:
    """The bundle as a JWK Set of only its JWT-SVID keys, each marked as a signature key.

    `use: jwt-svid` becomes `use: sig` so the generic JWKS reader takes them; keys without that
    `use` are dropped here, whatever else they are.
    """
    if not isinstance(bundle, dict) or not isinstance(bundle.get("keys"), list):
        raise IdentityProviderUnavailable("the SPIFFE trust bundle is not a JWK Set")
    keys = [dict(k, use="sig") for k in bundle["keys"] if isinstance(k, dict) and k.get("use") == JWT_SVID_USE]
    return {"keys": keys}


def read_bundle_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise IdentityProviderUnavailable(f"cannot read the SPIFFE trust bundle {path.name}: "
                                          f"{exc.__class__.__name__}") from exc
