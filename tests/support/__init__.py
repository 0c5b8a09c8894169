"""Real peers the tests start (OpenBao, moto, the GitHub stand-in, databases) as pytest fixtures."""
