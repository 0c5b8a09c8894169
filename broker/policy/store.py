"""The policy in force: loaded at start, swapped on reload only when the new file is good."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from broker.errors import PolicyError
from broker.policy.compiled import CompiledPolicy
from broker.policy.loader import check_aws_account, load_policy, load_policy_text

log = logging.getLogger(__name__)


class PolicyStore:
    """Holds the enforced policy and the optional shadow policy.

    The first load raises PolicyError: a broker must not start without a policy. Later
    reloads never leave it without one: a bad file is logged and the last good policy stays.
    """

    def __init__(self, path: Path | str | None, shadow_path: Path | str | None = None, *,
                 aws_account: str | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.shadow_path = Path(shadow_path) if shadow_path is not None else None
        self.aws_account = aws_account  # the broker's own AWS account, once known
        self._lock = threading.Lock()
        self._current: CompiledPolicy | None = (
            load_policy(self.path, aws_account=aws_account) if self.path is not None else None)
        self._shadow: CompiledPolicy | None = (
            load_policy(self.shadow_path, aws_account=aws_account) if self.shadow_path is not None else None)

    @classmethod
    def from_text(cls, text: str, shadow_text: str | None = None, source: str = "<policy>") -> PolicyStore:
        """A store over in-memory policy text (tests, embedded defaults); reload() keeps it as is."""
        store = cls(None)
        store._current = load_policy_text(text, source)
        store._shadow = load_policy_text(shadow_text, f"{source} (shadow)") if shadow_text is not None else None
        return store

    def adopt_aws_account(self, account: str) -> None:
        """Learn the broker's own AWS account (config or STS, at start) and check the policies in
        force against it: a rule for another account raises PolicyError, as a bad file would."""
        with self._lock:
            for policy in (self._current, self._shadow):
                if policy is not None:
                    check_aws_account(policy, account)
            self.aws_account = account

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
                policy = self._try_load(self.path, self._current, self.aws_account)
                ok = ok and policy is not None
                self._current = policy or self._current
            if self.shadow_path is not None:
                shadow = self._try_load(self.shadow_path, self._shadow, self.aws_account)
                ok = ok and shadow is not None
                self._shadow = shadow or self._shadow
            return ok

    @staticmethod
    def _try_load(path: Path, last_good: CompiledPolicy | None, aws_account: str | None) -> CompiledPolicy | None:
        try:
            policy = load_policy(path, aws_account=aws_account)
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
