"""An identity provider shaped like upstream's Keycloak (realm `pulse`, client
`pulse-ui`): an RSA key, its JWKS served over real HTTP, tokens with roles
under `realm_access.roles` and tenant ids that are not UUIDs; and a server
(with its gateway) configured to accept them."""

from __future__ import annotations

import http.server
import json
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from pulse_client import AsyncPulseClient

from server import config
from server.app import SERVICE_NAMES, RunningServer, start
from server.db import Database
from server.gateway.serve import running_gateway
from server.tenants import ensure_tenant, tenant_uuid

AUDIENCE = "pulse-ui"
ROLE_MAP = "customer=operator,tenant-admin=admin,read-only=viewer"
KID = "kc-rs256"


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwk(key: rsa.RSAPrivateKey, **fields: str) -> dict[str, Any]:
    return {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), **fields}


@dataclass(frozen=True)
class IdentityProvider:
    key: rsa.RSAPrivateKey
    issuer: str
    jwks_url: str

    def token(
        self,
        *,
        tenant: str,
        roles: list[str],
        key: rsa.RSAPrivateKey | bytes | None = None,
        kid: str = KID,
        algorithm: str = "RS256",
        **claims: Any,
    ) -> str:
        """An access token as Keycloak issues them; `claims` override or, set
        to None, remove claims."""
        now = int(time.time())
        payload: dict[str, Any] = {
            "exp": now + 300,
            "iat": now,
            "jti": str(uuid.uuid4()),
            "iss": self.issuer,
            "aud": [AUDIENCE, "account"],
            "sub": str(uuid.uuid4()),
            "typ": "Bearer",
            "azp": AUDIENCE,
            "tenant_id": tenant,
            "realm_access": {"roles": roles},
            "preferred_username": "customer1",
            "email": "customer1@tenant-a.example.com",
        }
        payload.update(claims)
        payload = {name: value for name, value in payload.items() if value is not None}
        signing_key = self.key if key is None else key
        return jwt.encode(payload, signing_key, algorithm=algorithm, headers={"kid": kid})


def _serve_jwks(document: bytes, path: str) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            found = self.path == path
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(document if found else b"{}")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)


@pytest.fixture(scope="session")
def idp() -> Iterator[IdentityProvider]:
    key = new_key()
    # Keycloak publishes an encryption key beside the signing one; it must
    # be passed over, not break the lookup.
    document = json.dumps(
        {
            "keys": [
                _jwk(key, kid=KID, use="sig", alg="RS256"),
                _jwk(new_key(), kid="kc-rsa-oaep", use="enc", alg="RSA-OAEP"),
            ]
        }
    ).encode()
    realm = "/realms/pulse"
    certs = f"{realm}/protocol/openid-connect/certs"
    server = _serve_jwks(document, certs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield IdentityProvider(key, issuer=base + realm, jwks_url=base + certs)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="session")
def keycloak_settings(
    idp: IdentityProvider, tmp_path_factory: pytest.TempPathFactory
) -> config.Settings:
    return config.load(
        {
            "PULSE_DATA_DIR": str(tmp_path_factory.mktemp("pulse-keycloak")),
            "PULSE_SECRET": secrets.token_hex(32),
            "PULSE_GRPC_PORT": "0",
            "PULSE_DB_POOL_SIZE": "4",
            "PULSE_JWKS_URL": idp.jwks_url,
            "PULSE_JWT_AUDIENCE": AUDIENCE,
            "PULSE_AUTH_ISSUER": idp.issuer,
            "PULSE_AUTH_TENANT_CLAIM": "tenant_id",
            "PULSE_AUTH_ROLES_CLAIM": "realm_access.roles",
            "PULSE_AUTH_ROLE_MAP": ROLE_MAP,
        }
    )


@pytest.fixture(scope="session")
async def keycloak_server(
    keycloak_settings: config.Settings, dsn: str
) -> AsyncIterator[RunningServer]:
    server = await start(keycloak_settings, dsn)
    try:
        yield server
    finally:
        await server.stop(grace=1.0)


@pytest.fixture(scope="session")
def keycloak_target(keycloak_server: RunningServer) -> str:
    return f"127.0.0.1:{keycloak_server.port}"


@pytest.fixture(scope="session")
async def keycloak_gateway(keycloak_target: str) -> AsyncIterator[str]:
    async with running_gateway(keycloak_target, SERVICE_NAMES, host="127.0.0.1", port=0) as port:
        yield f"http://127.0.0.1:{port}"


KeycloakClients = Callable[[str], Awaitable[AsyncPulseClient]]


@pytest.fixture
async def keycloak_client(keycloak_target: str) -> AsyncIterator[KeycloakClients]:
    """Typed clients of the Keycloak-configured server; closed after the test."""
    opened: list[AsyncPulseClient] = []

    async def factory(token: str) -> AsyncPulseClient:
        client = await AsyncPulseClient.connect(keycloak_target, token=token)
        opened.append(client)
        return client

    yield factory
    for client in opened:
        await client.close()


@pytest.fixture
async def external_tenant(db: Database) -> str:
    """A new tenant known by an identity provider's id, created as
    `pulse tenant add` creates it."""
    external_id = f"acme-{secrets.token_hex(4)}"
    async with db.admin() as con:
        await ensure_tenant(con, tenant_uuid(external_id), external_id, external_id=external_id)
    return external_id
