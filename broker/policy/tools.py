"""The tool-call gate's classifier: a tool call (Claude Code PreToolUse input) -> tier -> allow/ask/deny.

Pure, like the capability evaluator: a function of (compiled policy, agent, session state, call),
no I/O, importing nothing from api/, providers/ or the database. The service around it
(broker/hooks/) opens approvals and writes the audit.

What it is and is not: a tripwire and an audit point for what an agent's tools are about to do,
read from the command text. A determined agent can write a command no pattern recognises
(`g''it push`, a script file); the boundary is still the credentials, which the agent holds
only through the broker. The gate catches the honest mistake early and records the attempt.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from broker.policy.models import Tools
from broker.policy.shell import ParsedCommand, Segment, parse_command

_URL_HOST = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://(?:[^/\s'\"@]*@)?(\[[0-9A-Fa-f:.]+\]|[^/\s:'\"?#]+)(?::(\d+))?")
# A bare word a network client would take for a destination: `evil.example`, `10.0.0.1:8080/x`.
_BARE_HOST = re.compile(r"^(?:[^/\s:@]+@)?((?:[A-Za-z0-9-]+\.)+[A-Za-z0-9-]+|localhost|\[[0-9A-Fa-f:.]+\])"
                        r"(?::(\d+))?(?:[:/?#].*)?$")  # `host:path` too (scp, git over ssh)


@dataclass(frozen=True)
class _ClientOptions:
    """A network client family's options: which take a value that is not a destination (skipped
    when looking for bare hosts), and which send the traffic elsewhere than the words say (then
    the destination is unknown)."""

    values: frozenset[str]
    reroutes: frozenset[str]


_CURL = _ClientOptions(
    values=frozenset({
        "-o", "--output", "-H", "--header", "-A", "--user-agent", "-e", "--referer", "-w", "--write-out", "-X",
        "--request", "-u", "--user", "-d", "--data", "--data-raw", "--data-binary", "--data-urlencode",
        "--data-ascii", "--json", "-F", "--form", "-m", "--max-time", "--connect-timeout", "--retry", "-r",
        "--range", "-b", "--cookie", "-c", "--cookie-jar", "-D", "--dump-header", "-T", "--upload-file",
        "--cacert", "--cert", "--key", "-E", "--output-dir", "-C", "--continue-at", "-Y", "-y", "-z",
    }),
    reroutes=frozenset({"--connect-to", "--resolve", "-x", "--proxy", "--preproxy", "--socks4", "--socks4a",
                        "--socks5", "--socks5-hostname", "--unix-socket", "--abstract-unix-socket", "--doh-url",
                        "--url", "-K", "--config", "--proxy1.0", "--haproxy-clientip"}),
)
_WGET = _ClientOptions(
    values=frozenset({
        "-O", "--output-document", "-o", "--output-file", "-a", "--append-output", "-P", "--directory-prefix",
        "-U", "--user-agent", "--header", "-t", "--tries", "-T", "--timeout", "--user", "--password",
        "--post-data", "--body-data", "--post-file", "--body-file", "-w", "--wait", "-Q", "--quota",
        "--ca-certificate", "--certificate", "--private-key",
    }),
    reroutes=frozenset({"-e", "--execute", "-i", "--input-file", "-B", "--base", "--config", "--bind-address"}),
)
_SSH = _ClientOptions(
    values=frozenset({
        "-p", "-P", "-i", "-l", "-E", "-c", "-m", "-b", "-O", "-Q", "-B", "-w", "-I", "--port", "--exclude",
        "--include", "--filter", "-f", "--chmod", "--chown", "--log-file", "--partial-dir", "--temp-dir",
        "--compare-dest", "--link-dest", "--files-from", "--exclude-from", "--include-from",
    }),
    reroutes=frozenset({"-J", "-o", "-F", "-W", "-L", "-R", "-D", "-S", "-e", "--rsh", "--rsync-path",
                        "--proxy", "-X", "--connect-program"}),
)
_CLIENTS = {"wget": _WGET, "ssh": _SSH, "scp": _SSH, "sftp": _SSH, "rsync": _SSH, "ftp": _SSH, "tftp": _SSH}
# No command is read past this, whatever the policy says (the request body's own bound is lower).
HARD_MAX_COMMAND_BYTES = 1 << 20
UNKNOWN_HOST = "?"  # a destination the gate cannot read; never on an allowlist
PATH_FIELDS = ("file_path", "path", "notebook_path", "glob")  # Grep's glob picks the files it reads
# Programs whose second word is a subcommand worth keeping in the audit (`git push`); for any
# other program the second word may be data (`echo hunter2`), so only the program is kept.
_SUBCOMMAND_CLIS = frozenset({
    "git", "gh", "kubectl", "terraform", "tofu", "helm", "docker", "podman", "npm", "pnpm", "yarn", "pip", "uv",
    "cargo", "go", "make", "aws", "gcloud", "az", "bao", "vault", "broker-cli", "systemctl", "psql", "glab",
})


@dataclass
class ToolCall:
    tool_name: str
    tool_input: Mapping[str, Any]
    # The command, read at most once however many rules look at it (see `parsed`).
    _reading: dict[str, ParsedCommand | None] = field(default_factory=dict, repr=False, compare=False)

    @property
    def command(self) -> str | None:
        value = self.tool_input.get("command")
        return value if isinstance(value, str) else None

    @property
    def command_is_malformed(self) -> bool:
        """A `command` that is there but not a string: nothing a shell would run as written."""
        return "command" in self.tool_input and not isinstance(self.tool_input["command"], str)

    def command_bytes(self) -> int:
        return len(self.command.encode("utf-8", "surrogatepass")) if self.command is not None else 0

    def parsed(self, max_bytes: int = HARD_MAX_COMMAND_BYTES) -> ParsedCommand | None:
        """The command read once and kept; None when there is none or it is over `max_bytes`
        (then it is never read, by this call or a later one: the first answer is kept)."""
        if "command" not in self._reading:
            over = self.command is None or self.command_bytes() > max_bytes
            self._reading["command"] = None if over else parse_command(self.command or "")
        return self._reading["command"]

    def paths(self) -> list[str]:
        return [v for k in PATH_FIELDS if isinstance(v := self.tool_input.get(k), str)]

    @property
    def url(self) -> str | None:
        value = self.tool_input.get("url")
        return value if isinstance(value, str) else None

    def input_sha256(self) -> str:
        canonical = json.dumps(self.tool_input, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
        return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class ToolVerdict:
    decision: str  # allow | ask | deny
    reason: str  # kebab-case code
    message: str  # for the hook's permissionDecisionReason
    tier: str | None = None
    matched_rule: str | None = None  # "tools.rules[2]", "tools.default", "agents.claude-code.max_tier"
    rule_name: str | None = None
    needs_approval: bool = False  # the tier's control is approval: the service opens (or uses) one
    approvers: tuple[str, ...] = ()


# --- reading a shell command ---------------------------------------------------------------------


def simple_commands(command: str) -> list[str]:
    """`cd x && FOO=1 sudo git  push "origin" main` -> ["cd x", "git push origin main"]: each simple
    command's normalised text (broker/policy/shell.py), in one pass over the command."""
    return [segment.text for segment in parse_command(command).segments]


def destinations(words: tuple[str, ...] | list[str]) -> list[str]:
    """Where a network client's words send it: the host of every URL, of every bare word that
    looks like a host (`curl https://github.com evil.example` goes to both), and UNKNOWN_HOST
    when an option reroutes the traffic (`--connect-to`, `--proxy`) or no destination is seen."""
    hosts: list[str] = []
    client = _CLIENTS.get(words[0].rsplit("/", 1)[-1], _CURL) if words else _CURL
    skip = False
    for word in words[1:]:
        if skip:
            skip = False
            continue
        if word.startswith("-"):
            name = word.split("=", 1)[0]
            if name in client.reroutes:
                hosts.append(UNKNOWN_HOST)
            skip = "=" not in word and (name in client.values or name in client.reroutes)
            continue
        found = url_hosts(word)
        if found:
            hosts += found
        elif bare := _BARE_HOST.match(word):
            hosts.append(f"{bare.group(1).lower()}:{bare.group(2)}" if bare.group(2) else bare.group(1).lower())
    return hosts or [UNKNOWN_HOST]


def url_hosts(text: str) -> list[str]:
    """Hosts (with :port when given) of every URL written in `text`, lower-cased."""
    return [f"{m.group(1).lower()}:{m.group(2)}" if m.group(2) else m.group(1).lower() for m in _URL_HOST.finditer(text)]


def host_allowed(host: str, allowed: list[str]) -> bool:
    name, _, port = host.partition(":") if not host.startswith("[") else (host, "", "")
    for pattern in allowed:
        p_name, _, p_port = pattern.partition(":")
        if p_port and p_port != port:
            continue
        if p_name.startswith("*.") and name.endswith(p_name[1:]) and name != p_name[2:]:
            return True
        if name == p_name:
            return True
    return False


def describe(call: ToolCall) -> str:
    """What the audit keeps of a call: program and subcommand, a path or a host; never the full input."""
    if call.command is not None:
        words = []
        parsed = call.parsed()
        if parsed is None:
            return f"{call.tool_name}: (a command of {call.command_bytes()} bytes, not read)"
        for segment in parsed.segments[:8]:
            parts = segment.text.split(" ")
            head = parts[0]
            if head in _SUBCOMMAND_CLIS and len(parts) > 1 and re.fullmatch(r"[a-z][a-z0-9-]{0,30}", parts[1]):
                head += " " + parts[1]
            words.append(head[:64])
        return f"{call.tool_name}: {'; '.join(words)}"
    if call.paths():
        return f"{call.tool_name}: {call.paths()[0][:256]}"
    if call.url is not None:
        return f"{call.tool_name}: {', '.join(url_hosts(call.url)) or '?'}"
    return call.tool_name


# --- compiled rules ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompiledToolRule:
    index: int
    name: str | None
    tool: re.Pattern[str]
    command: re.Pattern[str] | None
    path: re.Pattern[str] | None
    url: re.Pattern[str] | None
    outside_allowlist: bool
    tier: str | None
    decision: str | None
    reason: str | None

    @property
    def rule(self) -> str:
        return f"tools.rules[{self.index}]"

    def matches(self, call: ToolCall, parsed: ParsedCommand | None, allowed_hosts: list[str]) -> bool:
        if not self.tool.fullmatch(call.tool_name):
            return False
        hits: list[Segment] = []
        if self.command is not None:
            if call.command is None:
                return False
            # Each simple command's text, then the whole command as written (a rule looking for
            # `.env` anywhere sees it inside `bash -c '...'` too). Both are bounded by the size cap.
            hits = [s for s in parsed.distinct if self.command.search(s.text)] if parsed is not None else []
            if not hits and not self.command.search(call.command):
                return False
        if self.path is not None and not any(self.path.search(p) for p in call.paths()):
            return False
        if self.url is not None and not (call.url is not None and self.url.search(call.url)):
            return False
        if self.outside_allowlist:
            if hits:
                hosts = [h for s in hits for h in destinations(s.stripped)]
            else:
                hosts = [h for t in (call.command, call.url) if t is not None for h in url_hosts(t)] or [UNKNOWN_HOST]
            # No host to be seen (`curl $TARGET`) is as good as an unknown one: fail closed.
            if all(host_allowed(h, allowed_hosts) for h in hosts):
                return False
        return True


class CompiledTools:
    def __init__(self, tools: Tools | None) -> None:
        self.configured = tools is not None
        tools = tools or Tools()
        self.default = tools.default
        self.approval_answer = tools.approval_answer
        self.unclear_command = tools.unclear_command
        self.max_command_bytes = tools.max_command_bytes
        self.allowed_hosts = list(tools.allowed_hosts)
        self.rules = tuple(
            CompiledToolRule(
                index=i, name=r.name, tool=re.compile(r.tool), command=re.compile(r.command) if r.command else None,
                path=re.compile(r.path) if r.path else None, url=re.compile(r.url) if r.url else None,
                outside_allowlist=r.hosts == "outside_allowlist", tier=r.tier, decision=r.decision, reason=r.reason,
            )
            for i, r in enumerate(tools.rules)
        )

    def read(self, call: ToolCall) -> ParsedCommand | None:
        """The call's command, read once under this policy's size cap (None: no command, or too big)."""
        return call.parsed(self.max_command_bytes)

    def match(self, call: ToolCall) -> CompiledToolRule | None:
        """The first rule that matches (file order)."""
        parsed = self.read(call)
        return next((rule for rule in self.rules if rule.matches(call, parsed, self.allowed_hosts)), None)

    def matching(self, call: ToolCall) -> list[CompiledToolRule]:
        """Every rule that matches, in file order (for a command that is not plainly simple)."""
        parsed = self.read(call)
        return [rule for rule in self.rules if rule.matches(call, parsed, self.allowed_hosts)]
