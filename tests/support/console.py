"""A person's browser for the console without a browser: httpx with a cookie jar, reading the
CSRF token from the page as a browser's form would submit it."""

from __future__ import annotations

import re
from typing import Any

import httpx

CSRF = re.compile(r'name="csrf_token" value="([^"]*)"')


def csrf_of(html: str) -> str:
    found = CSRF.search(html)
    assert found, "the page has no form with a CSRF token"
    return found.group(1)


class ConsoleBrowser:
    def __init__(self, base_url: str) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=30, follow_redirects=False)

    def __enter__(self) -> ConsoleBrowser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def sign_in_with_token(self, token: str) -> httpx.Response:
        page = self.http.get("/console/signin")
        assert page.status_code == 200, page.text
        r = self.http.post("/console/signin/token", data={"csrf_token": csrf_of(page.text), "token": token,
                                                          "next": "/console/approvals"})
        assert r.status_code == 303, r.text
        return r

    def csrf(self, path: str = "/console/approvals") -> str:
        page = self.http.get(path)
        assert page.status_code == 200, page.text
        return csrf_of(page.text)

    def post(self, path: str, **data: Any) -> httpx.Response:
        return self.http.post(path, data=data)
