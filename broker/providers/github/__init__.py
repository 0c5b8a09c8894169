"""The github backend: App installation tokens (provider) and a human's repository role (permission source).

Settings: `settings.py` (BROKER_GITHUB_*). Resource grammar: `grammar.py` (`github://<owner>/<repo>`).
"""

from broker.providers.github.provider import GitHubProvider, parse_resource, requested_permissions
from broker.providers.github.settings import GitHubSettings
from broker.providers.github.source import GitHubPermissionSource

__all__ = ["GitHubPermissionSource", "GitHubProvider", "GitHubSettings", "parse_resource", "requested_permissions"]
