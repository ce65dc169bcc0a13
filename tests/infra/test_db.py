"""The tenant scope survives connections the server has closed."""

from __future__ import annotations

import asyncpg

from server.db import Database, create_pool
from tests.conftest import Tenant


async def test_a_pooled_connection_killed_by_the_server_is_replaced(
    dsn: str, tenant: Tenant
) -> None:
    db = Database(await create_pool(dsn, size=1))
    try:
        async with db.tenant(tenant.tenant_id) as con:
            pid = await con.fetchval("SELECT pg_backend_pid()")
        admin = await asyncpg.connect(dsn)
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()
        async with db.tenant(tenant.tenant_id) as con:
            assert await con.fetchval("SELECT pg_backend_pid()") != pid
            assert await con.fetchval("SELECT current_setting('app.tenant_id')") == str(
                tenant.tenant_id
            )
    finally:
        await db.close()
