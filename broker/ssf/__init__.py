"""OpenID Shared Signals Framework 1.0 transmitter: streams that receivers manage themselves."""
