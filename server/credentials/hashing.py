"""Secrets and their stored form.

A secret is 256 random bits; the database keeps only
`scrypt$n$r$p$salt$hash` of it. For a secret that random a fast hash would
already resist guessing; scrypt is there so that a leaked table is useless
even against a weak secret a future import brings in. It costs ~50 ms of CPU
per check (outside the GIL), which is why `verify` runs in a thread and the
broker side remembers what it has verified (`server/broker_access`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import secrets

_N, _R, _P = 2**14, 8, 1
_MAXMEM = 64 * 1024 * 1024


def new_secret() -> str:
    return secrets.token_urlsafe(32)


CREDENTIAL_ID = re.compile(r"[0-9a-f]{12}")


def new_credential_id() -> str:
    return secrets.token_hex(6)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _scrypt(secret: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=32)


def hash_secret(secret: str) -> str:
    salt = secrets.token_bytes(16)
    digest = _scrypt(secret, salt, _N, _R, _P)
    return f"scrypt${_N}${_R}${_P}${_b64(salt)}${_b64(digest)}"


def matches(secret: str, stored: str) -> bool:
    """Whether `secret` hashes to `stored`; False for a malformed `stored`."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        actual = _scrypt(secret, base64.b64decode(salt), int(n), int(r), int(p))
    except ValueError:
        return False
    return hmac.compare_digest(actual, base64.b64decode(digest))


async def verify(secret: str, stored: str) -> bool:
    return await asyncio.to_thread(matches, secret, stored)


async def hashed(secret: str) -> str:
    return await asyncio.to_thread(hash_secret, secret)
