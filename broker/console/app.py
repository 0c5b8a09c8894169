"""Mounting the console on the broker's app: routes, static files, the browser middleware."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from broker.console import consent, pages, signin
from broker.console.browser import ConsoleMiddleware
from broker.runtime import Broker

STATIC = Path(__file__).parent / "static"


def install(app: FastAPI) -> None:
    """Add /console/ to `app` (not in the OpenAPI document: it is for people, not programs)."""
    app.include_router(signin.router)
    app.include_router(pages.router)
    app.include_router(consent.router)
    app.mount("/console/static", StaticFiles(directory=STATIC), name="console-static")
    app.add_exception_handler(pages.SignInRequired, pages.sign_in_redirect)
    app.add_middleware(ConsoleMiddleware)


def start(app: FastAPI, broker: Broker) -> None:
    """At start, once the broker exists: the IdP client (None without console IdP sign-in)."""
    broker.settings.check_console()
    app.state.console_oauth = signin.build_oauth(broker)
