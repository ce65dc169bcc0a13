"""Tenants: administration as the migrating login, and the API's check that a
token's tenant exists."""

from __future__ import annotations

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


async def ensure_tenant(con: Connection, tenant_id: uuid.UUID, name: str) -> None:
    """Create the tenant if it does not exist (idempotent)."""
    async with con.transaction():
        # RLS is forced, so even the owner must name the tenant it writes.
        await con.execute("SELECT set_config('app.tenant_id', $1, true)", str(tenant_id))
        await con.execute(
            "INSERT INTO tenants (tenant_id, name) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            tenant_id,
            name,
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
