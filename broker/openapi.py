"""Export the app's OpenAPI document: `python -m broker.openapi > openapi.yaml`."""

from __future__ import annotations

import sys

import yaml

from broker.app import create_app


def render() -> str:
    return yaml.safe_dump(create_app().openapi(), sort_keys=True, allow_unicode=True)


if __name__ == "__main__":
    sys.stdout.write(render())
