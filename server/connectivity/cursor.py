"""Watch cursors: a Position sealed like a page token (opaque, tamper-evident,
bound to the tenant), so a client can only hand back what it was given."""

from __future__ import annotations

import uuid

from server.connectivity.model import Position
from server.errors import InvalidArgument
from server.pagination import PageTokens

_KIND = "connection-watch"
# Cursors name a place in the tenant's log, whatever the stream's narrowing,
# so one cursor may resume a stream with other filters.
_REQUEST = ""


def seal(tokens: PageTokens, tenant_id: uuid.UUID, position: Position) -> str:
    return tokens.seal(kind=_KIND, tenant_id=tenant_id, request=_REQUEST, key=list(position))


def open_cursor(tokens: PageTokens, tenant_id: uuid.UUID, cursor: str) -> Position:
    key = tokens.open(
        cursor, kind=_KIND, tenant_id=tenant_id, request=_REQUEST, field="resume_cursor"
    )
    if len(key) != 2 or not all(isinstance(k, int) and k >= 0 for k in key):
        raise InvalidArgument.single("resume_cursor", "is malformed")
    xact, event_id = key
    assert isinstance(xact, int) and isinstance(event_id, int)
    return Position(xact, event_id)
