"""Upstream's Keycloak tokens, over the real server configured for them:
RS256 keys from a JWKS over HTTP, issuer and audience checked, roles from
`realm_access.roles` through the role map, tenant ids that are not UUIDs."""

from __future__ import annotations

import socket
import time

import httpx
import pulse_client as pc
import pytest

from server.auth import ClaimRules, Role, TokenVerifier, mint_token
from server.config import Settings
from server.db import Database
from server.errors import IdentityProviderUnavailable
from server.tenants import tenant_uuid
from tests.auth.conftest import IdentityProvider, KeycloakClients, new_key


async def _refused(connect: KeycloakClients, token: str) -> pc.PulseError:
    client = await connect(token)
    with pytest.raises(pc.PulseError) as info:
        await client.devices.get("ANY-1")
    return info.value


async def test_customer_is_an_operator_of_the_mapped_tenant(
    idp: IdentityProvider, keycloak_client: KeycloakClients, external_tenant: str, db: Database
) -> None:
    client = await keycloak_client(
        idp.token(tenant=external_tenant, roles=["customer", "offline_access"])
    )
    await client.devices.create("KC-1", name="Boiler")
    assert (await client.devices.get("KC-1")).name == "Boiler"
    # The row is the mapped tenant's: visible in its scope, to nobody else.
    async with db.tenant(tenant_uuid(external_tenant), readonly=True) as con:
        assert await con.fetchval("SELECT name FROM devices WHERE device_id = 'KC-1'") == "Boiler"
    with pytest.raises(pc.PermissionDenied) as info:
        await client.sites.create("site-1")
    assert "admin" in info.value.message and "operator" in info.value.message


async def test_highest_mapped_role_wins(
    idp: IdentityProvider, keycloak_client: KeycloakClients, external_tenant: str
) -> None:
    roles = ["offline_access", "customer", "tenant-admin", "default-roles-pulse"]
    client = await keycloak_client(idp.token(tenant=external_tenant, roles=roles))
    await client.sites.create("site-1")


async def test_viewer_mapped_role_reads_but_cannot_write(
    idp: IdentityProvider, keycloak_client: KeycloakClients, external_tenant: str
) -> None:
    operator = await keycloak_client(idp.token(tenant=external_tenant, roles=["customer"]))
    await operator.devices.create("KC-2")
    viewer = await keycloak_client(idp.token(tenant=external_tenant, roles=["read-only"]))
    assert (await viewer.devices.get("KC-2")).device_id == "KC-2"
    with pytest.raises(pc.PermissionDenied) as info:
        await viewer.devices.create("KC-3")
    assert "the token has viewer" in info.value.message


async def test_unmapped_roles_grant_nothing(
    idp: IdentityProvider, keycloak_client: KeycloakClients, external_tenant: str
) -> None:
    only_unmapped = idp.token(tenant=external_tenant, roles=["offline_access", "uma_authorization"])
    error = await _refused(keycloak_client, only_unmapped)
    assert isinstance(error, pc.PermissionDenied)
    assert "'offline_access'" in error.message and "PULSE_AUTH_ROLE_MAP" in error.message
    no_realm_access = idp.token(tenant=external_tenant, roles=[], realm_access=None)
    assert isinstance(await _refused(keycloak_client, no_realm_access), pc.PermissionDenied)


async def test_token_signed_by_another_key_is_unauthenticated(
    idp: IdentityProvider, keycloak_client: KeycloakClients, external_tenant: str
) -> None:
    # Another key under the provider's key id: the signature does not verify.
    forged = idp.token(tenant=external_tenant, roles=["tenant-admin"], key=new_key())
    error = await _refused(keycloak_client, forged)
    assert isinstance(error, pc.Unauthenticated)
    assert "signature" in error.message
    # A key id the provider does not publish (looked up again, then refused).
    unknown = idp.token(tenant=external_tenant, roles=["tenant-admin"], key=new_key(), kid="other")
    error = await _refused(keycloak_client, unknown)
    assert isinstance(error, pc.Unauthenticated)
    assert "other" in error.message


async def test_issuer_is_required_and_verified(
    idp: IdentityProvider, keycloak_client: KeycloakClients, external_tenant: str
) -> None:
    wrong = idp.token(tenant=external_tenant, roles=["customer"], iss=idp.issuer + "-other")
    error = await _refused(keycloak_client, wrong)
    assert isinstance(error, pc.Unauthenticated)
    assert "issuer" in error.message
    missing = idp.token(tenant=external_tenant, roles=["customer"], iss=None)
    error = await _refused(keycloak_client, missing)
    assert isinstance(error, pc.Unauthenticated)
    assert "'iss'" in error.message


async def test_audience_and_expiry_are_verified(
    idp: IdentityProvider, keycloak_client: KeycloakClients, external_tenant: str
) -> None:
    other_client = idp.token(tenant=external_tenant, roles=["customer"], aud="account")
    error = await _refused(keycloak_client, other_client)
    assert isinstance(error, pc.Unauthenticated)
    assert "audience" in error.message
    expired = idp.token(tenant=external_tenant, roles=["customer"], exp=int(time.time()) - 3600)
    error = await _refused(keycloak_client, expired)
    assert isinstance(error, pc.Unauthenticated)
    assert "expired" in error.message


async def test_hs256_is_refused_when_jwks_is_configured(
    idp: IdentityProvider,
    keycloak_client: KeycloakClients,
    keycloak_settings: Settings,
    external_tenant: str,
) -> None:
    # Signed with the server's own secret, every claim where it looks.
    dev = mint_token(
        keycloak_settings.secret,
        tenant_id=external_tenant,
        role=Role.ADMIN,
        audience=keycloak_settings.jwt_audience,
        issuer=keycloak_settings.auth_issuer,
        claims=keycloak_settings.auth_claims,
    )
    assert isinstance(await _refused(keycloak_client, dev), pc.Unauthenticated)
    # The same, naming the provider's key id: the algorithm is refused.
    hs_with_kid = idp.token(
        tenant=external_tenant, roles=["tenant-admin"], key=b"k" * 32, algorithm="HS256"
    )
    error = await _refused(keycloak_client, hs_with_kid)
    assert isinstance(error, pc.Unauthenticated)
    assert "alg" in error.message


async def test_tenant_must_be_usable_and_exist(
    idp: IdentityProvider, keycloak_client: KeycloakClients
) -> None:
    never_added = idp.token(tenant="never-added-tenant", roles=["customer"])
    error = await _refused(keycloak_client, never_added)
    assert isinstance(error, pc.PermissionDenied)
    assert error.reason == pc.ErrorReason.TENANT_NOT_FOUND
    assert str(tenant_uuid("never-added-tenant")) in error.message
    # Upstream's platform operators carry an empty tenant_id.
    for bad in ("", "acme/industrial"):
        error = await _refused(keycloak_client, idp.token(tenant=bad, roles=["customer"]))
        assert isinstance(error, pc.Unauthenticated)
        assert "'tenant_id'" in error.message and "must be 1 to 128 characters" in error.message
    missing = idp.token(tenant="x", roles=["customer"], tenant_id=None)
    error = await _refused(keycloak_client, missing)
    assert isinstance(error, pc.Unauthenticated)
    assert "lacks the 'tenant_id' claim" in error.message


async def test_through_the_http_gateway(
    idp: IdentityProvider, keycloak_gateway: str, external_tenant: str
) -> None:
    def bearer(roles: list[str]) -> dict[str, str]:
        return {"Authorization": "Bearer " + idp.token(tenant=external_tenant, roles=roles)}

    async with httpx.AsyncClient(base_url=keycloak_gateway, timeout=10) as http:
        created = await http.post(
            "/customer/devices", json={"device_id": "KC-HTTP-1"}, headers=bearer(["customer"])
        )
        assert created.status_code == 200, created.text
        read = await http.get("/customer/devices/KC-HTTP-1", headers=bearer(["read-only"]))
        assert read.status_code == 200 and read.json()["device_id"] == "KC-HTTP-1"
        denied = await http.post(
            "/customer/devices", json={"device_id": "KC-HTTP-2"}, headers=bearer(["read-only"])
        )
        assert denied.status_code == 403
        unmapped = await http.get("/customer/devices/KC-HTTP-1", headers=bearer(["offline"]))
        assert unmapped.status_code == 403
        forged = idp.token(tenant=external_tenant, roles=["customer"], key=new_key())
        anonymous = await http.get(
            "/customer/devices/KC-HTTP-1", headers={"Authorization": f"Bearer {forged}"}
        )
        assert anonymous.status_code == 401
        assert anonymous.json()["error"]["status"] == "UNAUTHENTICATED"


async def test_an_unreachable_identity_provider_is_unavailable_not_a_bad_token(
    idp: IdentityProvider,
) -> None:
    # Nothing listens on a port just released: refused, as with a provider down.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    verifier = TokenVerifier(
        secret=b"unused",
        audience="pulse-ui",
        jwks_url=f"http://127.0.0.1:{port}/realms/pulse/protocol/openid-connect/certs",
        claims=ClaimRules(roles="realm_access.roles"),
    )
    with pytest.raises(IdentityProviderUnavailable) as info:
        await verifier.verify(idp.token(tenant="acme", roles=["customer"]))
    assert "retry" in str(info.value)


async def test_id_and_refresh_tokens_do_not_pass_for_access_tokens(
    idp: IdentityProvider, keycloak_client: KeycloakClients, external_tenant: str
) -> None:
    # Keycloak's ID token for the app has the same issuer, audience and roles.
    for kind in ("ID", "Refresh"):
        token = idp.token(tenant=external_tenant, roles=["customer"], typ=kind)
        error = await _refused(keycloak_client, token)
        assert isinstance(error, pc.Unauthenticated)
        assert "not an access token" in error.message
    # RFC 9068's access-token type passes, as Keycloak's "Bearer" does.
    client = await keycloak_client(
        idp.token(tenant=external_tenant, roles=["customer"], typ="at+jwt")
    )
    await client.devices.create("KC-TYP")
