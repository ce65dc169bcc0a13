"""Bearer tokens: verifying them and minting development ones.

Tokens are JWTs whose claims carry `tenant_id` and `role`. They are verified
(signature, expiry, audience), never merely decoded: HS256 with the service's
secret in development, RS256 with a configured public key or JWKS endpoint in
production (and then HS256 is refused, so the shared secret cannot mint).
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import hashlib
import hmac
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import jwt

from server.errors import Unauthenticated

_LEEWAY_S = 10
_CACHE_SIZE = 10_000
_REQUIRED = ["exp", "aud", "sub", "tenant_id", "role"]


class Role(enum.IntEnum):
    """Roles are ordered: each one may do everything the one below may."""

    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3


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
    ) -> None:
        self._audience = audience
        self._jwks = jwt.PyJWKClient(jwks_url, cache_keys=True) if jwks_url else None
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
            # PyJWKClient fetches over blocking HTTP; keep it off the event loop.
            signing_key = await asyncio.to_thread(self._jwks.get_signing_key_from_jwt, token)
            return self._decode(token, signing_key.key, "RS256")
        if self._public_key is not None:
            return self._decode(token, self._public_key, "RS256")
        assert self._hs_key is not None
        return self._decode(token, self._hs_key, "HS256")

    def _decode(self, token: str, key: object, algorithm: str) -> tuple[Principal, float]:
        try:
            claims = jwt.decode(
                token,
                key,  # type: ignore[arg-type]
                algorithms=[algorithm],
                audience=self._audience,
                leeway=_LEEWAY_S,
                options={"require": _REQUIRED},
            )
        except jwt.ExpiredSignatureError as e:
            raise Unauthenticated("token has expired") from e
        except jwt.InvalidAudienceError as e:
            raise Unauthenticated(f"token audience is not {self._audience!r}") from e
        except jwt.MissingRequiredClaimError as e:
            raise Unauthenticated(f"token lacks the {e.claim!r} claim") from e
        except jwt.InvalidSignatureError as e:
            raise Unauthenticated("token signature is invalid") from e
        except jwt.InvalidTokenError as e:
            raise Unauthenticated(f"token is invalid: {e}") from e
        try:
            tenant = uuid.UUID(str(claims["tenant_id"]))
        except ValueError as e:
            raise Unauthenticated("token tenant_id is not a UUID") from e
        try:
            role = Role[str(claims["role"]).upper()]
        except KeyError as e:
            raise Unauthenticated(f"token role {claims['role']!r} is unknown") from e
        principal = Principal(subject=str(claims["sub"]), tenant_id=tenant, role=role)
        return principal, float(claims["exp"]) + _LEEWAY_S


def mint_token(
    secret: bytes,
    *,
    tenant_id: uuid.UUID,
    role: Role,
    subject: str = "dev",
    audience: str = "pulse",
    ttl_s: int = 12 * 3600,
    now: float | None = None,
) -> str:
    """A development HS256 token signed with the service's secret."""
    issued = int(now if now is not None else time.time())
    claims = {
        "sub": subject,
        "aud": audience,
        "iat": issued,
        "exp": issued + ttl_s,
        "tenant_id": str(tenant_id),
        "role": role.name.lower(),
    }
    return jwt.encode(claims, _signing_key(secret), algorithm="HS256")
