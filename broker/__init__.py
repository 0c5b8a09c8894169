"""jit-broker: just-in-time credentials for AI coding agents."""

__version__ = "0.1.0"
