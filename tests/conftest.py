"""Test-wide fixtures: each real peer lives in its own module under tests/support/."""

pytest_plugins = [
    "tests.support.databases",
    "tests.support.brokers",
    "tests.support.approvals",
    "tests.support.receiver",
    "tests.support.set_receiver",
    "tests.support.openbao",
    "tests.support.aws_moto",
    "tests.support.github_standin",
    "tests.support.git_server",
    "tests.support.oidc",
    "tests.support.browser",
]
