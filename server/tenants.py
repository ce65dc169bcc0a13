"""Tenants: administration as the migrating login, and the API's check that a
token's tenant exists."""

from __future__ import annotations

import re
import time
import uuid

from pulse.device.v1.error_reason_pb2 import ErrorReason

from server.db import Connection, Database
from server.errors import PermissionDenied

# A tenant that does not exist may be created any moment; remember that it
# did not only briefly. Tenants that exist are remembered for good: they are
# never deleted while the service runs.
_MISSING_TTL_S = 5.0
_CACHE_SIZE = 100_000

# Tenant ids that are not UUIDs (an identity provider's, upstream's MQTT
# topics') map into this namespace. Fixed forever: changing it would move
# every such tenant.
EXTERNAL_NAMESPACE = uuid.UUID("6f1c2f5e-3d7a-5b0e-9c41-7a2d8e0b5c13")
# What an external id may hold: it is also an MQTT topic segment.
EXTERNAL_ID = re.compile(r"[^/+#\x00-\x1f\x7f]{1,128}")


class BadTenantId(ValueError):
    pass


def tenant_uuid(external_id: str) -> uuid.UUID:
    """Our tenant for a tenant id seen at the edge: a UUID in canonical form
    is itself; any other id maps to a name-based UUID (RFC 9562 version 5),
    so the same id always names the same tenant and no table is consulted.
    `pulse tenant add <id>` creates the tenant an id maps to."""
    try:
        parsed = uuid.UUID(external_id)
    except ValueError:
        parsed = None
    if parsed is not None and str(parsed) == external_id.lower():
        return parsed
    if not EXTERNAL_ID.fullmatch(external_id):
        raise BadTenantId(
            f"tenant id {external_id[:40]!r} must be 1 to 128 characters without "
            "'/', '+', '#' or control characters"
        )
    return uuid.uuid5(EXTERNAL_NAMESPACE, external_id)


async def ensure_tenant(
    con: Connection, tenant_id: uuid.UUID, name: str, *, external_id: str | None = None
) -> None:
    """Create the tenant if it does not exist (idempotent). `external_id` is
    the id the tenant has at the edge when that is not its UUID; it must map
    to `tenant_id` (tenant_uuid)."""
    if external_id is not None and tenant_uuid(external_id) != tenant_id:
        raise BadTenantId(f"tenant id {external_id!r} does not map to {tenant_id}")
    async with con.transaction():
        # RLS is forced, so even the owner must name the tenant it writes.
        await con.execute("SELECT set_config('app.tenant_id', $1, true)", str(tenant_id))
        await con.execute(
            "INSERT INTO tenants (tenant_id, name, external_id) VALUES ($1, $2, $3) "
            "ON CONFLICT (tenant_id) DO UPDATE SET external_id = "
            "coalesce(tenants.external_id, excluded.external_id)",
            tenant_id,
            name,
            external_id,
        )


class TenantDirectory:
    """Answers whether a tenant exists, asking the database once per tenant.

    A validly signed token may name a tenant that was never created (or a
    typo in an identity provider's mapping); every write would then fail on a
    foreign key, deep in a store, with nothing the caller could act on.
    """

    def __init__(self, db: Database) -> None:
        self._db = db
        self._known: set[uuid.UUID] = set()
        self._missing: dict[uuid.UUID, float] = {}

    async def require(self, tenant_id: uuid.UUID) -> None:
        """Return if the tenant exists, else PermissionDenied (TENANT_NOT_FOUND)."""
        if tenant_id in self._known:
            return
        checked_at = self._missing.get(tenant_id)
        if checked_at is None or time.monotonic() - checked_at > _MISSING_TTL_S:
            async with self._db.tenant(tenant_id, readonly=True) as con:
                exists = await con.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM tenants WHERE tenant_id = $1)", tenant_id
                )
            if exists:
                if len(self._known) >= _CACHE_SIZE:
                    self._known.clear()
                self._known.add(tenant_id)
                self._missing.pop(tenant_id, None)
                return
            if len(self._missing) >= _CACHE_SIZE:
                self._missing.clear()
            self._missing[tenant_id] = time.monotonic()
        raise PermissionDenied(
            f"the token's tenant {tenant_id} does not exist here; "
            "check the identity provider's tenant_id mapping",
            reason=ErrorReason.TENANT_NOT_FOUND,
        )
