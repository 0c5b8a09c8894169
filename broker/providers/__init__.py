"""Credential providers: one module per backend family, loaded by name through entry points."""
