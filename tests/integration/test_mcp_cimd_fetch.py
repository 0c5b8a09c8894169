"""Client ID Metadata Document fetching on its own (`broker.oauth.clients.ClientDirectory`), against
a real HTTP server on loopback: the cache and its bound, no redirects followed, the time limit,
and the loopback test setting being the only way to http or loopback at all."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from broker.config import Settings
from broker.oauth.clients import ClientDirectory
from broker.oauth.errors import OAuthError
from tests.integration.test_mcp_authorization_refusals import Documents

REDIRECT = "http://127.0.0.1:9/callback"


@pytest.fixture
def docs() -> Iterator[Documents]:
    server = Documents()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def _directory(**settings: object) -> ClientDirectory:
    return ClientDirectory(Settings(cimd_allow_loopback=True, **settings))  # type: ignore[arg-type]


def _doc(docs: Documents, path: str) -> str:
    url = docs.serve(path, b"")
    docs.serve(path, {"client_id": url, "redirect_uris": [REDIRECT], "client_name": path})
    return url


def test_documents_are_cached_and_the_cache_is_bounded(docs: Documents) -> None:
    clients = _directory(cimd_cache_entries=2, cimd_cache_seconds=300)
    a, b, c = (_doc(docs, f"/{n}/client.json") for n in "abc")
    for _ in range(3):
        assert clients.resolve(a).redirect_uris == (REDIRECT,)
    assert docs.hits["/a/client.json"] == 1  # one fetch for a burst
    clients.resolve(b)
    clients.resolve(c)  # a is the least recently used: evicted
    clients.resolve(a)
    assert docs.hits["/a/client.json"] == 2 and docs.hits["/c/client.json"] == 1


def test_a_cache_time_of_zero_fetches_every_time(docs: Documents) -> None:
    clients = _directory(cimd_cache_seconds=0)
    url = _doc(docs, "/nocache/client.json")
    clients.resolve(url)
    clients.resolve(url)
    assert docs.hits["/nocache/client.json"] == 2


def test_redirects_are_not_followed(docs: Documents) -> None:
    target = _doc(docs, "/target/client.json")
    url = docs.base + "/moved/client.json"
    docs.redirects["/moved/client.json"] = target
    with pytest.raises(OAuthError) as refused:
        _directory().resolve(url)
    assert refused.value.code == "client-metadata-unavailable" and "/target/client.json" not in docs.hits


def test_a_slow_document_times_out(docs: Documents) -> None:
    url = _doc(docs, "/slow/client.json")
    docs.delays["/slow/client.json"] = 3
    started = time.monotonic()
    with pytest.raises(OAuthError) as refused:
        _directory(cimd_timeout_seconds=0.5).resolve(url)
    assert refused.value.code == "client-metadata-unreachable" and time.monotonic() - started < 2.5


@pytest.mark.parametrize("path", ["/x/client.json"])
def test_without_the_test_setting_http_and_loopback_are_refused(docs: Documents, path: str) -> None:
    url = _doc(docs, path)
    strict = ClientDirectory(Settings())
    with pytest.raises(OAuthError) as refused:
        strict.resolve(url)
    assert refused.value.code == "invalid-client-metadata-url"  # http
    with pytest.raises(OAuthError) as refused:
        strict.resolve(url.replace("http://", "https://"))
    assert refused.value.code == "client-metadata-private-address"  # https, but loopback
    assert path not in docs.hits


@pytest.mark.parametrize("host", ["localhost", "127.0.0.2", "[::1]", "[::ffff:127.0.0.1]", "0x7f.1", "2130706433"])
def test_loopback_in_any_spelling_is_refused_without_the_test_setting(host: str) -> None:
    with pytest.raises(OAuthError) as refused:
        ClientDirectory(Settings()).resolve(f"https://{host}/client.json")
    assert refused.value.code in ("client-metadata-private-address", "client-metadata-unreachable",
                                  "invalid-client-metadata-url")
