"""Claim paths, the role map and the settings that configure them (no server)."""

from __future__ import annotations

import secrets
import time
import uuid
from typing import Any

import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from server import config
from server.auth import (
    OWN_ROLES,
    ClaimRules,
    Role,
    TokenVerifier,
    claim_at,
    claim_keys,
    mint_token,
    parse_role_map,
)
from server.errors import PermissionDenied, Unauthenticated
from server.tenants import tenant_uuid

# Keys as identity providers write them; a backslash would need escaping itself.
keys = st.text(st.characters(exclude_characters="\\", exclude_categories=["Cs"]), min_size=1)
role_names = st.text(
    st.characters(exclude_characters=",=", exclude_categories=["Cs", "Z", "Cc"]), min_size=1
).filter(lambda name: name.lower() not in OWN_ROLES)


def _escaped(key: str) -> str:
    return key.replace(".", "\\.")


@given(st.lists(keys, min_size=1, max_size=5), st.integers())
def test_a_path_walks_the_keys_it_names(path: list[str], value: int) -> None:
    claims: dict[str, Any] = {"other": 1}
    node = claims
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    dotted = ".".join(map(_escaped, path))
    assert claim_keys(dotted) == path
    assert claim_at(claims, dotted) == value


def test_claim_paths() -> None:
    claims = {"realm_access": {"roles": ["customer"]}, "https://pulse.example/tenant": "acme"}
    assert claim_at(claims, "realm_access.roles") == ["customer"]
    assert claim_at(claims, "https://pulse\\.example/tenant") == "acme"
    assert claim_at(claims, "realm_access.missing") is None
    assert claim_at(claims, "realm_access.roles.0") is None  # not an object
    assert claim_at(claims, "absent.roles") is None
    for bad in ("", ".roles", "realm_access.", "a..b"):
        with pytest.raises(ValueError, match="empty key"):
            claim_keys(bad)


def test_role_map_parsing() -> None:
    text = " customer=operator, tenant-admin = admin,,viewer=viewer ,Admin=admin"
    assert parse_role_map(text) == {
        "customer": Role.OPERATOR,
        "tenant-admin": Role.ADMIN,
        "viewer": Role.VIEWER,
        "Admin": Role.ADMIN,
    }
    assert parse_role_map("") == {}
    for bad, message in [
        ("customer", "not PROVIDER_ROLE=ROLE"),
        ("=admin", "not PROVIDER_ROLE=ROLE"),
        ("customer=superuser", "not one of viewer, operator, admin"),
        ("operator=viewer", "always means itself"),
        ("customer=operator,customer=admin", "mapped twice"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_role_map(bad)


@given(st.dictionaries(role_names, st.sampled_from(Role)))
def test_a_written_role_map_reads_back(mapping: dict[str, Role]) -> None:
    text = ",".join(f"{name}={role.name.lower()}" for name, role in mapping.items())
    assert parse_role_map(text) == mapping


RULES = ClaimRules(
    tenant="tenant_id",
    roles="realm_access.roles",
    role_map=parse_role_map("customer=operator,tenant-admin=admin,read-only=viewer"),
)


@pytest.mark.parametrize(
    ("roles", "expected"),
    [
        (["customer"], Role.OPERATOR),
        (["read-only", "offline_access"], Role.VIEWER),
        (["customer", "tenant-admin", "read-only"], Role.ADMIN),
        ("tenant-admin", Role.ADMIN),
        (["VIEWER"], Role.VIEWER),  # our own names, in any case
    ],
)
def test_the_highest_mapped_role_is_granted(roles: Any, expected: Role) -> None:
    assert RULES.role_of({"realm_access": {"roles": roles}}) == expected


@pytest.mark.parametrize(
    "claims",
    [
        {"realm_access": {"roles": ["offline_access"]}},
        {"realm_access": {"roles": []}},
        {"realm_access": {}},
        {},
    ],
)
def test_no_mapped_role_is_permission_denied(claims: dict[str, Any]) -> None:
    with pytest.raises(PermissionDenied, match="grant no role here"):
        RULES.role_of(claims)


@pytest.mark.parametrize("roles", [42, ["customer", 7], {"customer": True}])
def test_a_malformed_roles_claim_is_unauthenticated(roles: Any) -> None:
    with pytest.raises(Unauthenticated, match="not a string or list of strings"):
        RULES.role_of({"realm_access": {"roles": roles}})


def test_tenant_ids_map_to_tenants() -> None:
    tenant_id = uuid.uuid4()
    assert RULES.tenant_of({"tenant_id": str(tenant_id)}) == tenant_id
    assert RULES.tenant_of({"tenant_id": "acme-industrial"}) == tenant_uuid("acme-industrial")
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, "lacks the 'tenant_id' claim"),
        ({"tenant_id": 7}, "is not a string"),
        ({"tenant_id": ""}, "must be 1 to 128 characters"),
        ({"tenant_id": "a+b"}, "must be 1 to 128 characters"),
    ]
    for claims, message in cases:
        with pytest.raises(Unauthenticated, match=message):
            RULES.tenant_of(claims)


def _env(**variables: str) -> dict[str, str]:
    return {"PULSE_SECRET": secrets.token_hex(32), **variables}


def test_settings() -> None:
    defaults = config.load(_env())
    assert defaults.auth_claims == ClaimRules()
    assert defaults.auth_issuer is None
    keycloak = config.load(
        _env(
            PULSE_AUTH_TENANT_CLAIM="tenant_id",
            PULSE_AUTH_ROLES_CLAIM="realm_access.roles",
            PULSE_AUTH_ROLE_MAP="customer=operator,tenant-admin=admin",
            PULSE_AUTH_ISSUER="https://sso.example/realms/pulse",
        )
    )
    assert keycloak.auth_claims == ClaimRules(
        "tenant_id", "realm_access.roles", {"customer": Role.OPERATOR, "tenant-admin": Role.ADMIN}
    )
    assert keycloak.auth_issuer == "https://sso.example/realms/pulse"
    with pytest.raises(ValueError, match="PULSE_AUTH_ROLE_MAP: 'customer' maps to 'boss'"):
        config.load(_env(PULSE_AUTH_ROLE_MAP="customer=boss"))
    with pytest.raises(ValueError, match="PULSE_AUTH_ROLES_CLAIM: claim path"):
        config.load(_env(PULSE_AUTH_ROLES_CLAIM="realm_access..roles"))


def test_dev_tokens_keep_their_claims() -> None:
    tenant_id = uuid.uuid4()
    token = mint_token(b"s" * 32, tenant_id=tenant_id, role=Role.OPERATOR)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert (claims["tenant_id"], claims["role"]) == (str(tenant_id), "operator")
    assert "iss" not in claims


async def test_dev_tokens_follow_the_configured_claims_and_issuer() -> None:
    issuer = "https://sso.example/realms/pulse"
    verifier = TokenVerifier(secret=b"s" * 32, audience="pulse", issuer=issuer, claims=RULES)
    token = mint_token(
        b"s" * 32, tenant_id="acme-industrial", role=Role.ADMIN, issuer=issuer, claims=RULES
    )
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["realm_access"] == {"roles": "admin"}
    principal = await verifier.verify(token)
    assert (principal.tenant_id, principal.role) == (tenant_uuid("acme-industrial"), Role.ADMIN)
    without_issuer = mint_token(b"s" * 32, tenant_id="acme", role=Role.ADMIN, claims=RULES)
    with pytest.raises(Unauthenticated, match="lacks the 'iss' claim"):
        await verifier.verify(without_issuer)
    expired = mint_token(
        b"s" * 32,
        tenant_id="acme",
        role=Role.ADMIN,
        issuer=issuer,
        claims=RULES,
        now=time.time() - 3600,
        ttl_s=60,
    )
    with pytest.raises(Unauthenticated, match="expired"):
        await verifier.verify(expired)
