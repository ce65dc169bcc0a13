"""The tenant scope survives connections the server has closed, and says when
a lost connection leaves a commit's outcome unknown."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from server.db import Database, create_pool
from server.transient import CommitOutcomeUnknown, is_connection_lost
from tests.conftest import Tenant


async def _terminate(dsn: str, pids: list[int], *, wait: bool = True) -> None:
    """pg_terminate_backend; with `wait`, until the backends are gone."""
    admin = await asyncpg.connect(dsn)
    try:
        for pid in pids:
            timeout_ms = 5000 if wait else 0
            assert await admin.fetchval("SELECT pg_terminate_backend($1, $2)", pid, timeout_ms)
    finally:
        await admin.close()


async def test_a_pooled_connection_killed_by_the_server_is_replaced(
    dsn: str, tenant: Tenant
) -> None:
    db = Database(await create_pool(dsn, size=1))
    try:
        async with db.tenant(tenant.tenant_id) as con:
            pid = await con.fetchval("SELECT pg_backend_pid()")
        # Not waiting races the server's goodbye (a FATAL message, then the
        # end of the stream) against the next checkout, as in production.
        await _terminate(dsn, [pid], wait=False)
        async with db.tenant(tenant.tenant_id) as con:
            assert await con.fetchval("SELECT pg_backend_pid()") != pid
            assert await con.fetchval("SELECT current_setting('app.tenant_id')") == str(
                tenant.tenant_id
            )
    finally:
        await db.close()


async def test_a_pool_whose_every_connection_was_killed_recovers_at_once(
    dsn: str, tenant: Tenant
) -> None:
    """What a restart or failover looks like: every idle connection is dead."""
    size = 4
    db = Database(await create_pool(dsn, size=size))
    try:
        held = asyncio.Barrier(size)

        async def backend_pid() -> int:
            async with db.tenant(tenant.tenant_id, readonly=True) as con:
                await held.wait()  # so that the pool opens `size` connections
                pid: int = await con.fetchval("SELECT pg_backend_pid()")
                return pid

        old = await asyncio.gather(*(backend_pid() for _ in range(size)))
        await _terminate(dsn, old)
        held = asyncio.Barrier(size)
        new = await asyncio.gather(*(backend_pid() for _ in range(size)))
        assert not set(new) & set(old)
    finally:
        await db.close()


@pytest.mark.parametrize("readonly", [False, True])
async def test_a_connection_lost_during_commit(dsn: str, tenant: Tenant, readonly: bool) -> None:
    """A write's outcome is then unknown (never to be retried blindly); a
    read-only transaction has nothing to commit, so it is a plain lost
    connection."""
    db = Database(await create_pool(dsn, size=1))
    try:
        with pytest.raises(Exception) as raised:
            async with db.tenant(tenant.tenant_id, readonly=readonly) as con:
                await _terminate(dsn, [await con.fetchval("SELECT pg_backend_pid()")])
        assert is_connection_lost(raised.value)
        assert isinstance(raised.value, CommitOutcomeUnknown) is not readonly
        async with db.tenant(tenant.tenant_id) as con:
            assert await con.fetchval("SELECT 1") == 1
    finally:
        await db.close()


async def test_a_connection_lost_inside_the_scope_is_discarded(dsn: str, tenant: Tenant) -> None:
    """The original error is raised (not one from a ROLLBACK on a dead
    connection), and the pool does not keep the connection."""
    db = Database(await create_pool(dsn, size=1))
    try:
        with pytest.raises(Exception) as raised:
            async with db.tenant(tenant.tenant_id) as con:
                pid = await con.fetchval("SELECT pg_backend_pid()")
                await _terminate(dsn, [pid])
                await con.fetchval("SELECT 1")
        assert is_connection_lost(raised.value)
        assert not isinstance(raised.value, CommitOutcomeUnknown)
        async with db.tenant(tenant.tenant_id) as con:
            assert await con.fetchval("SELECT pg_backend_pid()") != pid
    finally:
        await db.close()
