"""A local git smart-HTTP server that accepts only tokens the GitHub stand-in issued for the repository.

`git http-backend` (git's own CGI program) serves bare repositories under a temporary root; a
small loopback HTTP server in front of it does what GitHub does before git gets to talk: Basic
auth with an installation token as password (`x-access-token:<token>`), no credentials -> 401
with a `WWW-Authenticate` challenge (so git asks its credential helper), then the stand-in
decides: fetch needs `contents: read` on that repository, push (`git-receive-pack`) needs
`contents: write`; otherwise 401 (unknown or revoked token), 404 (another repository) or 403.

Every request is logged (method, repository, service, status) for the tests to assert on.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.support.github_standin import GitHubStandIn

GIT = shutil.which("git") or "git"
REPOSITORIES = ("acme/widgets", "acme/gadgets")


@dataclass(frozen=True)
class GitRequest:
    method: str
    repository: str  # owner/repo
    service: str  # git-upload-pack (fetch) or git-receive-pack (push)
    user: str | None
    status: int


@dataclass
class GitServer:
    root: Path
    standin: GitHubStandIn
    url: str = ""
    log: list[GitRequest] = field(default_factory=list)

    def remote(self, repository: str) -> str:
        return f"{self.url}/{repository}.git"

    def host(self) -> str:
        return self.url.removeprefix("http://")

    def head(self, repository: str, branch: str = "main") -> str:
        out = subprocess.run([GIT, "--git-dir", str(self.root / f"{repository}.git"), "rev-parse", branch],
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()

    def reset(self) -> None:
        """Fresh bare repositories, each with one commit on main."""
        self.log.clear()
        shutil.rmtree(self.root, ignore_errors=True)
        seed = self.root / ".seed"
        env = _git_env(self.root)
        for repository in REPOSITORIES:
            bare = self.root / f"{repository}.git"
            bare.parent.mkdir(parents=True, exist_ok=True)
            _git(["init", "--quiet", "--bare", "--initial-branch=main", str(bare)], env)
            _git(["--git-dir", str(bare), "config", "http.receivepack", "true"], env)
            work = seed / repository
            _git(["init", "--quiet", "--initial-branch=main", str(work)], env)
            (work / "README.md").write_text(f"# {repository}\n")
            _git(["-C", str(work), "add", "README.md"], env)
            _git(["-C", str(work), "commit", "--quiet", "-m", "first"], env)
            _git(["-C", str(work), "push", "--quiet", str(bare), "main"], env)
        shutil.rmtree(seed)

    def pushes(self, status: int | None = None) -> list[GitRequest]:
        return [r for r in self.log if r.service == "git-receive-pack" and r.method == "POST"
                and (status is None or r.status == status)]


def _git_env(home: Path) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_AUTHOR_NAME": "seed", "GIT_AUTHOR_EMAIL": "seed@example.com",
            "GIT_COMMITTER_NAME": "seed", "GIT_COMMITTER_EMAIL": "seed@example.com"}


def _git(args: list[str], env: dict[str, str]) -> None:
    subprocess.run([GIT, *args], env=env, check=True, capture_output=True)


def _handler(server: GitServer) -> type[BaseHTTPRequestHandler]:  # noqa: C901  # sums the small methods of the class it defines
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet: the log list is the record
            pass

        def do_GET(self) -> None:
            self._serve()

        def do_POST(self) -> None:
            self._serve()

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _serve(self) -> None:
            body = self._body() if self.command == "POST" else b""
            url = urlsplit(self.path)
            repo_path, _, rest = url.path.lstrip("/").partition(".git/")
            service = (parse_qs(url.query).get("service") or [rest])[0]
            if service not in ("git-upload-pack", "git-receive-pack") or repo_path.count("/") != 1:
                self._answer(404, b"not found\n")
                return

            user, token = None, None
            scheme, _, value = (self.headers.get("Authorization") or "").partition(" ")
            if scheme.lower() == "basic":
                user, _, token = base64.b64decode(value.strip()).decode(errors="replace").partition(":")
            if not token:
                status = 401
            else:
                owner, repo = repo_path.split("/")
                status = server.standin.authorize_git(token, owner, repo, push=service == "git-receive-pack")
            server.log.append(GitRequest(self.command, repo_path, service, user, status))
            if status == 401:
                self._answer(401, b"Authentication failed\n", {"WWW-Authenticate": 'Basic realm="GitHub"'})
            elif status != 200:
                self._answer(status, b"Repository not found.\n" if status == 404 else b"Permission denied.\n")
            else:
                self._backend(url.path, url.query, body, user or "")

        def _backend(self, path: str, query: str, body: bytes, user: str) -> None:
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "GIT_PROJECT_ROOT": str(server.root), "GIT_HTTP_EXPORT_ALL": "1", "GIT_CONFIG_NOSYSTEM": "1",
                "HOME": str(server.root), "REQUEST_METHOD": self.command, "PATH_INFO": path, "QUERY_STRING": query,
                "CONTENT_TYPE": self.headers.get("Content-Type", ""), "CONTENT_LENGTH": str(len(body)),
                "REMOTE_USER": user, "REMOTE_ADDR": self.client_address[0], "GATEWAY_INTERFACE": "CGI/1.1",
                "SERVER_PROTOCOL": "HTTP/1.1",
            }
            for header in ("Content-Encoding", "Git-Protocol"):
                if self.headers.get(header):
                    env["HTTP_" + header.upper().replace("-", "_")] = self.headers[header]
            out = subprocess.run([GIT, "http-backend"], input=body, env=env, capture_output=True, timeout=60)
            head, _, payload = out.stdout.partition(b"\r\n\r\n")
            if not _:
                head, _, payload = out.stdout.partition(b"\n\n")
            status, headers = 200, {}
            for line in head.decode("latin-1").splitlines():
                name, _, value = line.partition(":")
                if name.lower() == "status":
                    status = int(value.strip().split()[0])
                elif name:
                    headers[name.strip()] = value.strip()
            self._answer(status, payload, headers)

    return Handler


@pytest.fixture(scope="session")
def _git_server(github_standin: GitHubStandIn, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitServer]:
    if shutil.which("git") is None:
        pytest.fail("the git binary is missing: the git credential helper is tested with real git")
    server = GitServer(root=tmp_path_factory.mktemp("git-server") / "repos", standin=github_standin)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(server))
    server.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, name="git-server", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def git_server(_git_server: GitServer) -> GitServer:
    """The git server with fresh repositories and an empty log (the stand-in is reset too)."""
    _git_server.standin.reset()
    _git_server.reset()
    return _git_server
