"""The shipped JSON Schema is the one the models generate, and the example policy fits it."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from broker.policy import EXAMPLE_POLICY_PATH, load_policy
from broker.policy.schema import SCHEMA_PATH, generate_schema, render_schema, shipped_schema

REGENERATE = "python -m broker.policy.schema > broker/policy/policy.schema.json"


def test_shipped_schema_matches_the_models():
    assert shipped_schema() == generate_schema(), f"policy.schema.json drifted; run: {REGENERATE}"
    assert SCHEMA_PATH.read_text(encoding="utf-8") == render_schema(), f"run: {REGENERATE}"


def test_module_prints_the_schema():
    out = subprocess.run([sys.executable, "-m", "broker.policy.schema"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == generate_schema()


def test_schema_describes_the_contract():
    schema = generate_schema()
    assert schema["$schema"].endswith("2020-12/schema")
    assert set(schema["required"]) == {"version", "tiers", "resources"}
    assert schema["additionalProperties"] is False
    tier_names = schema["properties"]["tiers"]["propertyNames"]["enum"]
    assert tier_names == ["read", "write", "review", "merge_deploy", "secret", "destructive"]
    access = schema["$defs"]["Access"]
    assert access["additionalProperties"] is False
    assert {"tier", "permissions", "session_policy", "scope", "audience", "options"} <= set(access["properties"])
    # Keys constrained by pattern (emails, agent names) admit nothing else.
    assert schema["properties"]["humans"]["additionalProperties"] is False


def test_example_loads_and_validates_against_the_schema():
    load_policy(EXAMPLE_POLICY_PATH)
    try:
        import jsonschema  # not a declared dependency; used when present
    except ImportError:
        return
    data = yaml.safe_load(EXAMPLE_POLICY_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(shipped_schema()).validate(data)
    bad = {**data, "agents": {"claude-code": {"max_tier": "root"}}}
    assert list(jsonschema.Draft202012Validator(shipped_schema()).iter_errors(bad))
