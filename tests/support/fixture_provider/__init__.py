"""A provider package outside broker/, installed by a test at test time (tests/integration/test_fixture_provider.py)."""
