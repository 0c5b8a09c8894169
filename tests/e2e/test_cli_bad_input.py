"""Every broker-cli verb meets bad input as a newcomer would type it: missing, malformed and
unknown arguments, and the broker down. Each answer is a clear `error:`/`Error:` line and an exit
code of the documented table (broker/cli/exits.py), never a traceback and never a silent 0.

One `broker-cli dev` serves the whole module (the embedded default, as the README starts it);
the CLI runs from a sub-directory of where `dev` wrote its state, as a person in their repository
would.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.brokers import free_port
from tests.support.processes import BROKER_CLI, broker_environ, wait_until_ready

OK, REFUSED, USAGE, NOT_FOUND, UNAUTHENTICATED = 0, 1, 2, 3, 4
UNKNOWN_SESSION = "ses_" + "0" * 32
UNKNOWN_CAPABILITY = "cap_" + "0" * 32


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    home = tmp_path_factory.mktemp("cli-bad-input")
    env = broker_environ()
    port = free_port()
    log = home / "dev.log"
    proc = subprocess.Popen([BROKER_CLI, "dev", "--port", str(port), "--no-openbao"], env=env, cwd=home,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(proc, url, log, within=90)
        (home / "repo" / "src").mkdir(parents=True)
        yield url, home
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def run(url: str, cwd: Path, *args: str, stdin: str = "", **extra: str) -> subprocess.CompletedProcess[str]:
    env = broker_environ({"BROKER_URL": url, **extra})
    for name in ("BROKER_TOKEN", "BROKER_AS", "BROKER_STATE_DIR", "BROKER_SESSION_TOKEN", "BROKER_CLI_DEBUG"):
        if name not in extra:
            env.pop(name, None)
    return subprocess.run([BROKER_CLI, *args], env=env, cwd=cwd, input=stdin, capture_output=True, text=True,
                          timeout=90)


def assert_clear(r: subprocess.CompletedProcess[str], code: int, says: str) -> None:
    text = r.stdout + r.stderr
    assert "Traceback" not in text and 'File "' not in text, text
    assert r.returncode == code, (r.returncode, text)
    assert says.lower() in r.stderr.lower(), (says, r.stderr)
    assert r.stderr.lstrip().lower().startswith(("error:", "usage:")), r.stderr


# (arguments, exit code, what stderr must say)
TABLE: list[tuple[tuple[str, ...], int, str]] = [
    # missing arguments
    (("sessions", "show"), USAGE, "missing argument"),
    (("sessions", "end"), USAGE, "missing argument"),
    (("sessions", "resume"), USAGE, "missing argument"),
    (("reviews", "close"), USAGE, "missing argument"),
    (("capabilities", "revoke"), USAGE, "missing argument"),
    (("approvals", "show"), USAGE, "missing argument"),
    (("approve",), USAGE, "missing argument"),
    (("deny",), USAGE, "missing argument"),
    (("grant", "--session", UNKNOWN_SESSION), USAGE, "missing --resource, --access, --ttl"),
    (("policy", "explain", "--access", "read"), USAGE, "missing option"),
    (("policy", "check"), USAGE, "missing argument"),
    (("keys", "rotate"), USAGE, "missing option"),
    (("aws-credential-process", "--resource", "aws://123456789012/role/x"), USAGE, "missing option"),
    (("revoke",), USAGE, "give at least one of"),
    # malformed arguments
    (("sessions", "show", "not-a-session"), NOT_FOUND, "session-not-found"),  # a path id: no such session
    (("sessions", "list", "--status", "bogus"), USAGE, "validation-failed"),
    (("capabilities", "list", "--status", "bogus"), USAGE, "status"),
    (("capabilities", "list", "--session", "ses_x"), USAGE, "session_id"),
    (("audit", "tail", "--limit", "0"), USAGE, "--limit"),
    (("audit", "tail", "--limit", "-1"), USAGE, "--limit"),
    (("audit", "tail", "--limit", "ten"), USAGE, "--limit"),
    (("policy", "explain", "--resource", "jwt://payments-api", "--access", "read", "--scope", "jwt://payments-api"),
     USAGE, "resource=access1,access2"),
    (("policy", "explain", "--resource", "jwt://payments-api", "--access", "read", "--scope", "=read"),
     USAGE, "resource=access1,access2"),
    (("policy", "explain", "--resource", "jwt://payments-api", "--access", "read", "--ttl", "10x"),
     USAGE, "not a duration"),
    (("policy", "explain", "--resource", "jwt://payments-api", "--access", "read", "--ttl", "١٠m"),  # noqa: RUF001  # Arabic-Indic digits, deliberately
     USAGE, "not a duration"),
    (("grant", "--session", UNKNOWN_SESSION, "--resource", "jwt://payments-api", "--access", "read",
      "--ttl", "0s"), USAGE, "between 1s"),
    (("grant", "--session", UNKNOWN_SESSION, "--resource", "jwt://payments-api", "--access", "read",
      "--ttl", "soon"), USAGE, "not a duration"),
    (("exec", "-c", "jwt://payments-api=read", "--ttl", "-5", "--", "true"), USAGE, "not a duration"),
    (("policy", "check", "no-such-file.yaml"), USAGE, "does not exist"),
    (("nosuchverb",), USAGE, "no such command"),
    (("--as", "root", "whoami"), USAGE, "--as must be one of"),
    # well-formed but unknown
    (("sessions", "show", UNKNOWN_SESSION), NOT_FOUND, "session-not-found"),
    (("sessions", "end", UNKNOWN_SESSION), NOT_FOUND, "session-not-found"),
    (("sessions", "resume", UNKNOWN_SESSION), NOT_FOUND, "session-not-found"),
    (("reviews", "close", "rev_" + "0" * 32, "--verdict", "appropriate"), NOT_FOUND, "review-not-found"),
    (("capabilities", "list", "--session", UNKNOWN_SESSION), NOT_FOUND, "session-not-found"),
    (("capabilities", "revoke", UNKNOWN_CAPABILITY), NOT_FOUND, "not-found"),
    (("audit", "tail", "--session", UNKNOWN_SESSION), NOT_FOUND, "session-not-found"),
    (("audit", "export", "--session", UNKNOWN_SESSION), NOT_FOUND, "session-not-found"),
    (("approvals", "show", "apr_" + "0" * 32), NOT_FOUND, "approval-not-found"),
    (("approve", "apr_" + "0" * 32), NOT_FOUND, "approval-not-found"),
]


@pytest.mark.parametrize(("args", "code", "says"), TABLE, ids=[" ".join(a)[:60] for a, _, _ in TABLE])
def test_bad_input_is_one_clear_line_and_a_documented_exit_code(
    dev: tuple[str, Path], args: tuple[str, ...], code: int, says: str
) -> None:
    url, home = dev
    assert_clear(run(url, home / "repo" / "src", *args), code, says)


def test_not_signed_in_is_exit_4_everywhere(dev: tuple[str, Path]) -> None:
    """A token the broker does not accept is the same exit 4 in every verb, with the way out."""
    url, home = dev
    for args in (("sessions", "list"), ("approvals", "list"), ("audit", "tail"), ("whoami",),
                 ("capabilities", "list")):
        r = run(url, home, *args, BROKER_TOKEN="jbadm_not-a-real-token")
        assert_clear(r, UNAUTHENTICATED, "invalid-token")


@pytest.mark.parametrize("args", [
    ("sessions", "list"), ("sessions", "show", UNKNOWN_SESSION), ("capabilities", "list"), ("approvals", "list"),
    ("approve", "apr_" + "0" * 32), ("audit", "tail"), ("audit", "verify"), ("audit", "export"),
    ("audit", "checkpoint"), ("whoami",), ("revoke", "--agent", "claude-code"),
    ("policy", "explain", "--resource", "jwt://payments-api", "--access", "read"),
    ("grant", "--session", UNKNOWN_SESSION, "--resource", "jwt://payments-api", "--access", "read", "--ttl", "10m"),
], ids=lambda a: " ".join(a)[:40])
def test_broker_down_says_where_it_looked(dev: tuple[str, Path], args: tuple[str, ...]) -> None:
    _, home = dev
    down = f"http://127.0.0.1:{free_port()}"
    r = run(down, home, *args)
    assert_clear(r, USAGE, f"cannot reach the broker at {down}")
    assert "BROKER_URL" in r.stderr


def test_the_state_directory_is_found_from_any_sub_directory(dev: tuple[str, Path]) -> None:
    url, home = dev
    deep = home / "repo" / "src"
    r = run(url, deep, "--as", "human", "whoami")
    assert r.returncode == OK, r.stderr
    assert r.stdout.startswith("dev@example.com (human)")
    assert f"token from {home / '.broker' / 'human-token'}" in r.stdout
    # Elsewhere (no .broker above), the hint names where it looked and the variable that says where.
    r = run(url, Path("/"), "sessions", "list")
    assert_clear(r, UNAUTHENTICATED, "BROKER_STATE_DIR")
    r = run(url, Path("/"), "sessions", "list", BROKER_STATE_DIR=str(home / ".broker"))
    assert r.returncode == OK, r.stderr


def test_audit_tail_is_the_newest_records_in_one_request(dev: tuple[str, Path]) -> None:
    url, home = dev
    admin = {"Authorization": f"Bearer {(home / '.broker' / 'admin-token').read_text().strip()}"}
    everything = httpx.get(url + "/v1/audit", params={"limit": 5000}, headers=admin).json()["records"]
    assert len(everything) >= 1
    for limit in (1, 2, 3):
        r = run(url, home, "audit", "tail", "--limit", str(limit), "--json")
        assert r.returncode == OK, r.stderr
        seqs = [int(line.split('"seq":')[1].split(",")[0]) for line in r.stdout.splitlines() if line.strip()]
        assert seqs == [rec["seq"] for rec in everything][-limit:]


def test_whoami_says_what_the_local_admin_token_is(dev: tuple[str, Path]) -> None:
    url, home = dev
    r = run(url, home, "whoami")
    assert r.returncode == OK
    assert r.stdout.startswith("admin (admin)")
    assert "admin-token" in r.stdout and "--as human" in r.stdout


def _leaf_commands() -> list[tuple[str, ...]]:
    """Every verb broker-cli has, as the words that name it (`audit tail`, `approve`...)."""
    import typer.main

    from broker.cli.main import app

    found: list[tuple[str, ...]] = []

    def walk(command: Any, path: tuple[str, ...]) -> None:
        if hasattr(command, "commands"):  # a group (typer carries its own click: no isinstance)
            for name, sub in command.commands.items():
                walk(sub, (*path, name))
        else:
            found.append(path)

    walk(typer.main.get_command(app), ())
    return found


VERBS = _leaf_commands()


def test_the_verb_list_is_the_whole_cli() -> None:
    names = {" ".join(v) for v in VERBS}
    assert {"serve", "dev", "init", "login", "whoami", "approve", "grant", "audit tail", "git-credential",
            "hook pre-tool-use", "exec", "policy explain", "sessions end"} <= names, names


@pytest.mark.parametrize("verb", VERBS, ids=[" ".join(v) for v in VERBS])
def test_every_verb_refuses_an_unknown_option_in_one_line(tmp_path: Path, verb: tuple[str, ...]) -> None:
    """No broker needed: click refuses before the verb runs; exit 2, never a traceback."""
    r = run(f"http://127.0.0.1:{free_port()}", tmp_path, *verb, "--no-such-option")
    assert_clear(r, USAGE, "no such option")
