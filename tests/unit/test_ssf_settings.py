"""BROKER_SSF_RECEIVER_TOKENS: name=<sha256 hex> entries, checked at start; bad ones named."""

from __future__ import annotations

import hashlib

import pytest

from broker.config import Settings
from broker.errors import ConfigError

DIGEST = hashlib.sha256(b"token").hexdigest()


def test_receiver_tokens_map_their_hash_to_the_name() -> None:
    other = hashlib.sha256(b"other").hexdigest()
    got = Settings(ssf_receiver_tokens=f"siem={DIGEST}, gateway=sha256:{other.upper()}").ssf_receiver_hashes()
    assert got == {DIGEST: "siem", other: "gateway"}
    assert Settings().ssf_receiver_hashes() == {}


@pytest.mark.parametrize("value", [
    "siem", "siem=", f"={DIGEST}", "siem=abc", f"siem={DIGEST}0", f"Siem={DIGEST}", f"si em={DIGEST}",
    f"siem={DIGEST[:-1]}g", f"siem={DIGEST},siem={hashlib.sha256(b'x').hexdigest()}", f"si\u202eem={DIGEST}",
    f"$(id)={DIGEST}", f"{'a' * 64}={DIGEST}",
])
def test_bad_receiver_tokens_are_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="BROKER_SSF_RECEIVER_TOKENS"):
        Settings(ssf_receiver_tokens=value).ssf_receiver_hashes()
