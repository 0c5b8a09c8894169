"""The policy engine: typed policy file, compile once, pure evaluation, hot reload."""

from pathlib import Path

from broker.policy.approvers import ApprovalRule, approval_rule, named_approver
from broker.policy.compiled import CompiledPolicy
from broker.policy.evaluate import approver_permission, default_bounds, evaluate, evaluate_with_shadow, human_permission
from broker.policy.facts import (
    BoundsLookup,
    Decision,
    LayerVerdict,
    LivePermission,
    RequestFacts,
    ScopeEntry,
    SessionFacts,
    TtlBounds,
)
from broker.policy.fields import TIER_ORDER
from broker.policy.loader import load_policy, load_policy_bytes, load_policy_text
from broker.policy.models import PolicyDocument
from broker.policy.resources import canonical_pattern, canonical_resource, glob_matches, parse_resource, validate_pattern
from broker.policy.store import PolicyStore

# Written by `broker-cli init` and used by `broker-cli dev`.
EXAMPLE_POLICY_PATH = Path(__file__).with_name("example.yaml")

__all__ = [
    "EXAMPLE_POLICY_PATH",
    "TIER_ORDER",
    "ApprovalRule",
    "BoundsLookup",
    "CompiledPolicy",
    "Decision",
    "LayerVerdict",
    "LivePermission",
    "PolicyDocument",
    "PolicyStore",
    "RequestFacts",
    "ScopeEntry",
    "SessionFacts",
    "TtlBounds",
    "approval_rule",
    "approver_permission",
    "canonical_pattern",
    "canonical_resource",
    "default_bounds",
    "evaluate",
    "evaluate_with_shadow",
    "glob_matches",
    "human_permission",
    "load_policy",
    "load_policy_bytes",
    "load_policy_text",
    "named_approver",
    "parse_resource",
    "validate_pattern",
]
