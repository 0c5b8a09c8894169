"""Settings: every knob the broker reads, from BROKER_* environment variables.

Each default says why it is what it is. Production needs a few things set explicitly (see
`Settings.check_for_production`); the embedded default (`broker-cli dev`) generates what is
missing into `state_dir` and says loudly, once, that it is not for production.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker.audit.note import AuditWitness
from broker.errors import ConfigError
from broker.identity.oidc import OidcConfig, is_loopback, parse_orchestrator_clients
from broker.identity.workload import TrustedIssuer, parse_trusted_issuers
from broker.principals import canonical_human, principal_problem

ASCII_BLANKS = " \t\r\n"
RECEIVER_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
RECEIVER_FIELDS = {"name", "url", "audience"}


@dataclass(frozen=True)
class SecurityEventReceiver:
    """Where Security Event Tokens are pushed (RFC 8935), and the `aud` they carry there."""

    name: str  # metrics, logs and the outbox row name it; its token is looked up by it at send time
    url: str
    audience: str
    token: str | None = None  # sent as `Authorization: Bearer <token>` when set


class Settings(BaseSettings):
    # extra="allow": a provider's setting given here by name (tests, tools) is kept for the
    # provider's own settings model (broker.plugins.PluginContext.settings_for).
    model_config = SettingsConfigDict(env_prefix="BROKER_", extra="allow", case_sensitive=False)

    # --- where state lives -------------------------------------------------------------
    # SQLite keeps the embedded default free of outside services; set a postgresql+psycopg://
    # URL for production and for several replicas.
    database_url: str = "sqlite:///.broker/broker.db"
    # Embedded default only: generated signing keys, encryption key and admin token go here,
    # in files readable by the owner alone.
    state_dir: Path = Path(".broker")
    # True only under `broker-cli dev`: generate missing secrets instead of refusing to start.
    embedded: bool = False

    # --- policy --------------------------------------------------------------------------
    policy_file: Path | None = None
    # Evaluated beside the enforced policy and only logged: roll a stricter policy out by watching.
    shadow_policy_file: Path | None = None

    # --- identity and keys -----------------------------------------------------------------
    # `iss` of every token the broker signs; also the URL clients are told to reach.
    issuer: str = "http://127.0.0.1:8080"
    # `aud` of session tokens: a session token is good for the broker and nothing else.
    audience: str = "jit-broker"
    # Directory of Ed25519 PEM keys; the newest signs, older ones stay in JWKS until their
    # tokens can no longer be valid. Required outside the embedded default.
    signing_key_dir: Path | None = None
    # 32 bytes, base64: seals secrets that revocation needs (GitHub tokens) and idempotent
    # replays. Required outside the embedded default; no default, a guessable key is worse.
    encryption_key: SecretStr | None = None
    # "name=<sha256 hex of the key>" entries, comma separated: keys are stored hashed only.
    orchestrator_api_keys: str = ""
    # SHA-256 hex of the local admin token (embedded default writes `state_dir/admin-token`).
    admin_token_sha256: str | None = None
    # "email=<sha256 hex of the token>" entries, comma separated: local human identities for a
    # broker without an IdP (the embedded default writes `state_dir/human-token`). Hashed only.
    human_tokens: str = ""
    # HMAC secrets for orchestrator webhooks, comma separated: several at once for rotation.
    webhook_secrets: SecretStr | None = None
    # Webhook timestamps older (or newer) than this are replays or clock trouble.
    webhook_tolerance_seconds: int = 300

    # --- humans (and orchestrators) through an OpenID provider ---------------------------------
    # The IdP whose tokens prove humans (Okta, Entra ID, Keycloak, Google...). Unset: no human
    # identity from an IdP (API keys and the local admin token still work). https only, except
    # on loopback for tests.
    oidc_issuer: str | None = None
    # The one `aud` a token must carry to be a login here. One value, never a list: a token
    # minted for another API of the same IdP must not open the broker.
    oidc_audience: str | None = None
    # The claim that names the person; in its canonical form (printable ASCII, ASCII letters
    # lowercased, see docs/identity.md) it is the principal policy `humans` keys use. A token
    # whose claim has no canonical form is refused (401 invalid-principal).
    # `email` matches the policy file's keys; `preferred_username` or `upn` where email is absent.
    oidc_principal_claim: str = "email"
    # The claim (a dotted path reaches nested ones, e.g. Keycloak's `realm_access.roles`) whose
    # values join the policy's own group membership. Missing claim: no IdP groups.
    oidc_groups_claim: str = "groups"
    # "client_id=orchestrator-name" entries, comma separated: client-credentials tokens of these
    # clients act as that orchestrator. A client not listed is never an orchestrator.
    oidc_orchestrator_clients: str = ""
    # Clock skew allowed between the IdP and the broker on exp/nbf/iat; capped at 60 s so an
    # expired token is not honoured for long.
    oidc_leeway_seconds: int = Field(default=30, ge=0, le=60)
    # At most one JWKS re-read per this interval when tokens name an unknown kid: key rotation
    # is picked up at once, a flood of forged kids cannot turn the broker against the IdP.
    oidc_jwks_refresh_cooldown_seconds: float = Field(default=30.0, gt=0)
    # Keys are re-read at least this often even when every kid is known (revoked keys go away).
    oidc_jwks_max_age_seconds: float = Field(default=3600.0, gt=0)
    # Discovery and JWKS fetches: a slow IdP must not hold a request for long.
    oidc_timeout_seconds: float = Field(default=5.0, gt=0)
    # For `broker-cli login` (published at GET /v1/login, nothing secret): the public client
    # registered for the device authorization grant, and the scopes it asks for.
    # offline_access brings a refresh token, so a person signs in once a day, not once an hour.
    oidc_cli_client_id: str | None = None
    oidc_cli_scope: str = "openid email groups offline_access"
    # RFC 8707 resource indicator the CLI sends, for IdPs that pick the audience by it
    # (Keycloak, oidc-provider); unset for those that pick it by scope (Okta, Entra ID).
    oidc_cli_resource: str | None = None

    # --- machines through their platform's own tokens (docs/workload-identity.md) ---------------
    # The server allowlist of workload issuers: OIDC issuers (GitHub Actions, GitLab, Buildkite,
    # Kubernetes service-account issuers) and SPIFFE trust domains with their bundle. It lives
    # outside the policy file on purpose: a trust rule naming an issuer not listed here lets
    # nothing in. A comma-separated list of issuer URLs (RS256 pinned), or a JSON list of URLs and
    # {"issuer", "algorithms", "bundle"} objects. Empty: no workload token is accepted.
    trusted_issuers: str = ""
    # Clock skew allowed on a workload token's exp/nbf/iat; capped at 60 s, as for humans.
    workload_leeway_seconds: int = Field(default=30, ge=0, le=60)
    # At most one key re-read per issuer per this interval when tokens name an unknown kid:
    # rotation is picked up at once, a storm of made-up kids cannot turn the broker on the issuer.
    workload_jwks_refresh_cooldown_seconds: float = Field(default=30.0, gt=0)
    # Keys (and SPIFFE bundles) are re-read at least this often even when every kid is known.
    workload_jwks_max_age_seconds: float = Field(default=300.0, gt=0)
    workload_timeout_seconds: float = Field(default=5.0, gt=0)
    # Longest life (exp - iat) of a workload token the broker accepts. Platforms issue minutes to
    # hours (GitHub Actions ~5 min to 1 h, Kubernetes 1 h by default and 48 h at most by kubelet
    # refresh, SPIRE 5 min); a token that lives longer is a standing secret by another name.
    workload_max_token_lifetime_seconds: int = Field(default=48 * 3600, ge=60, le=7 * 86400)

    # --- the approver's console (/console/) ----------------------------------------------------
    # Where people reach the broker: approval links in notifications, the console's OIDC
    # redirect URI ({public_url}/console/auth/callback), and whether its cookie is Secure (it is,
    # unless this is plain http on loopback). Unset: BROKER_ISSUER.
    public_url: str | None = None
    # The confidential web client registered at the IdP for the console's authorization code +
    # PKCE sign-in (redirect URI above). Unset: the console offers no IdP sign-in.
    console_oidc_client_id: str | None = None
    console_oidc_client_secret: SecretStr | None = None
    # No offline_access: the console keeps no IdP token; it signs the person in for a bounded
    # time and forgets the tokens.
    console_oidc_scope: str = "openid email groups"
    # RFC 8707 resource indicator, for IdPs that pick the access token's audience by it
    # (Keycloak, oidc-provider); unset for those that pick it by scope (Okta, Entra ID).
    console_oidc_resource: str | None = None
    # A console sign-in lasts at most a working day, and ends after an hour without a request:
    # an unattended laptop stops approving things on its own.
    console_session_ttl_seconds: int = Field(default=8 * 3600, ge=300, le=7 * 86400)
    console_idle_seconds: int = Field(default=3600, ge=60, le=86400)
    # The link a card shows for a task that names a repository and an issue (task_id
    # "owner/repo#42", or labels repository + issue_number); labels task_url/issue_url win.
    console_issue_url_template: str = "https://github.com/{repository}/issues/{issue}"

    # --- the broker as the authorization server of MCP servers (docs/mcp.md) -----------------------
    # Pre-registered OAuth clients, a JSON object: {"<client_id>": {"redirect_uris": [...],
    # "client_secret_sha256"?: "<hex>", "client_name"?: "...", "agent"?: "<policy agent>"}}. A
    # client without a secret is public (PKCE alone); with one it is confidential, which the
    # ID-JAG grant requires. Empty: only Client ID Metadata Documents identify clients.
    oauth_clients: str = ""
    # The policy's agent name a client acts as in the sessions its authorizations open, unless its
    # pre-registration names another: the agent layer's ceiling applies to MCP clients too.
    mcp_agent: str = "mcp-client"
    # The session an authorization (a person's consent, or an ID-JAG) opens lives this long; its
    # refresh tokens die with it. A working day, as a console sign-in.
    mcp_session_ttl_seconds: int = Field(default=8 * 3600, ge=300, le=7 * 86400)
    # An authorization request waits this long for the person; a code must be redeemed this fast.
    oauth_authorization_ttl_seconds: int = Field(default=600, ge=60, le=3600)
    oauth_code_ttl_seconds: int = Field(default=60, ge=10, le=600)
    # Client ID Metadata Documents: fetched with these bounds (a client's document is small), and
    # cached this long, at most this many, so a burst of authorizations is one fetch.
    cimd_max_bytes: int = Field(default=5 * 1024, ge=512, le=64 * 1024)
    cimd_timeout_seconds: float = Field(default=3.0, gt=0, le=30)
    cimd_cache_seconds: int = Field(default=300, ge=0, le=86400)
    cimd_cache_entries: int = Field(default=256, ge=1, le=100_000)
    # TESTS ONLY: allow http:// and loopback client_id URLs (never private or link-local ones).
    # The broker warns at start when it is set.
    cimd_allow_loopback: bool = False
    # IdPs whose Identity Assertion JWT Authorization Grants (ID-JAG) the token endpoint accepts,
    # a JSON object {"<issuer>": "<jwks_uri>"}; and the claim naming the person (the policy's
    # `humans:` keys are emails). Empty: the jwt-bearer grant is refused.
    idjag_issuers: str = ""
    idjag_principal_claim: str = "email"

    # --- lifecycle ---------------------------------------------------------------------------
    # A task that runs longer than a working day should ask again.
    session_max_ttl_seconds: int = Field(default=86400, ge=60)
    # How often the sweeper looks for expired leases: the upper bound of expiry lag.
    sweep_interval_seconds: float = Field(default=1.0, gt=0)
    # The audit linker (docs/audit.md): how often it folds committed records into the Merkle
    # tree, how many per round, and how often it signs a checkpoint while the log grows.
    audit_link_interval_seconds: float = Field(default=0.2, gt=0)
    audit_link_batch: int = Field(default=1000, ge=1, le=100_000)
    audit_checkpoint_interval_seconds: float = Field(default=10.0, ge=0)
    # Witnesses (C2SP tlog-witness) that cosign the checkpoints: a JSON list of {"url", "vkey"}
    # objects, vkey the witness's cosignature/v1 verifier key. Empty: checkpoints are only signed.
    audit_witnesses: str = ""
    # How often the newest checkpoint goes to the witnesses that have not cosigned it (a
    # checkpoint is signed at most every audit_checkpoint_interval_seconds anyway), and how long
    # one witness may take to answer: it must never hold up the next one.
    audit_witness_interval_seconds: float = Field(default=10.0, gt=0)
    audit_witness_timeout_seconds: float = Field(default=10.0, gt=0)
    # Stall (docs/lifecycle.md): a session's liveness is written at most once per this many
    # seconds per replica (a quarter of its idle timeout if that is shorter), so requests do not
    # each cost a write; a stalled session ends up to this much later than its timeout.
    liveness_granularity_seconds: int = Field(default=15, ge=1, le=3600)
    # Bounded batches keep each sweep short and its cost proportional to what expires.
    sweep_batch_size: int = Field(default=500, ge=1)
    # A replica that claimed rows and died releases them after this long.
    claim_seconds: int = Field(default=60, ge=5)
    # How long an Idempotency-Key is remembered (its replay is sealed, never stored in clear).
    idempotency_ttl_seconds: int = Field(default=86400, ge=60)

    # --- approvals and their notifications -------------------------------------------------------
    # How long a pending approval waits for its approvers, and how long an approved one stays
    # usable: long enough for a person to look, short enough that a stale request dies.
    approval_ttl_seconds: int = Field(default=900, ge=30, le=86400)
    # Longest `GET /v1/approvals/{id}?wait=` the broker honours: below common proxy timeouts.
    approval_max_wait_seconds: int = Field(default=60, ge=1, le=300)
    # A long poll re-reads the database this often, to see decisions made on other replicas
    # (decisions in this process wake it at once).
    approval_poll_recheck_seconds: float = Field(default=2.0, gt=0)
    # Where `approval.requested` / `approval.decided` are pushed (comma separated URLs), and the
    # HMAC secret they are signed with (X-Broker-Signature, the orchestrator webhook's scheme).
    approval_webhook_urls: str = ""
    approval_webhook_secret: SecretStr | None = None
    # Outbox delivery: how often the loop looks for due messages, and when it gives one up.
    outbox_interval_seconds: float = Field(default=1.0, gt=0)
    outbox_max_attempts: int = Field(default=20, ge=1)
    outbox_timeout_seconds: float = Field(default=5.0, gt=0)

    # --- security events (docs/security-events.md) ------------------------------------------------
    # Receivers of the Security Event Tokens (RFC 8417; CAEP session-revoked, credential-change)
    # pushed per RFC 8935: a JSON list of {"name", "url", "audience"} objects. Empty: none written.
    security_event_receivers: str = ""
    # "name=token" entries, comma separated: the bearer token a named receiver wants. A secret,
    # kept apart from the list above so the list can sit in plain configuration.
    security_event_receiver_tokens: SecretStr | None = None
    # OpenID SSF 1.0 receivers that manage their own streams (docs/security-events.md): "name=<sha256
    # hex of its bearer token>" entries, comma separated. Hashed, as orchestrator keys are: a copy
    # of the configuration lets nobody act as a receiver. Empty: the stream endpoints answer 401.
    ssf_receiver_tokens: SecretStr | None = None
    # A receiver's streams are rows and their events wait in a table: both bounded per receiver.
    ssf_max_streams_per_receiver: int = Field(default=10, ge=1, le=1000)
    ssf_max_queued_events_per_stream: int = Field(default=10_000, ge=1)

    # --- live permission sources ----------------------------------------------------------------
    # How long a live source's allow/deny is reused: a burst costs one backend call, and a human
    # who lost a permission keeps it at most this long for new requests (the re-check below ends
    # what was already minted). 0 disables caching; concurrent asks still share one call.
    permission_cache_seconds: float = Field(default=60.0, ge=0)
    # How often live capabilities whose rule names a live source are checked again, bypassing
    # the cache, and revoked where the human lost the permission since mint. A check per
    # distinct (human, resource, access) per interval: five minutes keeps GitHub's rate limit far.
    permission_recheck_seconds: float = Field(default=300.0, gt=0)
    # Backend calls one caller (an agent session, or a human on `policy explain`) may cause:
    # a bucket of this many, refilled at this many per `live_check_budget_seconds`. Cached
    # answers are free. Past it: 429 live-check-budget-exceeded. A GitHub App has about 5000
    # calls an hour for everyone; 20 a minute keeps one caller to a fraction of it. 0: no budget.
    live_check_budget: int = Field(default=20, ge=0)
    live_check_budget_seconds: float = Field(default=60.0, gt=0)

    # --- providers ------------------------------------------------------------------------------
    # No backend call may hang a request: every SDK gets this timeout.
    provider_timeout_seconds: float = Field(default=10.0, gt=0)

    # Each provider's own settings (BROKER_VAULT_*, BROKER_AWS_*, BROKER_GITHUB_* ...) live in its
    # package (broker/providers/<name>/settings.py), read when the policy names it.

    # --- serving ---------------------------------------------------------------------------------
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8080
    log_level: str = "info"
    # text for people reading a terminal; json (one object a line, with the request id) for a
    # log pipeline. See broker/logs.py.
    log_format: Literal["text", "json"] = "text"

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, v: str) -> str:
        if not (v.startswith("sqlite") or v.startswith("postgresql")):
            raise ValueError("BROKER_DATABASE_URL must be a sqlite:/// or postgresql+psycopg:// URL")
        return v

    def orchestrator_key_hashes(self) -> dict[str, str]:
        """sha256 hex -> orchestrator name."""
        out: dict[str, str] = {}
        for entry in filter(None, (e.strip() for e in self.orchestrator_api_keys.split(","))):
            name, sep, digest = entry.partition("=")
            digest = digest.removeprefix("sha256:").lower()
            if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ConfigError(
                    "BROKER_ORCHESTRATOR_API_KEYS entries must look like name=<64 hex chars of sha256(key)>; "
                    "`broker-cli init` prints one"
                )
            out[digest] = name
        return out

    def oidc_config(self) -> OidcConfig | None:
        """The verifier's settings, checked; None when no IdP is configured."""
        if not self.oidc_issuer:
            return None
        if self.oidc_issuer.rstrip("/") == self.issuer.rstrip("/"):
            raise ConfigError("BROKER_OIDC_ISSUER must be the IdP, not the broker's own BROKER_ISSUER")
        return OidcConfig(
            issuer=self.oidc_issuer,
            audience=self.oidc_audience or "",
            principal_claim=self.oidc_principal_claim,
            groups_claim=self.oidc_groups_claim,
            orchestrator_clients=parse_orchestrator_clients(self.oidc_orchestrator_clients),
            leeway_seconds=self.oidc_leeway_seconds,
            jwks_refresh_cooldown_seconds=self.oidc_jwks_refresh_cooldown_seconds,
            jwks_max_age_seconds=self.oidc_jwks_max_age_seconds,
            timeout_seconds=self.oidc_timeout_seconds,
        )

    def trusted_issuer_map(self) -> dict[str, TrustedIssuer]:
        """BROKER_TRUSTED_ISSUERS, checked; the broker's own issuer and the human IdP are never in it."""
        issuers = parse_trusted_issuers(self.trusted_issuers)
        for own in filter(None, (self.issuer, self.oidc_issuer)):
            if own in issuers or own.rstrip("/") in issuers:
                raise ConfigError(f"BROKER_TRUSTED_ISSUERS names {own!r}, the broker's own issuer or the human IdP: "
                                  "machines from there authenticate as documented for it, not by trust rules")
        return issuers

    def human_token_hashes(self) -> dict[str, str]:
        """sha256 hex -> the canonical principal (broker.principals) of a local human."""
        out: dict[str, str] = {}
        # Only ASCII blanks around entries are layout; any other character is part of the name
        # and must pass the canonical form (a NBSP is refused, never trimmed).
        for entry in filter(None, (e.strip(ASCII_BLANKS) for e in self.human_tokens.split(","))):
            email, sep, digest = entry.rpartition("=")
            digest = digest.removeprefix("sha256:").lower()
            if not sep or "@" not in email or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ConfigError("BROKER_HUMAN_TOKENS entries must look like email=<64 hex chars of sha256(token)>")
            problem = principal_problem(email.strip(ASCII_BLANKS))
            if problem is not None:
                raise ConfigError(f"BROKER_HUMAN_TOKENS names {email.strip(ASCII_BLANKS)!r}, not a principal: {problem}")
            out[digest] = canonical_human(email.strip(ASCII_BLANKS))
        return out

    def approval_webhook_url_list(self) -> list[str]:
        urls = [u.strip() for u in self.approval_webhook_urls.split(",") if u.strip()]
        for url in urls:
            if not (url.startswith("https://") or url.startswith("http://")):
                raise ConfigError(f"BROKER_APPROVAL_WEBHOOK_URLS: {url!r} is not an http(s) URL")
        if urls and self.approval_webhook_secret is None:
            raise ConfigError("BROKER_APPROVAL_WEBHOOK_URLS is set but BROKER_APPROVAL_WEBHOOK_SECRET is not: "
                              "receivers could not tell the broker's pushes from anyone else's")
        return urls

    def security_event_receiver_list(self) -> list[SecurityEventReceiver]:
        """The configured receivers, checked; their tokens attached."""
        what = "BROKER_SECURITY_EVENT_RECEIVERS"
        if not self.security_event_receivers.strip():
            entries: list[object] = []
        else:
            try:
                parsed = json.loads(self.security_event_receivers)
            except ValueError:
                raise ConfigError(f'{what} must be a JSON list of {{"name", "url", "audience"}} objects') from None
            if not isinstance(parsed, list):
                raise ConfigError(f'{what} must be a JSON list of {{"name", "url", "audience"}} objects')
            entries = parsed
        tokens = self._receiver_tokens()
        receivers: list[SecurityEventReceiver] = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or set(entry) != RECEIVER_FIELDS or \
                    not all(isinstance(v, str) and v.strip() for v in entry.values()):
                raise ConfigError(f'{what}[{i}] must have exactly "name", "url" and "audience", each a non-empty string')
            name, url, audience = entry["name"], entry["url"].strip(), entry["audience"].strip()
            if not RECEIVER_NAME.match(name):
                raise ConfigError(f"{what}[{i}]: name {name!r} must be lowercase letters, digits and dashes (at most 63)")
            if any(r.name == name for r in receivers):
                raise ConfigError(f"{what}: the name {name!r} is used twice")
            if not url.startswith(("https://", "http://")) or len(url) > 2048:
                raise ConfigError(f"{what}[{i}]: {url!r} is not an http(s) URL")
            token = tokens.pop(name, None)
            if token is not None and url.startswith("http://") and not is_loopback(url):
                raise ConfigError(f"{what}[{i}]: receiver {name!r} has a token but a plain http URL: "
                                  "the token would cross the network in clear (use https)")
            receivers.append(SecurityEventReceiver(name=name, url=url, audience=audience, token=token))
        if tokens:
            raise ConfigError(f"BROKER_SECURITY_EVENT_RECEIVER_TOKENS names receivers that are not configured: "
                              f"{', '.join(sorted(tokens))}")
        return receivers

    def audit_witness_list(self) -> list[AuditWitness]:
        """The configured witnesses, checked (each vkey parses as a cosignature/v1 key)."""
        from broker.audit.note import COSIGNATURE_V1, NoteError, parse_vkey

        what = "BROKER_AUDIT_WITNESSES"
        if not self.audit_witnesses.strip():
            return []
        try:
            parsed = json.loads(self.audit_witnesses)
        except ValueError:
            raise ConfigError(f'{what} must be a JSON list of {{"url", "vkey"}} objects') from None
        if not isinstance(parsed, list):
            raise ConfigError(f'{what} must be a JSON list of {{"url", "vkey"}} objects')
        out: list[AuditWitness] = []
        for i, entry in enumerate(parsed):
            if not isinstance(entry, dict) or set(entry) != {"url", "vkey"} or \
                    not all(isinstance(v, str) and v.strip() for v in entry.values()):
                raise ConfigError(f'{what}[{i}] must have exactly "url" and "vkey", each a non-empty string')
            url = entry["url"].strip().rstrip("/")
            if not url.startswith(("https://", "http://")) or len(url) > 2048:
                raise ConfigError(f"{what}[{i}]: {url!r} is not an http(s) URL")
            try:
                parse_vkey(entry["vkey"], types=(COSIGNATURE_V1,))
            except NoteError as exc:
                raise ConfigError(f"{what}[{i}]: {exc}") from None
            witness = AuditWitness(url=url, vkey=entry["vkey"].strip())
            if any(w.label == witness.label for w in out):
                raise ConfigError(f"{what}: the witness {witness.label} is listed twice")
            out.append(witness)
        return out

    def ssf_receiver_hashes(self) -> dict[str, str]:
        """sha256 hex of a receiver's bearer token -> its name."""
        raw = self.ssf_receiver_tokens.get_secret_value() if self.ssf_receiver_tokens else ""
        out: dict[str, str] = {}
        for entry in filter(None, (e.strip() for e in raw.split(","))):
            name, sep, digest = entry.partition("=")
            name, digest = name.strip(), digest.strip().removeprefix("sha256:").lower()
            if not sep or not RECEIVER_NAME.match(name) or len(digest) != 64 or \
                    any(c not in "0123456789abcdef" for c in digest):
                raise ConfigError("BROKER_SSF_RECEIVER_TOKENS entries must look like name=<64 hex chars of "
                                  "sha256(token)>, the name lowercase letters, digits and dashes")
            if name in out.values():
                raise ConfigError(f"BROKER_SSF_RECEIVER_TOKENS: the name {name!r} is used twice")
            out[digest] = name
        return out

    def _receiver_tokens(self) -> dict[str, str]:
        raw = self.security_event_receiver_tokens.get_secret_value() if self.security_event_receiver_tokens else ""
        out: dict[str, str] = {}
        for entry in filter(None, (e.strip() for e in raw.split(","))):
            name, sep, token = entry.partition("=")
            if not sep or not token.strip():
                raise ConfigError("BROKER_SECURITY_EVENT_RECEIVER_TOKENS entries must look like name=token")
            out[name.strip()] = token.strip()
        return out

    def public_base_url(self) -> str:
        """Where people reach the broker, without a trailing slash."""
        return (self.public_url or self.issuer).rstrip("/")

    def webhook_secret_list(self) -> list[bytes]:
        raw = self.webhook_secrets.get_secret_value() if self.webhook_secrets else ""
        return [s.strip().encode() for s in raw.split(",") if s.strip()]

    def check_for_production(self) -> None:
        """Refuse to start without what production needs; say exactly what to set."""
        if self.embedded:
            return
        missing = []
        if self.policy_file is None:
            missing.append("BROKER_POLICY_FILE (path to the policy YAML; `broker-cli init` writes an example)")
        if self.signing_key_dir is None:
            missing.append("BROKER_SIGNING_KEY_DIR (directory of Ed25519 PEM keys; `broker-cli keys rotate` makes one)")
        if self.encryption_key is None:
            missing.append("BROKER_ENCRYPTION_KEY (32 random bytes, base64; `broker-cli init` prints one)")
        if not self.orchestrator_api_keys and not self.admin_token_sha256 and not self.oidc_issuer \
                and not self.trusted_issuer_map():
            missing.append(
                "BROKER_ORCHESTRATOR_API_KEYS, BROKER_ADMIN_TOKEN_SHA256, BROKER_OIDC_ISSUER or BROKER_TRUSTED_ISSUERS "
                "(or nobody can call the broker)"
            )
        if missing:
            raise ConfigError(
                "refusing to start: set " + "; ".join(missing) + ". For a local trial run `broker-cli dev`."
            )
        self.orchestrator_key_hashes()  # validates the format
        self.oidc_config()
        self.trusted_issuer_map()
        self.human_token_hashes()
        self.approval_webhook_url_list()
        self.security_event_receiver_list()
        self.audit_witness_list()
        self.ssf_receiver_hashes()
        self.check_console()

    def check_console(self) -> None:
        """The console's settings agree with each other (also checked for the embedded default)."""
        if not self.public_base_url().startswith(("https://", "http://")):
            raise ConfigError("BROKER_PUBLIC_URL must be an http(s) URL: where people reach the broker")
        if self.console_oidc_client_id and not self.oidc_issuer:
            raise ConfigError("BROKER_CONSOLE_OIDC_CLIENT_ID is set but BROKER_OIDC_ISSUER is not: the console signs "
                              "people in at the IdP that proves them to the API")
        if self.console_oidc_client_id and self.console_oidc_client_secret is None:
            raise ConfigError("BROKER_CONSOLE_OIDC_CLIENT_SECRET is required with BROKER_CONSOLE_OIDC_CLIENT_ID: the "
                              "console is a confidential web client")
