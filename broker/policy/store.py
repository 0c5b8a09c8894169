"""The policy in force: loaded at start, swapped on reload only when the new file is good."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from broker.errors import PolicyError
from broker.grammar import RuleCheck
from broker.policy.compiled import CompiledPolicy
from broker.policy.loader import RuleChecks, check_rules, load_policy, load_policy_text

log = logging.getLogger(__name__)


class PolicyStore:
    """Holds the enforced policy and the optional shadow policy.

    The first load raises PolicyError: a broker must not start without a policy. Later
    reloads never leave it without one: a bad file is logged and the last good policy stays.
    """

    def __init__(self, path: Path | str | None, shadow_path: Path | str | None = None, *,
                 checks: RuleChecks | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.shadow_path = Path(shadow_path) if shadow_path is not None else None
        self.checks: dict[str, RuleCheck] = dict(checks or {})  # what running providers add, by name
        self._lock = threading.Lock()
        self._current: CompiledPolicy | None = (
            load_policy(self.path, checks=self.checks) if self.path is not None else None)
        self._shadow: CompiledPolicy | None = (
            load_policy(self.shadow_path, checks=self.checks) if self.shadow_path is not None else None)

    @classmethod
    def from_text(cls, text: str, shadow_text: str | None = None, source: str = "<policy>") -> PolicyStore:
        """A store over in-memory policy text (tests, embedded defaults); reload() keeps it as is."""
        store = cls(None)
        store._current = load_policy_text(text, source)
        store._shadow = load_policy_text(shadow_text, f"{source} (shadow)") if shadow_text is not None else None
        return store

    def adopt_checks(self, checks: RuleChecks) -> None:
        """Add the checks of providers now running (Plugin.policy_check, at start) and apply them
        to the policies in force: a rule they refuse raises PolicyError, as a bad file would.
        Every later reload applies them too."""
        with self._lock:
            merged = {**self.checks, **checks}
            for policy in (self._current, self._shadow):
                if policy is not None:
                    check_rules(policy, merged)
            self.checks = merged

    @property
    def current(self) -> CompiledPolicy:
        assert self._current is not None  # noqa: S101  # type narrowing only: set in __init__ or from_text
        return self._current

    @property
    def shadow(self) -> CompiledPolicy | None:
        return self._shadow

    def reload(self) -> bool:
        """Re-read both files; True when every file loaded, False when one was refused."""
        with self._lock:  # two reloads at once could otherwise install the older file last
            ok = True
            if self.path is not None:
                policy = self._try_load(self.path, self._current, self.checks)
                ok = ok and policy is not None
                self._current = policy or self._current
            if self.shadow_path is not None:
                shadow = self._try_load(self.shadow_path, self._shadow, self.checks)
                ok = ok and shadow is not None
                self._shadow = shadow or self._shadow
            return ok

    @staticmethod
    def _try_load(path: Path, last_good: CompiledPolicy | None, checks: RuleChecks) -> CompiledPolicy | None:
        try:
            policy = load_policy(path, checks=checks)
        except PolicyError as exc:
            kept = last_good.version if last_good is not None else "none"
            log.error("policy %s refused, keeping %s: %s", path, kept, exc.message)
            for problem in exc.problems:
                log.error("  %s:%s: %s: %s", path, problem.get("line"), problem.get("path"), problem.get("message"))
            return None
        if last_good is not None and policy.version == last_good.version:
            return last_good  # unchanged bytes: keep the same object
        log.info("policy %s loaded: %s", path, policy.version)
        return policy
