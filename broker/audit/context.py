"""What the audit's background work needs of the broker, as protocols: the linker signs
checkpoints and the witness loop submits them with no more than this, so `audit/` sits below
`identity/`, `config` and `runtime` (docs/architecture.md) and the assembled `Broker` is one
thing that satisfies it.
"""

from __future__ import annotations

from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.engine import Engine

from broker.audit.note import AuditWitness


class CheckpointKey(Protocol):
    @property
    def kid(self) -> str: ...
    @property
    def private(self) -> Ed25519PrivateKey: ...


class CheckpointKeys(Protocol):
    @property
    def active(self) -> CheckpointKey: ...


class AuditSettings(Protocol):
    @property
    def issuer(self) -> str: ...
    @property
    def audit_link_batch(self) -> int: ...
    @property
    def audit_checkpoint_interval_seconds(self) -> float: ...
    @property
    def audit_link_interval_seconds(self) -> float: ...
    @property
    def audit_witness_timeout_seconds(self) -> float: ...
    @property
    def audit_witness_interval_seconds(self) -> float: ...
    def audit_witness_list(self) -> list[AuditWitness]: ...


class AuditContext(Protocol):
    """The broker as the linker and the witness loop see it."""

    @property
    def engine(self) -> Engine: ...
    @property
    def settings(self) -> AuditSettings: ...
    @property
    def keyring(self) -> CheckpointKeys: ...
