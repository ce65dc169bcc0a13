"""Bearer tokens: verifying them and minting development ones.

Tokens are JWTs, verified (signature, expiry, audience, and the issuer when
one is configured), never merely decoded: HS256 with the service's secret in
development, RS256 with a configured public key or JWKS endpoint in
production (and then HS256 is refused, so the shared secret cannot mint).

Which claims carry the tenant and the roles, and what an identity provider's
role names mean here, is configuration (`ClaimRules`): our own tokens carry
`tenant_id` and `role`, Keycloak's carry roles under `realm_access.roles` and
tenant ids that are not UUIDs (`server.tenants.tenant_uuid` maps those).
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import hashlib
import hmac
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt

from server.errors import IdentityProviderUnavailable, PermissionDenied, Unauthenticated
from server.tenants import BadTenantId, tenant_uuid

_LEEWAY_S = 10
_CACHE_SIZE = 10_000
_REQUIRED = ["exp", "aud", "sub"]
# A token's role names quoted in a refusal: enough to see what it carried.
_ROLES_SHOWN = 8
# Values of a `typ` claim that mean an access token (Keycloak's, RFC 9068's).
# Keycloak's ID and refresh tokens carry the same audience but say `ID` or
# `Refresh`; they must not pass for access tokens. Ours carry no `typ`.
_ACCESS_TOKEN_TYPES = frozenset({"bearer", "at+jwt"})


class Role(enum.IntEnum):
    """Roles are ordered: each one may do everything the one below may."""

    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3


#: Our role names; in a token they always mean themselves.
OWN_ROLES: Mapping[str, Role] = {role.name.lower(): role for role in Role}


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    tenant_id: uuid.UUID
    role: Role


_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal")


def current_principal() -> Principal:
    """The verified caller of the RPC being served (set by the auth interceptor)."""
    return _principal.get()


def set_principal(principal: Principal) -> contextvars.Token[Principal]:
    return _principal.set(principal)


def reset_principal(token: contextvars.Token[Principal]) -> None:
    _principal.reset(token)


# Split on dots not escaped: as in Keycloak's claim names, `\.` is a dot
# inside a key, so a namespaced claim such as `https://pulse\.example/tenant`
# can be named.
_PATH_SEPARATOR = re.compile(r"(?<!\\)\.")


def claim_keys(path: str) -> list[str]:
    """The keys a dotted claim path walks (`realm_access.roles`). Raises
    ValueError for an empty path or an empty key."""
    keys = [key.replace("\\.", ".") for key in _PATH_SEPARATOR.split(path)]
    if not all(keys):
        raise ValueError(f"claim path {path!r} has an empty key")
    return keys


def claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """The value at `path`, or None where a step is missing or not an object."""
    value: Any = claims
    for key in claim_keys(path):
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def parse_role_map(text: str) -> dict[str, Role]:
    """Provider role names and the role each grants here, from
    `customer=operator,tenant-admin=admin`. Our own names always mean
    themselves, so they may be listed only as themselves. Raises ValueError."""
    mapping: dict[str, Role] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        name, equals, ours = (part.strip() for part in entry.partition("="))
        if not (name and equals):
            raise ValueError(f"entry {entry!r} is not PROVIDER_ROLE=ROLE")
        role = OWN_ROLES.get(ours.lower())
        if role is None:
            raise ValueError(f"{name!r} maps to {ours!r}, not one of {', '.join(OWN_ROLES)}")
        if OWN_ROLES.get(name.lower(), role) != role:
            raise ValueError(f"{name!r} is our own role name and always means itself")
        if mapping.setdefault(name, role) != role:
            raise ValueError(f"{name!r} is mapped twice")
    return mapping


def _role_names(value: Any) -> list[str] | None:
    """A roles claim's names: one string or a list of strings; None otherwise."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(name, str) for name in value):
        return value
    return None


@dataclass(frozen=True, slots=True)
class ClaimRules:
    """Where a token carries its tenant and roles, and what its roles mean here.

    Tokens that identify a caller badly (no usable tenant) are UNAUTHENTICATED;
    tokens that identify one but grant no role here are PERMISSION_DENIED, as
    the caller is known and only a grant by its identity provider helps.
    """

    #: Dotted path of the tenant id: a UUID or any id tenant_uuid maps.
    tenant: str = "tenant_id"
    #: Dotted path of the roles: a string or a list of strings.
    roles: str = "role"
    #: Provider role name -> our role (our own names need no entry). Left
    #: out of the hash, so that settings holding these rules stay hashable.
    role_map: Mapping[str, Role] = field(default_factory=dict, hash=False)

    def tenant_of(self, claims: Mapping[str, Any]) -> uuid.UUID:
        value = claim_at(claims, self.tenant)
        if value is None:
            raise Unauthenticated(f"token lacks the {self.tenant!r} claim")
        if not isinstance(value, str):
            raise Unauthenticated(f"token claim {self.tenant!r} is not a string")
        try:
            return tenant_uuid(value)
        except BadTenantId as e:
            raise Unauthenticated(f"token claim {self.tenant!r}: {e}") from e

    def role_of(self, claims: Mapping[str, Any]) -> Role:
        """The highest role the token's role names grant here."""
        value = claim_at(claims, self.roles)
        names = [] if value is None else _role_names(value)
        if names is None:
            raise Unauthenticated(f"token claim {self.roles!r} is not a string or list of strings")
        granted = [role for role in map(self._role_named, names) if role is not None]
        if not granted:
            shown = ", ".join(repr(name[:40]) for name in names[:_ROLES_SHOWN]) or "none"
            raise PermissionDenied(
                f"the token's roles in {self.roles!r} ({shown}) grant no role here; "
                "PULSE_AUTH_ROLE_MAP maps provider roles to viewer, operator or admin"
            )
        return max(granted)

    def _role_named(self, name: str) -> Role | None:
        role = self.role_map.get(name)
        # Our own names match in any case, as they always have.
        return role if role is not None else OWN_ROLES.get(name.lower())


DEFAULT_CLAIMS = ClaimRules()


def _signing_key(secret: bytes) -> bytes:
    # A key derived for this use only, so the root secret signs nothing else.
    return hmac.new(secret, b"pulse/jwt/hs256", hashlib.sha256).digest()


class TokenVerifier:
    def __init__(
        self,
        *,
        secret: bytes,
        audience: str,
        public_key_file: Path | None = None,
        jwks_url: str | None = None,
        issuer: str | None = None,
        claims: ClaimRules = DEFAULT_CLAIMS,
    ) -> None:
        self._audience = audience
        self._issuer = issuer
        self._required = [*_REQUIRED, "iss"] if issuer else _REQUIRED
        self._claims = claims
        # Keys are looked up in the cached key set (refetched every 5 min and
        # for an unknown kid), not cached per kid without expiry, so a key the
        # provider withdraws stops verifying.
        self._jwks = jwt.PyJWKClient(jwks_url) if jwks_url else None
        self._public_key = public_key_file.read_text() if public_key_file else None
        self._hs_key = None if (self._jwks or self._public_key) else _signing_key(secret)
        # Verified tokens, so a client reusing one token pays for the
        # signature check once; expiry is still checked on every call.
        self._verified: dict[str, tuple[Principal, float]] = {}

    async def verify(self, token: str) -> Principal:
        hit = self._verified.get(token)
        if hit is not None and hit[1] > time.time():
            return hit[0]
        principal, expires = await self._verify(token)
        if len(self._verified) >= _CACHE_SIZE:
            self._verified.clear()
        self._verified[token] = (principal, expires)
        return principal

    async def _verify(self, token: str) -> tuple[Principal, float]:
        if self._jwks is not None:
            return self._decode(token, await self._jwks_key(self._jwks, token), "RS256")
        if self._public_key is not None:
            return self._decode(token, self._public_key, "RS256")
        assert self._hs_key is not None
        return self._decode(token, self._hs_key, "HS256")

    async def _jwks_key(self, jwks: jwt.PyJWKClient, token: str) -> Any:
        try:
            # PyJWKClient fetches over blocking HTTP; keep it off the event loop.
            found = await asyncio.to_thread(jwks.get_signing_key_from_jwt, token)
        except jwt.PyJWKClientConnectionError as e:
            # The provider is unreachable: no fault of the caller's token.
            raise IdentityProviderUnavailable(str(e)[:200]) from e
        except jwt.InvalidTokenError as e:
            raise Unauthenticated(f"token is invalid: {e}") from e
        except jwt.PyJWKClientError as e:
            raise Unauthenticated(f"token is not signed by a key of the JWKS: {e}") from e
        return found.key

    def _decode(self, token: str, key: Any, algorithm: str) -> tuple[Principal, float]:
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=_LEEWAY_S,
                options={"require": self._required},
            )
        except jwt.ExpiredSignatureError as e:
            raise Unauthenticated("token has expired") from e
        except jwt.InvalidAudienceError as e:
            raise Unauthenticated(f"token audience is not {self._audience!r}") from e
        except jwt.InvalidIssuerError as e:
            raise Unauthenticated(f"token issuer is not {self._issuer!r}") from e
        except jwt.MissingRequiredClaimError as e:
            raise Unauthenticated(f"token lacks the {e.claim!r} claim") from e
        except jwt.InvalidSignatureError as e:
            raise Unauthenticated("token signature is invalid") from e
        except jwt.InvalidTokenError as e:
            raise Unauthenticated(f"token is invalid: {e}") from e
        kind = claims.get("typ")
        if kind is not None and str(kind).lower() not in _ACCESS_TOKEN_TYPES:
            raise Unauthenticated(f"token is a {str(kind)[:20]!r} token, not an access token")
        principal = Principal(
            subject=str(claims["sub"]),
            tenant_id=self._claims.tenant_of(claims),
            role=self._claims.role_of(claims),
        )
        return principal, float(claims["exp"]) + _LEEWAY_S


def _put(claims: dict[str, Any], path: str, value: str) -> None:
    *parents, leaf = claim_keys(path)
    for key in parents:
        claims = claims.setdefault(key, {})
    claims[leaf] = value


def mint_token(
    secret: bytes,
    *,
    tenant_id: uuid.UUID | str,
    role: Role,
    subject: str = "dev",
    audience: str = "pulse",
    ttl_s: int = 12 * 3600,
    now: float | None = None,
    issuer: str | None = None,
    claims: ClaimRules = DEFAULT_CLAIMS,
) -> str:
    """A development HS256 token signed with the service's secret, carrying
    the tenant id as given and the role where `claims` looks for them."""
    issued = int(now if now is not None else time.time())
    payload: dict[str, Any] = {
        "sub": subject,
        "aud": audience,
        "iat": issued,
        "exp": issued + ttl_s,
    }
    if issuer:
        payload["iss"] = issuer
    _put(payload, claims.tenant, str(tenant_id))
    _put(payload, claims.roles, role.name.lower())
    return jwt.encode(payload, _signing_key(secret), algorithm="HS256")
