"""What the approver sees is what the agent sent: every hostile code point (tests/support/
hostile_text.py, by class) in purpose, tool, parameters (keys and values), task id, labels and
(through the tool-call gate) resource is shown as a visible mark on every surface where a person
decides: the console's cards, `broker-cli approvals show` (text and --json), `broker-cli approve`,
and the notification bodies. Approving binds exactly what was shown: the hash the card's form
and the CLI send back, computed from the exact stored value, not from its rendering.

One SQLite broker for the module (the corpus is long; the SQL is the approvals service's, run on
both databases by the bounds and budget tests)."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlmodel import select
from typer.testing import CliRunner

from broker.approvals.binding import Binding
from broker.audit.chain import canonical_json
from broker.cli.main import app as cli_app
from broker.db import transaction
from broker.display import visible
from broker.models import Approval, OutboxMessage
from tests.support.approvals import APPROVALS_POLICY
from tests.support.brokers import Api, BrokerSecrets, LiveServer, build_broker
from tests.support.console import ConsoleBrowser, csrf_of
from tests.support.hostile_text import ALL, ONE_PER_CLASS, ids, marked

BOB = "bob@example.com"
GATE = """\
groups:
  maintainers:
    grants: [{resource: "tool://**", access: [merge_deploy]}]
tools:
  default: allow
  rules:
    - {name: deploys, tool: "(?s).*deploy.*", tier: merge_deploy}
"""
# Every case leaves its approval pending in one broker: the approvers' budget is raised for it.
POLICY = APPROVALS_POLICY.replace("max_active_per_session: 30}",
                                  "max_active_per_session: 30, max_pending_approvals_per_approver: 10000}") + GATE
assert POLICY != APPROVALS_POLICY + GATE
# Characters a page or a terminal also uses for its own layout (and the mark's own bracket):
# for them, the fields are checked for the mark; the page as a whole may hold the character.
LAYOUT = {0x09, 0x0A, 0x0D, 0x27E6}
MARK = re.compile("\u27e6U\\+([0-9A-F]{4,6})\u27e7")


def in_json(c: str) -> str:
    """How `c` shows inside JSON text: JSON's own escape for C0 controls (visible as is), else the mark."""
    return visible(json.dumps(c, ensure_ascii=False)[1:-1])


def unmark(text: str) -> str:
    """The exact text a marked rendering stands for (the rendering is one-to-one)."""
    return MARK.sub(lambda m: chr(int(m.group(1), 16)), text)


@pytest.fixture(scope="module")
def surfaces(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    directory = tmp_path_factory.mktemp("surfaces")
    secrets_ = BrokerSecrets()
    broker = build_broker(directory, f"sqlite:///{directory}/broker.db", secrets_, POLICY,
                          approval_webhook_urls="http://127.0.0.1:9/hook", approval_webhook_secret="s3cret")
    with LiveServer(broker, outbox=False) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        yield Api(server.base_url, secrets_, broker, client)


@pytest.fixture(scope="module")
def bob(surfaces: Api) -> Iterator[ConsoleBrowser]:
    with ConsoleBrowser(surfaces.base_url) as b:
        b.sign_in_with_token(surfaces.secrets.human_tokens[BOB])
        yield b


def hostile_request(api: Api, c: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """A session whose task id and labels carry `c`, and a capability request carrying it in its
    purpose, tool and parameters (keys and values, nested). Returns (session, body, approval id)."""
    session = api.new_session(task_id=f"acme/payments{c}#42", labels={f"team{c}": f"pay{c}ments"},
                              repository=f"acme/pay{c}ments")
    body = {"resource": "jwt://payments-api", "access": "deploy", "ttl_seconds": 300, "tool": f"deploy{c}-cli",
            "purpose": f"ship the fix{c} to prod", "parameters": {f"env{c}": f"prod{c}", "args": [f"--tag=v1{c}"]}}
    r = api.request(session, body)
    assert r.status_code == 202, r.text
    return session, body, r.json()["approval_id"]


def _outbox(api: Api, approval_id: str) -> list[str]:
    with transaction(api.broker.engine) as db:
        return [m.body for m in db.exec(select(OutboxMessage)).all() if approval_id in m.body]


def cli(api: Api, *args: str) -> Any:
    env = {"BROKER_URL": api.base_url, "BROKER_TOKEN": api.secrets.human_tokens[BOB]}
    return CliRunner().invoke(cli_app, list(args), env=env, catch_exceptions=False)


@pytest.mark.parametrize(("kind", "code"), ALL, ids=ids(ALL))
def test_every_surface_shows_hidden_characters_visibly(surfaces: Api, bob: ConsoleBrowser, kind: str,
                                                       code: int) -> None:
    api, c, m = surfaces, chr(code), marked(code)
    session, body, aid = hostile_request(api, c)

    # The console: each field marked, highlighted and named, the warning and the sentence above.
    page = bob.http.get(f"/console/approvals/{aid}").text
    text = html.unescape(re.sub(r"<[^>]+>", "", page))
    j = in_json(c)
    for shown in (f"ship the fix{m} to prod", f"deploy{m}-cli", f"acme/payments{m}#42", f"team{m}", f"pay{m}ments",
                  f"prod{j}", f"env{j}", f"--tag=v1{j}", "Approving lets claude-code"):
        assert shown in text, shown
    assert '<mark class="hidden-char" title="' in page and "Hidden characters." in text
    if code not in LAYOUT:
        assert c not in page  # the character itself reaches no one's screen
    # The form carries the hash of the exact request, and the canonical JSON shown reads back to it.
    form_hash = re.search(r'name="request_hash" value="(sha256:[0-9a-f]{64})"', page)
    assert form_hash is not None
    canonical = re.search(r'<pre class="params canonical agent-text">(.*?)</pre>', page, re.S)
    assert canonical is not None
    shown_json = unmark(html.unescape(re.sub(r"<[^>]+>", "", canonical.group(1))))
    assert shown_json == canonical_json(body["parameters"])
    exact = Binding(session["session_id"], body["resource"], body["access"], body["ttl_seconds"], body["tool"],
                    json.loads(shown_json)).request_hash()
    assert form_hash.group(1) == exact

    # The CLI, text: marks, the sentence, the binding code, the canonical parameters.
    shown_cli = cli(api, "approvals", "show", aid)
    assert shown_cli.exit_code == 0, shown_cli.output
    out = shown_cli.output
    params = visible(canonical_json(body["parameters"]))
    for shown in (f"ship the fix{m} to prod", f"deploy{m}-cli", f"acme/payments{m}#42", f"team{m}=pay{m}ments",
                  "WARNING:", "Approving lets claude-code", f"parameters: {params}"):
        assert shown in out, shown
    if code not in LAYOUT:
        assert c not in out
    # The CLI, --json: ASCII only, the character as its \\u escape, exact once parsed.
    as_json = cli(api, "approvals", "show", aid, "--json")
    assert as_json.exit_code == 0 and as_json.output.isascii()
    assert json.dumps(c)[1:-1] in as_json.output  # \u202e, \n, or a surrogate pair for astral ones
    parsed = json.loads(as_json.output)
    assert parsed["parameters"] == body["parameters"] and parsed["purpose"] == body["purpose"]
    assert m in parsed["display"]["purpose"] and parsed["display"]["hidden_characters"] == [f"U+{code:04X}"]

    # The notification body: ASCII JSON, exact fields, and a display block with the marks.
    bodies = _outbox(api, aid)
    assert len(bodies) == 1 and bodies[0].isascii()
    note = json.loads(bodies[0])["approval"]
    assert note["purpose"] == body["purpose"] and note["parameters"] == body["parameters"]
    d = note["display"]
    assert d["purpose"] == f"ship the fix{m} to prod" and d["tool"] == f"deploy{m}-cli"
    assert d["task_id"] == f"acme/payments{m}#42" and d["labels"] == {f"team{m}": f"pay{m}ments"}
    digits = form_hash.group(1).removeprefix("sha256:").upper()
    assert f"via `deploy{m}-cli`" in d["sentence"] and d["binding_code"] == f"{digits[:4]}-{digits[4:8]}"
    assert unmark(d["parameters_canonical"]) == canonical_json(body["parameters"])
    assert d["hidden_characters"] == [f"U+{code:04X}"] and d["warning"]


@pytest.mark.parametrize(("kind", "code"), ALL, ids=ids(ALL))
def test_a_tool_call_approval_marks_tool_name_resource_and_input(surfaces: Api, bob: ConsoleBrowser, kind: str,
                                                                 code: int) -> None:
    api, c, m = surfaces, chr(code), marked(code)
    session = api.new_session(task_id=f"gate{c}")
    hook = {"hook_event_name": "PreToolUse", "tool_name": f"deploy{c}", "tool_input": {f"target{c}": f"prod{c}"}}
    r = api.client.post("/v1/hooks/pre-tool-use", json=hook,
                        headers={"Authorization": f"Bearer {session['session_token']}"})
    assert r.status_code == 200 and r.json()["hookSpecificOutput"]["permissionDecision"] == "ask", r.text
    aid = re.search(r"approval (apr_[0-9a-f]{32})", r.json()["hookSpecificOutput"]["permissionDecisionReason"])
    assert aid is not None
    page = bob.http.get(f"/console/approvals/{aid.group(1)}").text
    text = html.unescape(re.sub(r"<[^>]+>", "", page))
    j = in_json(c)
    for shown in (f"tool://deploy{m}", f"target{j}", f"prod{j}", f"gate{m}", f"run one `deploy{m}` tool call"):
        assert shown in text, shown
    if code not in LAYOUT:
        assert c not in page
    note = json.loads(_outbox(api, aid.group(1))[0])["approval"]["display"]
    assert note["resource"] == f"tool://deploy{m}" and f"U+{code:04X}" in note["hidden_characters"]


RESOURCE_CASES = [ALL[i] for i in range(0, len(ALL), 5)]


@pytest.mark.parametrize(("kind", "code"), RESOURCE_CASES, ids=ids(RESOURCE_CASES))
def test_a_capability_resource_with_hidden_characters_never_reaches_a_person(surfaces: Api, kind: str,
                                                                             code: int) -> None:
    # Scopes are ASCII by grammar; a resource carrying the character is refused before any approval.
    api = surfaces
    session = api.new_session()
    r = api.request(session, {"resource": f"jwt://payments{chr(code)}-api", "access": "deploy"})
    assert r.status_code in (400, 403, 422) and r.status_code != 202, r.text
    with transaction(api.broker.engine) as db:
        assert db.exec(select(Approval).where(Approval.session_id == session["session_id"])).all() == []


def test_approving_binds_exactly_what_was_shown(surfaces: Api, bob: ConsoleBrowser) -> None:
    api = surfaces
    session, body, aid = hostile_request(api, "\u202e")
    page = bob.http.get(f"/console/approvals/{aid}").text
    shown_hash = re.search(r'name="request_hash" value="(sha256:[0-9a-f]{64})"', page)
    assert shown_hash is not None
    # A form whose hash is not this approval's decides nothing (a stale or forged page).
    for other, status, code in (("sha256:" + "0" * 64, 409, "approval-binding-mismatch"),
                                ("", 400, "invalid-request-hash"), ("not-a-hash", 400, "invalid-request-hash")):
        r = bob.post(f"/console/approvals/{aid}/approve", csrf_token=csrf_of(page), request_hash=other)
        assert (r.status_code, code in r.text) == (status, True), r.text
        got = api.client.get(f"/v1/approvals/{aid}", headers=api.as_admin()).json()
        assert got["status"] == "pending" and got["approvals"] == []
    r = api.client.post(f"/v1/approvals/{aid}/approve", headers=api.as_human(BOB),
                        json={"request_hash": "sha256:" + "1" * 64})
    assert r.status_code == 409 and r.json()["error"]["code"] == "approval-binding-mismatch"
    # The hash shown approves it.
    r = bob.post(f"/console/approvals/{aid}/approve", csrf_token=csrf_of(page), request_hash=shown_hash.group(1))
    assert r.status_code == 303
    # The agent's retry must be the exact request: the same text without the hidden character,
    # or with another, is another request.
    headers = {"Authorization": f"Bearer {session['session_token']}"}
    for changed in ({**body, "purpose": body["purpose"], "parameters": {"env": "prod", "args": ["--tag=v1"]}},
                    {**body, "parameters": {"env\u202d": "prod\u202d", "args": ["--tag=v1\u202d"]}},
                    {**body, "tool": "deploy-cli"}):
        r = api.client.post("/v1/capabilities", headers=headers, json={**changed, "approval_id": aid})
        assert r.status_code == 409 and r.json()["error"]["code"] == "approval-mismatch", r.text
    minted = api.client.post("/v1/capabilities", headers=headers, json={**body, "approval_id": aid})
    assert minted.status_code == 201, minted.text


def test_the_cli_approve_shows_the_request_and_sends_its_hash(surfaces: Api) -> None:
    api = surfaces
    _, _, aid = hostile_request(api, "\u2066")
    wrong = cli(api, "approve", aid, "--binding", "0000-0000")
    assert wrong.exit_code == 1 and "binding-mismatch" in wrong.output
    assert api.client.get(f"/v1/approvals/{aid}", headers=api.as_admin()).json()["status"] == "pending"
    code = api.client.get(f"/v1/approvals/{aid}", headers=api.as_admin()).json()["display"]["binding_code"]
    done = cli(api, "approve", aid, "--binding", code.lower(), "--reason", "read it")
    assert done.exit_code == 0, done.output
    out = done.output
    assert "Approving lets claude-code (acting for alice@example.com) mint one `deploy` credential" in out
    assert f"binding:    {code}" in out and marked(0x2066) in out and "\u2066" not in out
    assert f"{aid}: approved" in out
    approved = api.client.get(f"/v1/approvals/{aid}", headers=api.as_admin()).json()
    assert approved["status"] == "approved" and approved["decided_by"] == BOB


LINE_BREAKS = [(kind, code) for kind, code in ALL if code in (0x0A, 0x0D, 0x85, 0x2028, 0x2029)] + ONE_PER_CLASS


@pytest.mark.parametrize(("kind", "code"), LINE_BREAKS, ids=ids(LINE_BREAKS))
def test_cli_lists_keep_one_line_per_row_and_mark_the_rest(surfaces: Api, kind: str, code: int) -> None:
    # `sessions list` and `audit tail`, where a person picks what to end or revoke: a task id or a
    # tool name carrying a line break cannot forge a row of its own.
    api, c, m = surfaces, chr(code), marked(code)
    session = api.new_session(task_id=f"t{c}ses_{'0' * 32}  active fake@example.com")
    hook = {"hook_event_name": "PreToolUse", "tool_name": f"Read{c}x", "tool_input": {"file_path": "README.md"}}
    assert api.client.post("/v1/hooks/pre-tool-use", json=hook,
                           headers={"Authorization": f"Bearer {session['session_token']}"}).status_code == 200
    env = {"BROKER_URL": api.base_url, "BROKER_TOKEN": api.secrets.admin_token}
    listed = CliRunner().invoke(cli_app, ["sessions", "list"], env=env, catch_exceptions=False)
    assert listed.exit_code == 0, listed.output
    rows = [line for line in listed.output.splitlines() if session["session_id"] in line]
    assert len(rows) == 1 and f"task=t{m}ses_" in rows[0]
    assert not any(line.startswith(f"ses_{'0' * 32}") for line in listed.output.splitlines())
    tail = CliRunner().invoke(cli_app, ["audit", "tail", "--session", session["session_id"]], env=env,
                              catch_exceptions=False)
    assert tail.exit_code == 0, tail.output
    assert f"tool://Read{m}x" in tail.output
    if code not in LAYOUT:
        assert c not in listed.output and c not in tail.output
