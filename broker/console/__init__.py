"""The approver's console: server-rendered pages under /console/, served by the broker itself.

- `browser.py`: the signed-in browser (server-side session, cookie, CSRF token, security headers)
- `signin.py`: sign-in at the IdP (authorization code + PKCE, authlib) or with a local human token
- `pages.py`: approvals, sessions and a session's timeline; every read and every action calls the
  same service functions as the REST API, with the signed-in person as the caller
- `views.py`: what a card and a timeline show, computed from what the services return
"""

from broker.console.app import install

__all__ = ["install"]
