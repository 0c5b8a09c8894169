// A real OpenID provider for jit-broker's tests: panva's certified `oidc-provider`, configured
// like a company IdP would be for the broker.
//
//   node provider.js CONFIG.json
//
// CONFIG (written by tests/support/oidc.py):
//   port         loopback port to listen on; 0 lets the OS pick (the issuer follows the port)
//   jwks         {keys: [private JWK]}: the signing keys; the test suite made them, so it can
//                also forge tokens with them (expired, not yet valid, wrong issuer)
//   resources    {indicator: {audience, scope, ttl}}: resource servers whose access tokens are
//                JWTs (RFC 9068) for `audience`; the first is the default for the CLI client
//   accounts     {login: {email, email_verified, groups}}: who may sign in (any password)
//   clients      oidc-provider client metadata (the CLI's public device-flow client, the
//                orchestrators' client-credentials clients)
//   registration_token  the initial access token for dynamic client registration (RFC 7591,
//                POST /reg): a test registers the console's web client (authorization code,
//                PKCE required) once it knows the broker's port, i.e. its redirect URI
//
// Prints one JSON line {"issuer": ...} on stdout once it listens. GET /__stats answers how
// often the JWKS was fetched, so tests can count the broker's refreshes.
// Dev interactions are on: the login and consent pages take any password over plain HTTP,
// which is what lets a test play the human. Never a production configuration.

import { readFileSync } from 'node:fs';
import http from 'node:http';
import Provider, { errors } from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2] ?? process.env.OIDC_PROVIDER_CONFIG, 'utf8'));
const resources = config.resources ?? {};
const defaultIndicator = Object.keys(resources)[0];
const accounts = config.accounts ?? {};
const stats = { jwks: 0, token: 0 };

function accountClaims(login) {
  const account = accounts[login];
  if (!account) return undefined;
  return {
    email: account.email,
    email_verified: account.email_verified ?? true,
    groups: account.groups ?? [],
  };
}

const server = http.createServer();
server.listen(config.port ?? 0, '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;

  const provider = new Provider(issuer, {
    clients: config.clients ?? [],
    jwks: config.jwks,
    scopes: ['openid', 'offline_access', 'email', 'groups'],
    claims: {
      openid: ['sub'],
      email: ['email', 'email_verified'],
      groups: ['groups'],
    },
    async findAccount(_ctx, sub) {
      const claims = accountClaims(sub);
      if (!claims) return undefined;
      return {
        accountId: sub,
        async claims() {
          return { sub, ...claims };
        },
      };
    },
    // Company IdPs put who and which groups into the access token the API receives (Okta's
    // custom claims, Entra's `groups`, Keycloak's mappers); this does the same.
    async extraTokenClaims(_ctx, token) {
      if (!token.accountId) return undefined; // client credentials: no person behind it
      return accountClaims(token.accountId);
    },
    features: {
      devInteractions: { enabled: true },
      deviceFlow: { enabled: true },
      clientCredentials: { enabled: true },
      revocation: { enabled: true },
      registration: { enabled: Boolean(config.registration_token), initialAccessToken: config.registration_token },
      resourceIndicators: {
        enabled: true,
        // The CLI does not have to name the broker: its tokens are for the first resource.
        async defaultResource(_ctx, _client, oneOf) {
          return oneOf ?? defaultIndicator;
        },
        // Refreshes keep the audience the person consented to.
        async useGrantedResource() {
          return true;
        },
        async getResourceServerInfo(_ctx, indicator) {
          const rs = resources[indicator];
          if (!rs) throw new errors.InvalidTarget();
          return {
            audience: rs.audience ?? indicator,
            scope: rs.scope ?? 'broker',
            accessTokenTTL: rs.ttl ?? 600,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg: 'RS256' } },
          };
        },
      },
    },
    // Device flow: a refresh token whenever offline_access was granted, as the CLI asks for.
    async issueRefreshToken(_ctx, client, code) {
      return client.grantTypeAllowed('refresh_token') && code.scopes.has('offline_access');
    },
    ttl: {
      DeviceCode: 600,
      RefreshToken: 86400,
      IdToken: 600,
      ClientCredentials: 600,
      Grant: 86400,
      Interaction: 600,
      Session: 86400,
    },
    // Authorization code clients (the broker's console) must use PKCE; the device flow has none.
    pkce: { required: (_ctx, client) => client.grantTypes.includes('authorization_code') },
    cookies: { keys: ['jit-broker-test-only-cookie-key'] },
  });
  provider.proxy = false;

  const callback = provider.callback();
  server.on('request', (req, res) => {
    if (req.url === '/__stats') {
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify(stats));
      return;
    }
    if (req.url.startsWith('/jwks')) stats.jwks += 1;
    if (req.url.startsWith('/token')) stats.token += 1;
    callback(req, res);
  });
  process.stdout.write(`${JSON.stringify({ issuer, port })}\n`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => process.exit(0));
}
