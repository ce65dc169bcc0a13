"""Tenant administration, done as the migrating login rather than pulse_app."""

from __future__ import annotations

import uuid

from server.db import Connection


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
