"""Rendering console pages: one Jinja2 environment (autoescaped), the context every page gets."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi.responses import HTMLResponse
from markupsafe import Markup, escape
from starlette.requests import Request
from starlette.templating import Jinja2Templates

from broker.console.browser import browser_of
from broker.display import segments

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


def _when(value: Any) -> str:
    if isinstance(value, str):
        text = value
        try:
            value = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            return text
    if not isinstance(value, datetime):
        return ""
    return _as_utc(value).strftime("%Y-%m-%d %H:%M:%S UTC")


def _as_utc(value: datetime) -> datetime:
    """A naive datetime is taken as UTC; an aware one is converted to UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _iso(value: Any) -> str:
    if isinstance(value, datetime):
        return _as_utc(value).strftime("%Y-%m-%dT%H:%M:%SZ")
    return str(value or "")


def duration(seconds: float | int | None) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    if seconds <= 0:
        return "0 s"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    return f"{secs} s"


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


def visible(value: Any) -> Markup:
    """Agent-controlled text for HTML: escaped, each invisible, direction-changing or look-alike
    character shown as a highlighted `⟦U+XXXX⟧` named in its tooltip (`broker.display`)."""
    if value is None:
        return Markup("")
    parts = []
    for seg in segments(str(value)):
        if seg.marked:
            parts.append(Markup('<mark class="hidden-char" title="{}">{}</mark>').format(seg.name, seg.text))
        else:
            parts.append(escape(seg.text))
    return Markup("").join(parts)


def visible_lines(value: Any) -> Markup:
    """`visible` for preformatted JSON (`pretty`): its own line breaks are layout, kept as they are;
    JSON escapes every control character inside a string, so no agent newline reaches here raw."""
    return Markup("\n").join(visible(line) for line in str(value).split("\n"))


TEMPLATES.env.filters["visible"] = visible
TEMPLATES.env.filters["visible_lines"] = visible_lines
TEMPLATES.env.filters["when"] = _when
TEMPLATES.env.filters["iso"] = _iso
TEMPLATES.env.filters["duration"] = duration
TEMPLATES.env.filters["pretty"] = _pretty


def render(request: Request, template: str, context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    browser = browser_of(request)
    caller = browser.caller()
    base = {"me": caller.name if caller else None, "groups": sorted(caller.groups) if caller else [],
            "csrf_token": browser.csrf_token, "flashes": browser.take_flashes() if caller else [],
            "path": request.url.path}
    return TEMPLATES.TemplateResponse(request, template, {**base, **context}, status_code=status_code)


def render_error(request: Request, status_code: int, code: str, message: str) -> HTMLResponse:
    return render(request, "error.html", {"status": status_code, "code": code, "message": message},
                  status_code=status_code)
