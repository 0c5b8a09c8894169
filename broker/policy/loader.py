"""Policy YAML -> typed, compiled policy, with every problem pointing at its line."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from pydantic import ValidationError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from broker.errors import PolicyError
from broker.grammar import RuleCheck, grammars
from broker.policy import models
from broker.policy.checks import Path as FieldPath
from broker.policy.checks import cross_check
from broker.policy.compiled import CompiledPolicy
from broker.policy.fields import Strict
from broker.policy.models import PolicyDocument

DataPath = tuple[Any, ...]
Lines = dict[DataPath, tuple[int, int]]  # path -> (line, column), both 1-based

_MERGE_TAG = "tag:yaml.org,2002:merge"
# Aliases can make a small file expand enormously ("billion laughs"); a real policy is far smaller.
_MAX_NODES = 200_000
# Every key any policy model knows, for "did you mean" on a misspelt one.
_FIELD_NAMES = sorted(
    {name for obj in vars(models).values() if isinstance(obj, type) and issubclass(obj, Strict)
     for name in obj.model_fields}
)


def format_path(path: DataPath) -> str:
    """("resources", 0, "access", "read") -> "resources[0].access.read"."""
    out = ""
    for segment in path:
        if isinstance(segment, int) and not isinstance(segment, bool):
            out += f"[{segment}]"
        else:
            out += f".{segment}" if out else str(segment)
    return out


def _problem(line: int, column: int, path: DataPath, message: str) -> dict[str, Any]:
    return {"line": line, "column": column, "path": format_path(path), "message": message}


def _refuse(source: str, problems: list[dict[str, Any]]) -> PolicyError:
    problems.sort(key=lambda p: (p["line"], p["column"]))
    first = problems[0]
    where = f"{first['path']}: " if first["path"] else ""
    noun = "problem" if len(problems) == 1 else "problems"
    message = f"{source}: invalid policy, {len(problems)} {noun}; line {first['line']}: {where}{first['message']}"
    return PolicyError(message, problems=problems)


class _LineMapper:
    """Walks the composed YAML tree once: records each path's position, finds duplicate keys."""

    def __init__(self, constructor: yaml.SafeLoader) -> None:
        self.constructor = constructor
        self.lines: Lines = {}
        self.problems: list[dict[str, Any]] = []
        self.visited = 0

    def walk(self, node: Node, path: DataPath, ancestors: frozenset[int] = frozenset(), explicit: bool = True) -> None:
        """`explicit` is False under a "<<" merge: those positions only fill gaps, never override."""
        self.visited += 1
        if self.visited > _MAX_NODES:
            raise _TooLarge
        if id(node) in ancestors:
            self._add(node, path, "an alias refers to one of its own parents")
            return
        ancestors = ancestors | {id(node)}
        if isinstance(node, SequenceNode):
            for i, item in enumerate(node.value):
                self._record((*path, i), _position(item), explicit)
                self.walk(item, (*path, i), ancestors, explicit)
        elif isinstance(node, MappingNode):
            self._walk_mapping(node, path, ancestors, explicit)

    def _walk_mapping(self, node: MappingNode, path: DataPath, ancestors: frozenset[int], explicit: bool) -> None:
        first_seen: dict[Any, int] = {}
        merged: list[Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merged.append(value_node)
                continue
            if not isinstance(key_node, ScalarNode):
                self._add(key_node, path, "keys must be plain scalars")
                continue
            key = self.constructor.construct_object(key_node, deep=True)
            line, column = _position(key_node)
            if key in first_seen:
                self.problems.append(
                    _problem(line, column, (*path, key), f"duplicate key {key!r} (first at line {first_seen[key]})")
                )
                continue
            first_seen[key] = line
            self._record((*path, key), (line, column), explicit)
            self.walk(value_node, (*path, key), ancestors, explicit)
        # "<<: *defaults" keys are overridden by explicit ones, so they may repeat them.
        for value_node in merged:
            sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
            for source in sources:
                self.walk(source, path, ancestors, explicit=False)

    def _record(self, path: DataPath, position: tuple[int, int], explicit: bool) -> None:
        if explicit:
            self.lines[path] = position
        else:
            self.lines.setdefault(path, position)

    def _add(self, node: Node, path: DataPath, message: str) -> None:
        line, column = _position(node)
        self.problems.append(_problem(line, column, path, message))


class _TooLarge(Exception):
    pass


def _position(node: Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _yaml_problem(exc: yaml.YAMLError) -> dict[str, Any]:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line, column = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
    detail = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    message = f"YAML syntax error: {context + ', ' if context else ''}{detail}"
    return _problem(line, column, (), message)


def parse_yaml(text: str, source: str = "<policy>") -> tuple[Any, Lines]:
    """YAML text -> (plain data, path -> (line, column)); duplicate keys are errors."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.YAMLError as exc:
            raise _refuse(source, [_yaml_problem(exc)]) from None
        if node is None:
            raise _refuse(source, [_problem(1, 1, (), "the policy file is empty")])
        mapper = _LineMapper(loader)
        try:
            mapper.walk(node, ())
        except _TooLarge:
            raise _refuse(source, [_problem(1, 1, (), "the policy expands to too many nodes (aliases?)")]) from None
        except yaml.YAMLError as exc:
            raise _refuse(source, [_yaml_problem(exc)]) from None
        if mapper.problems:
            raise _refuse(source, mapper.problems)
        try:
            data = loader.construct_document(node)
        except (yaml.YAMLError, ValueError, TypeError) as exc:
            problem = _yaml_problem(exc) if isinstance(exc, yaml.YAMLError) else _problem(1, 1, (), str(exc))
            raise _refuse(source, [problem]) from None
    finally:
        loader.dispose()
    mapper.lines[()] = _position(node)
    return data, mapper.lines


def _locate(lines: Lines, path: DataPath) -> tuple[int, int]:
    """The position of the longest prefix of `path` that exists in the file."""
    for end in range(len(path), -1, -1):
        found = lines.get(tuple(path[:end]))
        if found is not None:
            return found
    return 1, 1


def _validation_problems(exc: ValidationError, lines: Lines) -> list[dict[str, Any]]:
    problems = []
    for error in exc.errors(include_url=False):
        # "[key]" marks an error in a mapping's key rather than its value; the key's line is the same.
        loc = tuple(segment for segment in error["loc"] if segment != "[key]")
        kind, message = error["type"], error["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        if kind == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _FIELD_NAMES, n=1, cutoff=0.75)
            message = f"unknown key {loc[-1]!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
        elif kind == "missing":
            message = f"missing required key {loc[-1]!r}"
        elif "[key]" in error["loc"]:
            message = f"invalid key {loc[-1]!r}: {message}"
        line, column = _locate(lines, loc)
        problems.append(_problem(line, column, loc, message))
    return problems


# Checks running plugins add to every load, by provider name (Plugin.policy_check).
RuleChecks = Mapping[str, RuleCheck]


def rule_problems(document: PolicyDocument, checks: RuleChecks = MappingProxyType({})) -> list[tuple[FieldPath, str]]:
    """What the providers say of the rules naming them: their grammar's static `rule_problem`,
    and the `checks` of running providers (the aws provider: the broker's own account)."""
    static = {name: grammar.rule_problem for name, grammar in grammars().items()}
    problems: list[tuple[FieldPath, str]] = []
    for i, rule in enumerate(document.resources):
        for check in (static.get(rule.provider), checks.get(rule.provider)):
            problem = check(rule.match) if check is not None else None
            if problem is not None and (("resources", i, "match"), problem) not in problems:
                problems.append((("resources", i, "match"), problem))
    return problems


def load_document(text: str, source: str = "<policy>", *,
                  checks: RuleChecks = MappingProxyType({})) -> tuple[PolicyDocument, Lines]:
    """Parse and validate; raise PolicyError listing every problem found at once.

    `checks`: what running providers add (Plugin.policy_check), by provider name."""
    data, lines = parse_yaml(text, source)
    try:
        document = PolicyDocument.model_validate(data)
    except ValidationError as exc:
        raise _refuse(source, _validation_problems(exc, lines)) from None
    cross = cross_check(document)
    cross += [p for p in rule_problems(document, checks) if p not in cross]
    if cross:
        raise _refuse(source, [_problem(*_locate(lines, path), path, message) for path, message in cross])
    return document, lines


def load_policy_bytes(raw: bytes, source: str = "<policy>", *, checks: RuleChecks = MappingProxyType({})) -> CompiledPolicy:
    """The exact bytes are hashed for `version`, so a policy is named by its file content."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _refuse(source, [_problem(1, 1, (), f"not UTF-8: {exc.reason} at byte {exc.start}")]) from None
    document, lines = load_document(text, source, checks=checks)
    return CompiledPolicy(document, raw=raw, lines={format_path(p): line for p, (line, _) in lines.items()}, source=source)


def load_policy_text(text: str, source: str = "<policy>", *, checks: RuleChecks = MappingProxyType({})) -> CompiledPolicy:
    return load_policy_bytes(text.encode("utf-8"), source, checks=checks)


def check_rules(policy: CompiledPolicy, checks: RuleChecks) -> None:
    """Refuse an already compiled policy that running providers' checks refuse (line-precise)."""
    problems = rule_problems(policy.document, checks)
    if problems:
        raise _refuse(policy.source, [
            _problem(policy.line_of(format_path(path)) or 1, 1, path, message) for path, message in problems])


def load_policy(path: Path | str, *, checks: RuleChecks = MappingProxyType({})) -> CompiledPolicy:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PolicyError(
            f"{path}: cannot read policy: {exc.strerror or exc}",
            problems=[_problem(1, 1, (), f"cannot read: {exc.strerror or exc}")],
        ) from None
    return load_policy_bytes(raw, str(path), checks=checks)
