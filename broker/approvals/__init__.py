"""Approvals and grants: the human decisions a capability of an approval tier waits on."""
