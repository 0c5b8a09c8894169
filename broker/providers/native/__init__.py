"""The native backend: JWTs the broker signs itself, for APIs that trust its JWKS.

Settings: none of its own (it signs with the broker's keys and `BROKER_ISSUER`). Resource
grammar: `jwt://<name>[/<name>...]`, the generic grammar (`NativeProvider.grammar`).
"""

from broker.providers.native.provider import NativeProvider

__all__ = ["NativeProvider"]
