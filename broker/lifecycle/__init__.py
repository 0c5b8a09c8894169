"""Lifecycle across sessions and leases: expiry sweeps, crash recovery, the kill switch.

It sits above both `sessions/` and `leases/` (it ends sessions and revokes leases), so neither
of those imports it.
"""
