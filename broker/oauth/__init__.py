"""The broker in OAuth's words: RFC 8693 token exchange, RFC 7009 revocation, RFC 8414/9728 discovery.

Nothing here decides or mints: the token endpoint calls `broker.leases.service.request_capability`
and revocation calls `broker.leases.queries.revoke`, the same functions as the JSON API, and
only translates requests and answers. See docs/oauth.md.
"""
