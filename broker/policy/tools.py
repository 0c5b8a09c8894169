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
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from broker.policy.models import TIER_ORDER, Tools

if TYPE_CHECKING:
    from broker.policy.compiled import CompiledPolicy

_PUNCTUATION = frozenset(";&|()")
# Words that run the command after them: `sudo git push` is a git push.
_WRAPPERS: dict[str, frozenset[str]] = {  # wrapper -> its options that take a value
    "sudo": frozenset({"-u", "-g", "-C", "-D", "-h", "-p", "-r", "-t", "-U", "-T"}),
    "doas": frozenset({"-u", "-C"}),
    "env": frozenset({"-u", "-C", "-S"}),
    "nice": frozenset({"-n"}),
    "command": frozenset(), "exec": frozenset({"-a"}), "nohup": frozenset(), "time": frozenset({"-f", "-o"}),
}
_SHELLS = frozenset({"sh", "bash", "zsh", "dash", "ksh"})
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_URL_HOST = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://(?:[^/\s'\"@]*@)?(\[[0-9A-Fa-f:.]+\]|[^/\s:'\"?#]+)(?::(\d+))?")
PATH_FIELDS = ("file_path", "path", "notebook_path")
# Programs whose second word is a subcommand worth keeping in the audit (`git push`); for any
# other program the second word may be data (`echo hunter2`), so only the program is kept.
_SUBCOMMAND_CLIS = frozenset({
    "git", "gh", "kubectl", "terraform", "tofu", "helm", "docker", "podman", "npm", "pnpm", "yarn", "pip", "uv",
    "cargo", "go", "make", "aws", "gcloud", "az", "bao", "vault", "broker-cli", "systemctl", "psql", "glab",
})


@dataclass(frozen=True)
class ToolCall:
    tool_name: str
    tool_input: Mapping[str, Any]

    @property
    def command(self) -> str | None:
        value = self.tool_input.get("command")
        return value if isinstance(value, str) else None

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


def _lex(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    lexer.commenters = ""
    return list(lexer)


def simple_commands(command: str, _depth: int = 0) -> list[str]:
    """`cd x && FOO=1 sudo git  push "origin" main` -> ["cd x", "git push origin main"].

    Split at ; & | ( ) and newlines, quotes resolved, variable assignments and wrappers such as
    sudo dropped, words joined by one space; `bash -c '...'` and `eval ...` are read inside too.
    A command that cannot be lexed is kept as written.
    """
    try:
        tokens: list[str] = []
        for line in command.splitlines():
            tokens += [*_lex(line), ";"]
    except ValueError:  # a quote spanning lines, or unbalanced: try as one piece, else give up
        try:
            tokens = _lex(command)
        except ValueError:
            return [command]
    out: list[str] = []
    current: list[str] = []
    for token in [*tokens, ";"]:
        if not (token and set(token) <= _PUNCTUATION):
            current.append(token)
            continue
        current = _strip_wrappers(current)
        if current:
            out.append(" ".join(current))
            if _depth < 3:
                out += simple_commands(inner, _depth + 1) if (inner := _inner_script(current)) else []
        current = []
    return out


def _strip_wrappers(words: list[str]) -> list[str]:
    """Drop leading `VAR=value`s and wrappers with their options: `sudo -u root env X=1 git push` -> `git push`."""
    i = 0
    while i < len(words):
        word = words[i]
        if _ASSIGNMENT.match(word):
            i += 1
        elif word in _WRAPPERS:
            takes_value = _WRAPPERS[word]
            i += 1
            while i < len(words) and words[i].startswith("-") and words[i] != "--":
                i += 2 if words[i] in takes_value else 1
            if i < len(words) and words[i] == "--":
                i += 1
        else:
            break
    return words[i:]


def _inner_script(words: list[str]) -> str | None:
    """The script a shell is told to run: `bash -c 'x'`, `sh -lc 'x'`, `eval x y`."""
    program = words[0].rsplit("/", 1)[-1]
    if program == "eval" and len(words) > 1:
        return " ".join(words[1:])
    if program in _SHELLS:
        for i, word in enumerate(words[1:-1], start=1):
            if word.startswith("-") and not word.startswith("--") and "c" in word:
                return words[i + 1]
    return None


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
        for simple in simple_commands(call.command)[:8]:
            parts = simple.split(" ")
            head = parts[0].rsplit("/", 1)[-1]
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

    def matches(self, call: ToolCall, allowed_hosts: list[str]) -> bool:
        if not self.tool.fullmatch(call.tool_name):
            return False
        texts: list[str] = []  # where URLs are looked for
        if self.command is not None:
            if call.command is None:
                return False
            hits = [s for s in simple_commands(call.command) if self.command.search(s)]
            if not hits and not self.command.search(call.command):
                return False
            texts += hits or [call.command]
        if self.path is not None and not any(self.path.search(p) for p in call.paths()):
            return False
        if self.url is not None and not (call.url is not None and self.url.search(call.url)):
            return False
        if self.outside_allowlist:
            if not texts:
                texts = [t for t in (call.command, call.url) if t is not None]
            hosts = [h for t in texts for h in url_hosts(t)]
            # No host to be seen (`curl $TARGET`) is as good as an unknown one: fail closed.
            if hosts and all(host_allowed(h, allowed_hosts) for h in hosts):
                return False
        return True


class CompiledTools:
    def __init__(self, tools: Tools | None) -> None:
        self.configured = tools is not None
        tools = tools or Tools()
        self.default = tools.default
        self.approval_answer = tools.approval_answer
        self.allowed_hosts = list(tools.allowed_hosts)
        self.rules = tuple(
            CompiledToolRule(
                index=i, name=r.name, tool=re.compile(r.tool), command=re.compile(r.command) if r.command else None,
                path=re.compile(r.path) if r.path else None, url=re.compile(r.url) if r.url else None,
                outside_allowlist=r.hosts == "outside_allowlist", tier=r.tier, decision=r.decision, reason=r.reason,
            )
            for i, r in enumerate(tools.rules)
        )

    def match(self, call: ToolCall) -> CompiledToolRule | None:
        for rule in self.rules:
            if rule.matches(call, self.allowed_hosts):
                return rule
        return None


# --- the decision ---------------------------------------------------------------------------------


def decide_tool_call(policy: CompiledPolicy, *, agent: str, session_active: bool, call: ToolCall) -> ToolVerdict:
    """allow / ask / deny for one call, from the policy's `tools` section, tiers and agent ceiling."""
    tools = policy.tools
    if not session_active:
        return ToolVerdict("deny", "session-ended", "the broker session has ended: no more tool calls")
    rule = tools.match(call)
    if rule is None:
        return ToolVerdict(tools.default, "no-tool-rule", f"no tool rule matches; the policy's default is {tools.default}",
                           matched_rule="tools.default")
    label = rule.name or rule.rule
    because = f" ({rule.reason})" if rule.reason else ""
    if rule.decision is not None:
        return ToolVerdict(rule.decision, f"tool-rule-{rule.decision}", f"{label}: {rule.decision}{because}",
                           matched_rule=rule.rule, rule_name=rule.name)
    tier = rule.tier
    assert tier is not None
    who = policy.agent(agent)
    if who is None:
        return ToolVerdict("deny", "unknown-agent", f"{label}: no agent entry for {agent!r}", tier=tier,
                           matched_rule="agents", rule_name=rule.name)
    if TIER_ORDER.index(tier) > TIER_ORDER.index(who.max_tier):
        return ToolVerdict("deny", "agent-ceiling", f"{label} is tier {tier}, above {agent}'s ceiling {who.max_tier}{because}",
                           tier=tier, matched_rule=f"{who.rule}.max_tier", rule_name=rule.name)
    control = policy.tiers[tier].control
    if control == "deny":
        return ToolVerdict("deny", "tier-denied", f"{label} is tier {tier}, which is denied{because}", tier=tier,
                           matched_rule=rule.rule, rule_name=rule.name)
    if control == "approval":
        approvers = tuple(policy.tiers[tier].approvers)
        return ToolVerdict(tools.approval_answer, "approval-required",
                           f"{label} is tier {tier} and needs approval by {', '.join(approvers)}{because}",
                           tier=tier, matched_rule=rule.rule, rule_name=rule.name, needs_approval=True,
                           approvers=approvers)
    return ToolVerdict("allow", "tool-allowed", f"{label} is tier {tier}: allowed{because}", tier=tier,
                       matched_rule=rule.rule, rule_name=rule.name)
