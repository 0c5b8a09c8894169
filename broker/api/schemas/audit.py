"""Audit bodies: a page of records, the verification, checkpoints, witnesses and consistency proofs."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class AuditPage(BaseModel):
    records: list[dict[str, Any]] = Field(description="records in seq order (docs/audit.md), each with "
                                                      "prev_hash and hash")
    next_since: int = Field(description="give as `since` for the next page")


class AuditVerification(BaseModel):
    ok: bool
    checked: int
    first_bad_seq: int | None
    first_bad_event_id: str | None
    problem: str | None
    head_hash: str | None
    chains: int | None = Field(default=None, description="hash chains walked (one per session, a few broker chains)")
    tree_size: int | None = Field(default=None, description="leaves of the Merkle tree the linker built")
    root_hash: str | None = Field(default=None, description="RFC 6962 root of that tree, hex")
    unlinked: int | None = Field(default=None, description="committed records the linker has not folded in yet")
    bad_checkpoint: int | None = Field(default=None, description="tree size of a stored checkpoint the log does not match")


class AuditCosignatureOut(BaseModel):
    witness: str = Field(description="<name>+<hex key id> of the witness")
    timestamp: int = Field(description="when the witness cosigned, POSIX seconds (from the cosignature)")


class AuditWitnessStatus(BaseModel):
    witness: str
    cosigned_size: int = Field(description="largest tree size this witness cosigned for the broker")
    refused_size: int | None = Field(default=None, description="tree size of the checkpoint it last refused")
    refused_reason: str | None = Field(default=None, description="why (kebab-case reason, then the detail)")


class AuditCheckpoint(BaseModel):
    origin: str
    tree_size: int = Field(description="leaves (records) in the tree this checkpoint commits to")
    root_hash: str = Field(description="RFC 6962 Merkle tree hash, hex")
    timestamp: str
    key_name: str = Field(description="the kid of the broker signing key (see /.well-known/jwks.json)")
    note: str = Field(description="the C2SP signed note, with the witnesses' cosignature lines after the broker's "
                                  "signature: save it, and give it to `audit verify --checkpoint`")
    verifier_key: str | None = Field(default=None, description="the signing key as a C2SP vkey "
                                     "(<name>+<hex key id>+<base64 0x01||key>): what a witness is configured with")
    cosignatures: list[AuditCosignatureOut] = Field(default_factory=list,
                                                    description="witness cosignatures (cosignature/v1) in the note")
    witnesses: list[AuditWitnessStatus] = Field(default_factory=list,
                                                description="each configured witness's state: what it cosigned, "
                                                            "what it refused and why")


class AuditConsistency(BaseModel):
    first: int
    second: int
    proof: list[str] = Field(description="RFC 9162 section 2.1.4 consistency proof, hex node hashes")
