"""The policy file's JSON Schema, generated from the typed models (ships as policy.schema.json).

Regenerate with: python -m broker.policy.schema > broker/policy/policy.schema.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from broker.policy.models import PolicyDocument

SCHEMA_PATH = Path(__file__).with_name("policy.schema.json")
SCHEMA_ID = "https://jit-broker.dev/schemas/policy-v1.json"


def _close_keyed_maps(node: Any) -> None:
    # pydantic renders a dict with constrained keys as patternProperties alone, which lets any
    # other key through; the model refuses them, so the schema must too.
    if isinstance(node, dict):
        if "patternProperties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            _close_keyed_maps(value)
    elif isinstance(node, list):
        for value in node:
            _close_keyed_maps(value)


def generate_schema() -> dict[str, Any]:
    schema = PolicyDocument.model_json_schema(mode="validation")
    _close_keyed_maps(schema)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID, **schema}


def render_schema() -> str:
    return json.dumps(generate_schema(), indent=2, sort_keys=True) + "\n"


def shipped_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return schema


def main() -> None:
    print(render_schema(), end="")


if __name__ == "__main__":
    main()
