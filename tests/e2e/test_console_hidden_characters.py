"""Hidden characters in real Chromium: an agent's purpose and parameters carrying bidi overrides,
isolates and zero-width characters are rendered as highlighted ⟦U+XXXX⟧ marks, the text after
a right-to-left override is laid out left to right where it stands (no Trojan Source reordering),
and the Approve button posts the hash of exactly the request shown. Screenshots go to a temporary
directory (the tracked tree is left alone)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.test_approval_surfaces import POLICY
from tests.support.brokers import Api, BrokerSecrets, LiveServer, build_broker
from tests.support.browser import DESKTOP
from tests.support.hostile_text import ONE_PER_CLASS, marked

BOB = "bob@example.com"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Api]:
    secrets_ = BrokerSecrets()
    broker = build_broker(tmp_path, f"sqlite:///{tmp_path}/broker.db", secrets_, POLICY)
    with LiveServer(broker) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        yield Api(server.base_url, secrets_, broker, client)


# In source order the purpose reads "pay invoice ‮exe.tset‬ now": with the override honoured a
# person would see "pay invoice test.exe now".
PURPOSE = "pay invoice \u202eexe.tset\u202c now \u2066hidden\u2069 \u200bzero"


def test_the_browser_shows_marks_in_place_and_approves_the_shown_hash(served: Api, chromium: Any,
                                                                      tmp_path: Path) -> None:
    api = served
    session = api.new_session(task_id="acme/payments#7\u200f")
    params = {f"k{i}\u202e": f"v{chr(code)}" for i, (_, code) in enumerate(ONE_PER_CLASS) if code not in (0x0A, 0x0D)}
    asked = api.request(session, {"resource": "jwt://payments-api", "access": "deploy", "ttl_seconds": 300,
                                  "tool": "deploy\u200d-cli", "purpose": PURPOSE, "parameters": params})
    assert asked.status_code == 202, asked.text
    aid = asked.json()["approval_id"]
    expected_hash = api.client.get(f"/v1/approvals/{aid}", headers=api.as_admin()).json()["request_hash"]

    context = chromium.new_context(viewport=DESKTOP)
    try:
        page = context.new_page()
        page.goto(api.base_url + "/console/signin")
        page.fill("#token", api.secrets.human_tokens[BOB])
        page.click("form.token button[type=submit]")
        page.wait_for_url("**/console/approvals")
        page.goto(f"{api.base_url}/console/approvals/{aid}")
        card = page.locator(f"#card-{aid}")
        purpose = card.locator("dd.purpose")
        rendered = purpose.inner_text()
        assert rendered == ("pay invoice " + marked(0x202E) + "exe.tset" + marked(0x202C) + " now " + marked(0x2066)
                            + "hidden" + marked(0x2069) + " " + marked(0x200B) + "zero")
        assert "\u202e" not in card.inner_text() and "\u200b" not in card.inner_text()
        marks = card.locator("mark.hidden-char")
        assert marks.count() >= 5 + len(params)
        assert marks.first.evaluate("m => getComputedStyle(m).backgroundColor") == "rgb(255, 212, 0)"
        assert "RIGHT-TO-LEFT OVERRIDE" in (purpose.locator("mark").first.get_attribute("title") or "")
        # Laid out as stored: each piece of the purpose starts to the right of the one before it.
        lefts = purpose.evaluate("""dd => {
            const out = [];
            for (const node of dd.childNodes) {
                const range = document.createRange();
                range.selectNodeContents(node);
                const rects = range.getClientRects();
                if (rects.length) out.push(rects[0].left);
            }
            return out;
        }""")
        assert len(lefts) >= 8 and lefts == sorted(lefts), lefts
        # "exe.tset" is drawn in its stored order: its 'e' left of its 't'.
        order = purpose.evaluate("""dd => {
            const text = [...dd.childNodes].find(n => n.nodeType === 3 && n.textContent === 'exe.tset');
            const at = i => { const r = document.createRange(); r.setStart(text, i); r.setEnd(text, i + 1);
                              return r.getBoundingClientRect().left; };
            return [at(0), at(7)];
        }""")
        assert order[0] < order[1]
        assert "Hidden characters." in card.inner_text() and "Approving lets claude-code" in card.inner_text()
        assert card.locator("input[name=request_hash]").get_attribute("value") == expected_hash
        assert expected_hash[7:11].upper() in card.locator("code.binding-code").inner_text()
        page.screenshot(path=str(tmp_path / "hidden-characters.png"), full_page=True)
        card.locator("button.approve").click()
        page.wait_for_url(f"{api.base_url}/console/approvals/{aid}")
        assert "Approved:" in page.inner_text("main")
    finally:
        context.close()
    decided = api.client.get(f"/v1/approvals/{aid}", headers=api.as_admin()).json()
    assert decided["status"] == "approved" and decided["decided_by"] == BOB
