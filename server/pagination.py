"""Page sizes and page tokens (AIP-158).

A page token is a sealed cursor: the last key of the page, the tenant, and a
fingerprint of the request's other fields, serialised and encrypted with
AES-GCM under a key derived from the service secret. It is opaque (nothing
readable after base64 decoding) and tamper-evident (any change fails
authentication), and it is refused for another tenant or a request whose
filter changed between pages.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from server.errors import InvalidArgument

T = TypeVar("T")

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_NONCE = 12
_VERSION = 1


def page_size(requested: int, *, field: str = "page_size") -> int:
    """0 means the default, above the maximum is clamped, negative is refused."""
    if requested < 0:
        raise InvalidArgument.single(field, f"must not be negative (got {requested})")
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


def fingerprint(*parts: object) -> str:
    """A short digest of the request fields that must not change across pages."""
    raw = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


class PageTokens:
    """Seals and opens page tokens for one kind of listing."""

    def __init__(self, secret: bytes) -> None:
        key = hmac.new(secret, b"pulse/page-token/aes-gcm", hashlib.sha256).digest()
        self._aead = AESGCM(key)

    def listing(self, kind: str, tenant_id: uuid.UUID, *request: object) -> Listing:
        """The page tokens of one listing, bound to the caller and to the
        request fields that must stay the same from page to page."""
        return Listing(self, kind, tenant_id, fingerprint(kind, *request))

    def seal(self, *, kind: str, tenant_id: uuid.UUID, request: str, key: Sequence[object]) -> str:
        payload = json.dumps(
            [_VERSION, str(tenant_id), request, list(key)], separators=(",", ":")
        ).encode()
        nonce = os.urandom(_NONCE)
        sealed = nonce + self._aead.encrypt(nonce, payload, kind.encode())
        return base64.urlsafe_b64encode(sealed).decode().rstrip("=")

    def open(
        self,
        token: str,
        *,
        kind: str,
        tenant_id: uuid.UUID,
        request: str,
        field: str = "page_token",
    ) -> list[object]:
        """The cursor key sealed in `token`, or INVALID_ARGUMENT saying why not."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            if len(raw) <= _NONCE:
                raise ValueError("too short")
            payload = self._aead.decrypt(raw[:_NONCE], raw[_NONCE:], kind.encode())
            version, tenant, fp, key = json.loads(payload)
        except (ValueError, binascii.Error, InvalidTag, TypeError) as e:
            raise InvalidArgument.single(
                field, "is not a page token this listing issued (corrupted or tampered)"
            ) from e
        if version != _VERSION or tenant != str(tenant_id):
            raise InvalidArgument.single(field, "was issued to another caller")
        if fp != request:
            raise InvalidArgument.single(
                field, "was issued for a request with other parameters; keep them the same"
            )
        if not isinstance(key, list):
            raise InvalidArgument.single(field, "is malformed")
        return key


@dataclass(frozen=True, slots=True)
class Listing:
    """Where a page starts and the token of the next one, for one listing.

    Every listing fetches one row more than the page holds (`size + 1`): that
    row only says that another page exists.
    """

    tokens: PageTokens
    kind: str
    tenant_id: uuid.UUID
    request: str

    def start(self, page_token: str) -> list[object] | None:
        """The key the previous page ended at, or None for the first page."""
        if not page_token:
            return None
        return self.tokens.open(
            page_token, kind=self.kind, tenant_id=self.tenant_id, request=self.request
        )

    def page(
        self, rows: Sequence[T], size: int, key: Callable[[T], Sequence[object]]
    ) -> tuple[list[T], str]:
        """`rows` (fetched with limit `size + 1`) cut to `size`, and the token
        of the next page, or "" when this is the last one."""
        if len(rows) <= size:
            return list(rows), ""
        kept = list(rows[:size])
        token = self.tokens.seal(
            kind=self.kind, tenant_id=self.tenant_id, request=self.request, key=key(kept[-1])
        )
        return kept, token
