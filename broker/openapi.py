"""Export the app's OpenAPI document: `python -m broker.openapi > openapi.yaml`."""

from __future__ import annotations

import sys

import yaml

from broker.app import create_app


def render() -> str:
    # safe_dump with no stream returns the document as a str (the stubs type it as Any).
    return str(yaml.safe_dump(create_app().openapi(), sort_keys=True, allow_unicode=True))


if __name__ == "__main__":
    sys.stdout.write(render())
