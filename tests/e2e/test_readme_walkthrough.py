"""The README's walkthrough, run exactly as written, so it cannot go stale (issues 20 and 21).

The shell blocks between `<!-- walkthrough -->` and `<!-- /walkthrough -->` in README.md run in
order, in one `bash -euo pipefail` process, in the directory where a real `broker-cli dev` runs
(as `make run` starts it: its `.broker/` is there, and `.venv` is this suite's virtualenv). Only
the environment differs from a person's terminal: the broker listens on a free port, which
`BROKER_URL` names (the first block keeps a `BROKER_URL` already set), and `HOME` and `TMPDIR`
are the test's own. Each step's output is checked, and the broker's own audit log is read
independently afterwards.

Beside it, the README's promises about itself: under 250 lines, no link that leads nowhere, and
neither it nor docs/ names a file outside the repository.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.ports import free_port
from tests.support.processes import BROKER_CLI, broker_environ, wait_until_ready

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
START, END = "<!-- walkthrough -->", "<!-- /walkthrough -->"
STEP = "@@@ walkthrough step {} @@@"
ID = {"session": r"ses_[0-9a-f]{32}", "approval": r"apr_[0-9a-f]{32}", "capability": r"cap_[0-9a-f]{32}"}


def walkthrough_blocks(text: str) -> list[str]:
    """The fenced `sh` blocks between the markers, in order, as written."""
    assert text.count(START) == 1 and text.count(END) == 1, "the walkthrough markers must appear once each"
    section = text.split(START, 1)[1].split(END, 1)[0]
    blocks = re.findall(r"^```(\w*)\n(.*?)^```$", section, flags=re.S | re.M)
    assert all(lang == "sh" for lang, _ in blocks), "every block of the walkthrough is a shell block"
    return [body for _, body in blocks]


def json_values(text: str) -> list[Any]:
    """Every JSON object printed in `text` (jq's pretty output spans lines)."""
    decoder, found, i = json.JSONDecoder(), [], 0
    while (i := text.find("{", i)) != -1:
        try:
            value, end = decoder.raw_decode(text, i)
        except ValueError:
            i += 1
            continue
        found.append(value)
        i = end
    return found


def one_json(text: str) -> dict[str, Any]:
    values = json_values(text)
    assert len(values) == 1, text
    assert isinstance(values[0], dict)
    return values[0]


@pytest.fixture
def dev_broker(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`broker-cli dev` as `make run` starts it, in a directory of its own, on a free port."""
    work = tmp_path / "repo"
    work.mkdir()
    # The README's blocks call `.venv/bin/broker-cli`, as in a clone after `make run`.
    (work / ".venv").symlink_to(Path(BROKER_CLI).parent.parent, target_is_directory=True)
    port = free_port()
    log = tmp_path / "dev.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([BROKER_CLI, "dev", "--port", str(port)], env=broker_environ(), cwd=work,
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(proc, url, log, within=90)  # with `bao` installed, dev starts OpenBao first
        yield url, work
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)


def test_the_readme_walkthrough_runs_as_written(dev_broker: tuple[str, Path], tmp_path: Path) -> None:
    url, work = dev_broker
    for tool in ("bash", "curl", "jq"):
        assert shutil.which(tool), f"the README's walkthrough needs `{tool}` (docs/dependencies.md)"
    blocks = walkthrough_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) == 8, f"expected the eight steps of the walkthrough, found {len(blocks)} blocks"
    # Where the blocks find the broker: BROKER_URL, defaulting to `make run`'s port only when unset.
    assert blocks[0].splitlines()[0] == "export BROKER_URL=${BROKER_URL:-http://127.0.0.1:8080}"
    rest = "\n".join(blocks)[len(blocks[0].splitlines()[0]):]
    assert not re.search(r"(127\.0\.0\.1|localhost):\d+", rest), "every later call must go to $BROKER_URL"

    script = "".join(f"echo '{STEP.format(n)}'\n{body}" for n, body in enumerate(blocks, 1))
    (tmp_path / "home").mkdir()
    (tmp_path / "tmp").mkdir()
    env = {**broker_environ(), "BROKER_URL": url, "HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path / "tmp"),
           "XDG_CONFIG_HOME": str(tmp_path / "home" / ".config")}
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env, capture_output=True,
                         text=True, timeout=240)
    assert run.returncode == 0, f"the walkthrough failed:\n{run.stdout}\n{run.stderr}"
    parts = re.split(r"^@@@ walkthrough step (\d+) @@@$", run.stdout, flags=re.M)
    steps = {int(n): out.strip("\n") for n, out in zip(parts[1::2], parts[2::2], strict=True)}
    assert sorted(steps) == list(range(1, 9)), run.stdout

    # 1. The orchestrator provisioned a session.
    assert steps[1].splitlines()[0] == "HTTP 201", steps[1]
    session_id = re.search(rf"^session ({ID['session']})$", steps[1], flags=re.M)
    assert session_id, steps[1]
    sid = session_id.group(1)

    # 2. A read capability at once, live at introspection.
    assert steps[2].splitlines()[0] == "HTTP 201", steps[2]
    read, introspected = json_values(steps[2])
    assert read["status"] == "active" and read["type"] == "jwt" and re.fullmatch(ID["capability"], read["capability_id"])
    assert introspected == {"active": True, "scope": "ledger:read", "aud": "payments-api"}

    # 3. The release waits for approval; its id is captured, not a placeholder.
    assert steps[3].splitlines()[0] == "HTTP 202", steps[3]
    pending = one_json(steps[3])
    assert pending["status"] == "pending_approval" and re.fullmatch(ID["approval"], pending["approval_id"])
    aid = pending["approval_id"]
    assert "release on jwt://payments-api" in pending["binding_message"]
    assert re.search(r"Binding [0-9A-F]{4}-[0-9A-F]{4}\.$", pending["binding_message"])
    code = pending["binding_message"].rsplit("Binding ", 1)[1].rstrip(".")

    # 4. The person sees it among theirs, is shown what they approve, and approves it.
    listing, decided = steps[4].split("\n" + aid + "  PENDING", 1)
    assert re.search(rf"^{aid}\s+pending\s+merge_deploy\s+release on jwt://payments-api\s.*may approve$", listing,
                     flags=re.M), listing
    assert "Approving lets claude-code (acting for alice@example.com) mint one `release` credential" in decided
    assert f"binding:    {code}" in decided and 'parameters: {"tag":"v2.1.0"}' in decided
    assert re.search(rf"^{aid}: approved \(release on jwt://payments-api for claude-code\); the agent may now retry",
                     decided, flags=re.M), decided

    # 5. The long poll says approved; the re-submission with approval_id mints.
    polled, minted_line = steps[5].split("HTTP ", 1)
    assert one_json(polled) == {"status": "approved"}
    assert minted_line.startswith("201\n"), steps[5]
    released = one_json(minted_line)
    assert released["status"] == "active" and released["access"] == "release"
    assert re.fullmatch(ID["capability"], released["capability_id"]) and released["capability_id"] != read["capability_id"]

    # 6. The audit tail tells the story in order.
    types = [line.split()[2] for line in steps[6].splitlines() if line.strip()]
    assert types == ["session.created", "capability.minted", "capability.pending", "approval.decided",
                     "capability.minted"], steps[6]

    # 7. Ending the session answers a receipt per capability; introspection now says inactive.
    ended, after = json_values(steps[7])
    assert ended["status"] == "ended"
    assert sorted((r["access"], r["outcome"]) for r in ended["receipts"]) == [
        ("read", "expires_naturally"), ("release", "expires_naturally")]
    assert after == {"active": False}

    # 8. The audit log verifies.
    assert re.match(r"audit chain intact: \d+ records", steps[8]), steps[8]

    # Independently of what the blocks printed: the broker's log says who decided what.
    admin = {"Authorization": "Bearer " + (work / ".broker" / "admin-token").read_text().strip()}
    records = httpx.get(url + "/v1/audit", params={"session_id": sid, "limit": 100}, headers=admin,
                        timeout=30).json()["records"]
    decided_record = next(r for r in records if r["type"] == "approval.decided")
    assert "dev@example.com" in json.dumps(decided_record) and aid in json.dumps(decided_record)
    minted = [r for r in records if r["type"] == "capability.minted"]
    assert aid in json.dumps(minted[-1]) and released["capability_id"] in json.dumps(minted[-1])
    ending = [r["type"] for r in records[5:]]
    assert [r["type"] for r in records[:5]] == types and sorted(ending) == [
        "capability.revoked", "capability.revoked", "session.ended"], ending
    # The blocks wrote nothing into the directory they ran in (their answers went to mktemp).
    assert sorted(p.name for p in work.iterdir()) == [".broker", ".venv"]


def test_readme_is_a_short_front_door() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 250
    # The two set-up commands, exactly; .ci/run calls the README's test command.
    assert "make run     #" in text and "make test    #" in text
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def markdown_files() -> list[Path]:
    return [README, ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").rglob("*.md"))]


def anchors(page: Path) -> set[str]:
    """The heading anchors GitHub makes for a Markdown page (lowercase, punctuation dropped, spaces to -)."""
    prose = re.sub(r"^```.*?^```$", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", prose, flags=re.M)}


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_links_stay_inside_the_repository_and_resolve(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert text.startswith("# "), f"{page.name} opens with its title"
    outside = [m.group(0) for m in re.finditer(r"\.\./shared|DESIGN\.md|/work/|contract file", text)]
    assert outside == [], f"{page.name} names something outside the repository: {outside}"
    prose = re.sub(r"^```.*?^```$", "", text, flags=re.S | re.M)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve()
        if not path.is_relative_to(ROOT):
            broken.append(f"{target} (outside the repository)")
        elif not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target} (no such heading)")
    broken.extend(f"#{anchor} (no such heading)" for anchor in re.findall(r"\]\(#([^)\s]+)\)", prose)
                  if anchor not in anchors(page))
    assert broken == [], f"{page.name}: links to nothing: {broken}"


def test_the_walkthrough_is_found_only_between_its_markers() -> None:
    """The extractor itself: blocks outside the markers are not run, other languages are refused."""
    text = f"```sh\necho outside\n```\n{START}\ntext\n```sh\necho one\n```\n\n```sh\necho two\n```\n{END}\n"
    assert walkthrough_blocks(text) == ["echo one\n", "echo two\n"]
    with pytest.raises(AssertionError):
        walkthrough_blocks(text.replace("```sh\necho two", "```python\necho two"))
    with pytest.raises(AssertionError):
        walkthrough_blocks(text + START)
