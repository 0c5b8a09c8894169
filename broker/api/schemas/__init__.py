"""Request and response bodies of the HTTP API. Unknown fields are refused (422), sizes bounded.

One module per resource family (sessions, approvals, audit, hooks) over `common`, the value
types, `Strict` and the error body they share; routes import from the module they need.
"""
